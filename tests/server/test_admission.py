"""Admission, deadlines, auth and cross-replica resume through real HTTP."""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server.app import create_app
from tests.server.server_testutil import LONG, LiveServer, poll, read_sse, refine_multipart, wait_until

pytestmark = pytest.mark.xdist_group("server-admission")

BACKENDS = ["memory", pytest.param("redis", marks=pytest.mark.redis)]


def step_of(client, job_id) -> int:
    return client.get(f"/v1/jobs/{job_id}").json().get("step", 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overload_rejects_exactly_k(make_stack, backend):
    """Capacity C=2 running, queue limit Q=3: of C+Q+k jobs exactly k get 503 with a Retry-After."""
    capacity, limit, k = 2, 3, 2
    stack = make_stack(backend, max_batch_jobs=capacity, max_queue_depth=limit)
    with stack.client() as client:
        running = [refine_multipart(client, steps=LONG, rounds=8).json()["id"] for _ in range(capacity)]
        for job in running:
            wait_until(lambda j=job: step_of(client, j) >= 1, 60, what="capacity busy")
        with ThreadPoolExecutor(limit + k) as pool:  # concurrent: the gate must be atomic
            answers = list(pool.map(lambda _: refine_multipart(client, steps=2), range(limit + k)))
        codes = sorted(r.status_code for r in answers)
        assert codes == [202] * limit + [503] * k
        for r in answers:
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "overloaded"
                assert 1 <= int(r.headers["retry-after"]) <= 60
        queued = [r.json() for r in answers if r.status_code == 202]
        assert sorted(q["position"] for q in queued) == list(range(limit)), queued
        # queued jobs first: cancelling a running job first frees a slot, and a 2-step job admitted into
        # it could finish before its own cancel arrives
        for job in [q["id"] for q in queued] + running:
            client.delete(f"/v1/jobs/{job}")
        for q in queued:
            assert poll(client, q["id"], {"cancelled", "succeeded"})["status"] == "cancelled"


@pytest.mark.parametrize("backend", BACKENDS)
def test_deadline_passed_in_queue_gives_504_and_never_runs(make_stack, backend):
    stack = make_stack(backend, max_batch_jobs=1)
    with stack.client() as client:
        blocker = refine_multipart(client, steps=LONG, rounds=8).json()["id"]
        wait_until(lambda: step_of(client, blocker) >= 1, 60, what="blocker running")
        with ThreadPoolExecutor(1) as pool:
            body = {"prompt": "late", "steps": 3, "deadline_s": 0.3}
            waiter = pool.submit(client.post, "/v1/generate", json=body, headers={"Prefer": "wait"})
            time.sleep(0.6)
            client.delete(f"/v1/jobs/{blocker}")  # frees the slot; the late job is past its deadline
            r = waiter.result(timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "queue_timeout"
        job = r.json()["error"]["job_id"]
        view = client.get(f"/v1/jobs/{job}").json()
        assert view["status"] == "failed" and "step" not in view  # never reached the engine
        assert client.get(f"/v1/jobs/{job}/result").status_code == 504


def test_a_deadline_the_queue_cannot_meet_is_refused_at_once(make_stack):
    stack = make_stack("memory")
    with stack.client() as client:
        r = client.post("/v1/generate", json={"prompt": "x", "steps": 3}, headers={"Prefer": "wait"})
        assert r.status_code == 200
        wait_until(lambda: stack.rt.queue._stats is not None and stack.rt.queue._stats.job_s > 0, 10)
        # The measured job time is far above 1 ms: the job could only expire in the queue.
        r = client.post("/v1/generate", json={"prompt": "x", "steps": 3, "deadline_s": 0.001})
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        assert int(r.headers["retry-after"]) >= 1
        assert (
            client.post("/v1/generate", json={"prompt": "x", "steps": 3, "deadline_s": 60}).status_code == 202
        )


def test_a_waiting_caller_who_leaves_cancels_the_job(make_stack):
    stack = make_stack("memory")
    with stack.client() as client, httpx.Client(base_url=stack.url, timeout=1.5) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/generate", json={"prompt": "slow", "steps": LONG}, headers={"Prefer": "wait"})
        jobs = [e for e in stack.rt.queue._jobs.values() if e.msg.params.prompt == "slow"]
        assert len(jobs) == 1
        assert poll(client, jobs[0].msg.id, {"cancelled", "succeeded"})["status"] == "cancelled"


def test_auth_bearer_keys(make_stack):
    stack = make_stack(
        "memory",
        api_keys=["first-long-key"],
        api_key_sha256=[hashlib.sha256(b"second-long-key").hexdigest()],
    )
    with stack.client() as client:
        r = client.post("/v1/generate", json={"prompt": "x", "steps": 2})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "unauthorized"
        bad = client.post(
            "/v1/generate", json={"prompt": "x", "steps": 2}, headers={"Authorization": "Bearer nope"}
        )
        assert bad.status_code == 401
        a = {"Authorization": "Bearer first-long-key"}
        b = {"Authorization": "Bearer second-long-key"}
        ok = client.post(
            "/v1/generate", json={"prompt": "x", "steps": 2}, headers={**a, "Idempotency-Key": "same"}
        )
        assert ok.status_code == 202
        assert client.get(f"/v1/jobs/{ok.json()['id']}").status_code == 401
        assert client.get(f"/v1/jobs/{ok.json()['id']}", headers=a).status_code == 200
        # Idempotency keys are scoped per client: the other key's "same" is another job.
        other = client.post(
            "/v1/generate", json={"prompt": "x", "steps": 2}, headers={**b, "Idempotency-Key": "same"}
        )
        assert other.status_code == 202 and other.json()["id"] != ok.json()["id"]
        for path in ("/livez", "/readyz", "/metrics"):
            assert client.get(path).status_code == 200  # probes and metrics stay open
    with httpx.Client(base_url=stack.url, headers=a) as authed:
        poll(authed, ok.json()["id"], {"succeeded"})


@pytest.mark.redis
def test_sse_resumes_on_another_api_replica(make_stack):
    stack = make_stack("redis")
    other = LiveServer(create_app(stack.settings)).start()  # a second API replica, same Redis
    try:
        with stack.client() as a, httpx.Client(base_url=other.url, timeout=60) as b:
            job = refine_multipart(a, steps=10, preview_every=2).json()["id"]
            first = read_sse(a, "GET", f"/v1/jobs/{job}/events", stop_after=3)
            rest = read_sse(b, "GET", f"/v1/jobs/{job}/events", headers={"Last-Event-ID": first[-1]["id"]})
            full = read_sse(b, "GET", f"/v1/jobs/{job}/events")
            assert [e["id"] for e in first + rest] == [e["id"] for e in full]
            assert full[-1]["event"] == "completed"
    finally:
        other.stop()
