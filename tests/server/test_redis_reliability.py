"""Redis backend under failure: worker kill -9, Redis restart, delivery cap, reclaim, drain/hand-back.

Workers here are real `rvr worker` processes (or the same Worker class on a thread where a process
adds nothing); Redis is a real redis-server with AOF on.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time

import httpx
import pytest
import redis

from server.app import create_app
from server.metrics import Metrics
from server.queue import make_worker_queue
from server.queue.base import WorkerStats
from server.queue.redis_keys import GROUP, Keys
from server.schemas import JobMessage, JobParams
from server.worker import Worker
from tests.server.server_testutil import (
    LONG,
    LiveServer,
    free_port,
    poll,
    read_sse,
    refine_multipart,
    rvr_env,
    rvr_process,
    stack_settings,
    wait_until,
)

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.xdist_group("server-redis")]

FAST_RECLAIM = {"visibility_timeout_s": 1.5, "reaper_interval_s": 0.3, "heartbeat_interval_s": 0.2}


@pytest.fixture
def api(tiny_model, redis_server):
    """An API replica on the Redis queue (no worker in it), plus its settings."""
    settings = stack_settings("redis", tiny_model, redis_server.url, **FAST_RECLAIM)
    live = LiveServer(create_app(settings)).start()
    live.wait_ready()
    yield live, settings
    live.stop()


@contextlib.contextmanager
def worker_thread(settings, engine, **overrides):
    """The real Worker on a thread of this process (shares the session's engine)."""
    s = settings.model_copy(update=overrides)
    w = Worker(s, make_worker_queue(s), Metrics(), engine=engine)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    try:
        wait_until(w.ready.is_set, 60, what="worker ready")
        yield w
    finally:
        w.stop()
        t.join(30)
        w.queue.close()


@pytest.fixture
def rds(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def client(api):
    with httpx.Client(base_url=api[0].url, timeout=30) as c:
        yield c


def worker_args(settings, name: str, **extra) -> list[str]:
    args = ["worker", "--redis-url", settings.redis_url, "--key-prefix", settings.key_prefix]
    args += ["--model", settings.model, "--device", "cpu", "--no-warmup", "--worker-name", name]
    args += ["--queue-poll-ms", "50"]
    for k, v in {**FAST_RECLAIM, "worker_port": 0, **extra}.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def job_events(client, job_id):
    return read_sse(client, "GET", f"/v1/jobs/{job_id}/events")


def step_of(client, job_id) -> int:
    return client.get(f"/v1/jobs/{job_id}").json().get("step", 0)


def test_kill_9_mid_job_completes_on_another_worker_exactly_once(api, client, rds, tmp_path):
    _, settings = api
    keys = Keys(settings.key_prefix)
    with rvr_process(worker_args(settings, "wa"), rvr_env(), tmp_path / "wa.log") as wa:
        job = refine_multipart(client, steps=40, seed=9).json()["id"]
        wait_until(lambda: step_of(client, job) >= 2, 90, what="running on wa")
        wa.send_signal(signal.SIGSTOP)  # frozen mid-job (CPU speed varies; it must not finish first)
        with rvr_process(worker_args(settings, "wb"), rvr_env(), tmp_path / "wb.log"):
            wait_until(lambda: rds.hexists(keys.workers, "wb"), 90, what="wb up")
            wa.send_signal(signal.SIGKILL)
            wa.wait(10)
            view = poll(client, job, {"succeeded", "failed"}, timeout=120)
    assert view["status"] == "succeeded", view
    rec = rds.hgetall(keys.job(job))
    assert rec[b"worker"] == b"wb" and rec[b"attempts"] == b"2"
    assert rec[b"completions"] == b"1"  # exactly one result written
    kinds = [e["event"] for e in job_events(client, job)]
    assert kinds.count("completed") == 1 and kinds.count("started") == 2
    assert client.get(f"/v1/jobs/{job}/result").headers["content-type"] == "image/png"
    assert rds.xpending(keys.stream, GROUP)["pending"] == 0


def test_redis_restart_mid_run_loses_no_accepted_job(tiny_model, engine, own_redis):
    settings = stack_settings("redis", tiny_model, own_redis.url, **FAST_RECLAIM)
    live = LiveServer(create_app(settings)).start()
    try:
        with (
            worker_thread(settings, engine, max_batch_jobs=2),
            httpx.Client(base_url=live.url, timeout=30) as client,
        ):
            jobs = [refine_multipart(client, steps=12, seed=i) for i in range(5)]
            assert all(r.status_code == 202 for r in jobs)
            ids = [r.json()["id"] for r in jobs]
            wait_until(lambda: step_of(client, ids[0]) >= 1, 60, what="running")
            own_redis.stop()
            assert client.get("/readyz").status_code == 503
            r = refine_multipart(client, steps=2)
            assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
            time.sleep(1.0)
            own_redis.start()
            for job in ids:
                assert (
                    poll(client, job, {"succeeded", "failed", "cancelled"}, timeout=120)["status"]
                    == "succeeded"
                )
            assert client.get("/readyz").status_code == 200
            assert refine_multipart(client, steps=2).status_code == 202
    finally:
        live.stop()


def test_redis_at_maxmemory_answers_503_overloaded_not_500(tiny_model, own_redis):
    settings = stack_settings("redis", tiny_model, own_redis.url)
    live = LiveServer(create_app(settings)).start()
    admin = redis.Redis.from_url(own_redis.url)
    try:
        with httpx.Client(base_url=live.url, timeout=30) as client:
            assert refine_multipart(client, steps=2).status_code == 202
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", "1")  # below what is used: every write is refused
            r = refine_multipart(client, steps=2)
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
            assert r.headers["retry-after"].isdigit()
            admin.config_set("maxmemory", "0")
            assert refine_multipart(client, steps=2).status_code == 202
    finally:
        admin.close()
        live.stop()


def test_a_running_job_is_not_reclaimed_while_its_worker_lives(api, client, rds, engine):
    """Jobs outlive the visibility timeout; the running worker's heartbeat keeps them from looking idle."""
    _, settings = api
    other = make_worker_queue(settings.model_copy(update={"worker_name": "reaper"}))  # the real reaper code
    try:
        with worker_thread(settings, engine):
            job = refine_multipart(client, steps=LONG, rounds=8).json()["id"]
            wait_until(lambda: step_of(client, job) >= 1, 30, what="running")
            end = time.monotonic() + 2 * settings.visibility_timeout_s
            while time.monotonic() < end:
                assert other.reap() == (0, 0)
                time.sleep(0.2)
            assert client.get(f"/v1/jobs/{job}").json()["status"] == "running"  # it did outlive the timeout
            client.delete(f"/v1/jobs/{job}")
            assert poll(client, job, {"cancelled", "succeeded"})["status"] == "cancelled"
        assert rds.hget(Keys(settings.key_prefix).job(job), "attempts") == b"1"
    finally:
        other.close()


def test_a_job_past_the_delivery_cap_is_dead_lettered(api, client, rds, engine):
    _, settings = api
    keys = Keys(settings.key_prefix)
    job = refine_multipart(client, steps=3).json()["id"]
    # A consumer takes the job and dies without a trace (never acks).
    taken = rds.xreadgroup(GROUP, "ghost", {keys.stream: ">"}, count=1)
    assert taken and taken[0][1][0][1][b"id"].decode() == job
    with worker_thread(settings, engine, max_deliveries=1) as w:
        view = poll(client, job, {"succeeded", "failed"}, timeout=30)
        assert view["status"] == "failed" and view["error"]["code"] == "dead_lettered"
        dead = rds.xrange(keys.dead)
        assert len(dead) == 1 and dead[0][1][b"id"].decode() == job and dead[0][1][b"deliveries"] == b"2"
        assert job_events(client, job)[-1]["event"] == "failed"
        assert rds.xpending(keys.stream, GROUP)["pending"] == 0
        assert w.metrics.dead_lettered._value.get() == 1


def test_a_job_that_kills_its_worker_on_every_restart_is_dead_lettered(api, client, rds, engine):
    """A pod restarting under the same name recovers its own pending entries with Redis' real count."""
    _, settings = api
    keys = Keys(settings.key_prefix)
    job = refine_multipart(client, steps=3).json()["id"]
    me = settings.worker_name
    rds.xreadgroup(GROUP, me, {keys.stream: ">"}, count=1)  # run 1: the process was killed
    rds.xreadgroup(GROUP, me, {keys.stream: "0"}, count=1)  # run 2 after a restart: killed again
    with worker_thread(settings, engine, max_deliveries=2):  # run 3 would exceed the cap
        view = poll(client, job, {"succeeded", "failed"}, timeout=30)
        assert view["status"] == "failed" and view["error"]["code"] == "dead_lettered"
        dead = rds.xrange(keys.dead)
        assert len(dead) == 1 and dead[0][1][b"id"].decode() == job and dead[0][1][b"deliveries"] == b"3"
        assert b"worker_crashed" in dead[0][1][b"reason"]
        assert rds.xpending(keys.stream, GROUP)["pending"] == 0


def test_an_abandoned_job_is_reclaimed_and_completed(api, client, rds, engine):
    _, settings = api
    keys = Keys(settings.key_prefix)
    job = refine_multipart(client, steps=3).json()["id"]
    rds.xreadgroup(GROUP, "ghost", {keys.stream: ">"}, count=1)
    with worker_thread(settings, engine) as w:
        assert poll(client, job, {"succeeded", "failed"}, timeout=30)["status"] == "succeeded"
        rec = rds.hgetall(keys.job(job))
        assert rec[b"attempts"] == b"2" and rec[b"completions"] == b"1"
        assert w.metrics.reclaimed._value.get() == 1


def test_duplicate_delivery_of_a_finished_job_is_acked_without_running(api, client, rds, engine):
    _, settings = api
    keys = Keys(settings.key_prefix)
    with worker_thread(settings, engine):
        job = refine_multipart(client, steps=3).json()["id"]
        assert poll(client, job, {"succeeded"})["status"] == "succeeded"
        # Re-deliver the same message (what a reclaim after a crash between write and ack would do).
        msg = JobMessage.new(job, "refine", JobParams(prompt="a red apple", steps=3), True, 60)
        rds.xadd(keys.stream, {"id": job, "msg": msg.model_dump_json()})
        wait_until(
            lambda: rds.xpending(keys.stream, GROUP)["pending"] == 0 and rds.xlen(keys.stream) == 0, 30
        )
        assert rds.hget(keys.job(job), "completions") == b"1"
        assert [e["event"] for e in job_events(client, job)].count("completed") == 1


def test_sigterm_drain_finishes_or_hands_back(api, client, rds, engine, tmp_path):
    _, settings = api
    # Grace long enough: the running job finishes, then the worker exits 0.
    port = free_port()
    probes = f"http://127.0.0.1:{port}"
    args = worker_args(settings, "wd1", drain_timeout_s=60, worker_port=port)
    with rvr_process(args, rvr_env(), tmp_path / "d1.log") as wd:
        job = refine_multipart(client, steps=LONG // 5).json()["id"]
        wait_until(lambda: step_of(client, job) >= 1, 90, what="running")
        assert httpx.get(probes + "/readyz").status_code == 200
        assert httpx.get(probes + "/livez").status_code == 200
        assert "rvr_step_seconds_bucket" in httpx.get(probes + "/metrics").text
        wd.send_signal(signal.SIGTERM)
        wait_until(
            lambda: httpx.get(probes + "/readyz").status_code == 503, 10, what="not ready while draining"
        )
        assert wd.wait(60) == 0
    assert client.get(f"/v1/jobs/{job}").json()["status"] == "succeeded"
    # No grace: the running job is handed back to the queue for another worker.
    with rvr_process(worker_args(settings, "wd2", drain_timeout_s=0), rvr_env(), tmp_path / "d2.log") as wd:
        job = refine_multipart(client, steps=LONG, rounds=8).json()["id"]
        wait_until(lambda: step_of(client, job) >= 1, 90, what="running")
        wd.send_signal(signal.SIGTERM)
        assert wd.wait(30) == 0
    assert client.get(f"/v1/jobs/{job}").json()["status"] == "queued"
    with worker_thread(settings, engine):
        wait_until(lambda: step_of(client, job) >= 1, 30, what="taken by the next worker")
        client.delete(f"/v1/jobs/{job}")  # 200 steps is long; the point was the hand-back
        assert poll(client, job, {"cancelled", "succeeded"})["status"] == "cancelled"
        wait_until(lambda: rds.xpending(Keys(settings.key_prefix).stream, GROUP)["pending"] == 0, 30)


def test_heartbeat_does_not_take_back_a_job_another_worker_reclaimed(api, client, rds):
    """A worker that stalled past the visibility timeout must not re-own what a reaper took."""
    _, settings = api
    keys = Keys(settings.key_prefix)
    stalled = make_worker_queue(settings.model_copy(update={"worker_name": "stalled"}))
    try:
        refine_multipart(client, steps=2)
        (d,) = stalled.take(1, 1.0)
        rds.xclaim(keys.stream, GROUP, "reaper", 0, [d.ref], justid=True)  # the reaper's reclaim
        stalled.refresh([d], WorkerStats())
        (owner,) = rds.xpending_range(keys.stream, GROUP, d.ref, d.ref, 1)
        assert owner["consumer"] == b"reaper"
    finally:
        stalled.close()


def test_retried_hand_back_and_dead_letter_do_not_duplicate(api, client, rds):
    _, settings = api
    keys = Keys(settings.key_prefix)
    q = make_worker_queue(settings.model_copy(update={"worker_name": "retrier"}))
    try:
        refine_multipart(client, steps=2)
        refine_multipart(client, steps=2)
        first, second = q.take(2, 1.0)
        before = rds.xlen(keys.stream)
        q.hand_back(first)
        q.hand_back(first)  # a retry after a lost reply
        assert rds.xlen(keys.stream) == before  # one entry removed, one re-added
        q._dead_letter(second.ref, second.msg.id, "test", 2)
        q._dead_letter(second.ref, second.msg.id, "test", 2)
        assert rds.xlen(keys.dead) == 1
    finally:
        q.close()
