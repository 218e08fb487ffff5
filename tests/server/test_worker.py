"""The continuous-batching worker, driven tick by tick on the real tiny engine (a spy records the calls)."""

from __future__ import annotations

import asyncio
import io
import time
import uuid

import pytest

from server.queue.base import Delivery
from server.queue.memory import MemoryQueue
from server.schemas import JobMessage, JobParams
from server.settings import Settings
from server.worker import Worker
from tests.server.server_testutil import image_bytes

pytestmark = pytest.mark.xdist_group("server-worker")


class Spy:
    """The real engine, with a record of which jobs each prepare/step call carried; can fail on purpose."""

    def __init__(self, engine, fail_at_step: int | None = None) -> None:
        self.eng = engine
        self.prepared: list[list[str]] = []
        self.steps: list[list[str]] = []
        self.released: list[str] = []
        self.fail_at_step = fail_at_step
        self.device = engine.device

    def __getattr__(self, name):
        return getattr(self.eng, name)

    def prepare(self, reqs):
        self.prepared.append([r.request_id for r in reqs])
        return self.eng.prepare(reqs)

    def step(self, states):
        self.steps.append([s.request.request_id for s in states])
        if self.fail_at_step is not None and len(self.steps) == self.fail_at_step:
            raise RuntimeError("planted failure at 0x7f00deadbeef")
        return self.eng.step(states)

    def release(self, state):
        self.released.append(state.request.request_id)
        return self.eng.release(state)


def make(engine, **overrides):
    settings = Settings(warmup=False, queue_poll_ms=1, heartbeat_interval_s=0.05, **overrides)
    q = MemoryQueue()
    spy = Spy(engine, overrides.pop("fail_at_step", None)) if not isinstance(engine, Spy) else engine
    w = Worker(settings, q, engine=spy)
    w.ready.set()
    return q, w, spy


def submit(q: MemoryQueue, kind="refine", deadline_s=60.0, **params) -> str:
    p = JobParams(prompt=params.pop("prompt", "a red apple"), **params)
    image = _png() if kind == "refine" else None
    msg = JobMessage.new(uuid.uuid4().hex, kind, p, image is not None, deadline_s)
    asyncio.run(q.submit(msg, image, "fp", None, 100))
    return msg.id


def _png(size=(64, 48)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(image_bytes(size))).save(buf, format="PNG")
    return buf.getvalue()


def run_until_idle(w: Worker, limit: int = 500) -> None:
    for _ in range(limit):
        w.tick()
        if w.idle:
            return
    raise AssertionError("worker did not go idle")


def status(q: MemoryQueue, job_id: str) -> dict:
    return q.record(job_id)


def test_expired_job_never_reaches_the_engine(engine):
    q, w, spy = make(engine)
    job = submit(q, steps=3, deadline_s=0.001)
    time.sleep(0.01)
    run_until_idle(w)
    rec = status(q, job)
    assert rec["status"] == "failed" and rec["error_code"] == "queue_timeout"
    assert spy.prepared == [] and spy.steps == []


def test_new_job_joins_at_the_next_step_boundary(engine):
    q, w, spy = make(engine)
    a = submit(q, steps=6)
    w.tick()  # A: prefill + step 1
    b = submit(q, steps=3, prompt="a green pear")
    w.tick()  # B: prefill now; then one packed step for A and B
    assert spy.prepared == [[a], [b]]
    assert spy.steps[:2] == [[a], [a, b]]
    run_until_idle(w)
    assert status(q, a)["status"] == status(q, b)["status"] == "succeeded"
    # B (2 model steps) retired as soon as it finished; A stepped on alone.
    assert [len(s) for s in spy.steps] == [1, 2, 2, 1, 1]


def test_token_budget_bounds_the_batch(engine):
    q, w, _ = make(engine)
    a = submit(q, steps=3)
    msg = JobMessage.new(a, "refine", JobParams(prompt="a red apple"), True, 9)
    kv = w._to_job(Delivery(msg, ref=a)).kv_tokens
    q2, w2, spy2 = make(engine, token_budget=kv + 1)  # room for one job at a time
    a, b = submit(q2, steps=3), submit(q2, steps=3, prompt="a green pear")
    run_until_idle(w2)
    assert spy2.prepared == [[a], [b]]
    assert all(len(s) == 1 for s in spy2.steps)
    assert status(q2, b)["status"] == "succeeded"
    # A job larger than the whole budget fails instead of blocking the queue.
    q3, w3, spy3 = make(engine, token_budget=8)
    c = submit(q3, steps=3)
    run_until_idle(w3)
    assert status(q3, c)["error_code"] == "invalid_input" and spy3.prepared == []


def test_cancel_stops_a_running_job_at_the_step_boundary(engine):
    q, w, spy = make(engine)
    a, b = submit(q, steps=20), submit(q, steps=4, prompt="a green pear")
    w.tick()
    w.tick()
    asyncio.run(q.cancel(a))
    w.tick()  # A released before this tick's step; B steps on
    assert spy.released == [a] and spy.steps[-1] == [b]
    run_until_idle(w)
    assert status(q, a)["status"] == "cancelled" and status(q, b)["status"] == "succeeded"
    assert int(status(q, a)["step"]) == 2


def test_cancelled_while_queued_never_runs(engine):
    q, w, spy = make(engine)
    a = submit(q, steps=3)
    asyncio.run(q.cancel(a))
    run_until_idle(w)
    assert status(q, a)["status"] == "cancelled" and spy.prepared == []


def test_engine_failure_fails_the_batch_with_a_clean_message(engine):
    q, w, _ = make(Spy(engine, fail_at_step=2))
    a, b = submit(q, steps=5), submit(q, steps=5, prompt="a green pear")
    run_until_idle(w)
    for job in (a, b):
        rec = status(q, job)
        assert rec["status"] == "failed" and rec["error_code"] == "generation_failed"
        assert "0x" not in rec["error_message"] and "Traceback" not in rec["error_message"]
    assert w.fatal is None  # on CPU a failed step fails its jobs; the worker goes on
    c = submit(q, steps=3)
    run_until_idle(w)
    assert status(q, c)["status"] == "succeeded"


def test_a_fatal_error_on_a_gpu_stops_the_worker_and_ends_its_jobs(engine):
    """Outside the engine's own error set, on CUDA the device state is unknown: the loop exits. With
    the in-process queue nobody could reclaim the jobs, so they fail instead of hanging."""
    spy = Spy(engine, fail_at_step=2)
    spy.device = "cuda:0"  # the policy keys on the device; the maths still runs on CPU
    q, w, _ = make(spy)
    a, b = submit(q, steps=5), submit(q, steps=5, prompt="a green pear")
    w.tick()
    c = submit(q, steps=5, prompt="a blue cup")  # taken next tick, held or running when it dies
    w.run()
    assert isinstance(w.fatal, RuntimeError) and w.stopped.is_set()
    for job in (a, b):
        assert status(q, job)["error_code"] == "generation_failed"
    assert status(q, c)["status"] == "failed"


def test_rounds_run_back_to_back_and_previews_are_encoded_off_the_loop(engine):
    q, w, _ = make(engine)
    a = submit(q, steps=4, rounds=2, preview_every=1)
    run_until_idle(w)
    rec = status(q, a)
    assert rec["status"] == "succeeded" and rec["round"] == "2"
    events = asyncio.run(q.events(a, None, 0))
    progress = [(e.data["round"], e.data["step"]) for e in events if e.type == "progress"]
    assert progress == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    previews = [e for e in events if e.type == "preview"]
    assert len(previews) == 4 and events[-1].type == "completed"
    assert max(events.index(p) for p in previews) < len(events) - 1  # every preview before completed


def test_judge_jobs(engine):
    q, w, _ = make(engine)
    a = submit(q, kind="refine", steps=3)
    msg = JobMessage.new(uuid.uuid4().hex, "judge", JobParams(prompt="a red apple"), True, 60)
    asyncio.run(q.submit(msg, _png(), "fp", None, 100))
    run_until_idle(w)
    assert 0.0 <= float(status(q, msg.id)["score"]) <= 1.0
    assert status(q, a)["status"] == "succeeded"


def test_drain_finishes_the_batch_and_fails_what_cannot_be_handed_back(engine):
    q, w, _ = make(engine, drain_timeout_s=30)
    a = submit(q, steps=4)
    w.tick()
    b = submit(q, steps=3)  # queued: a draining worker takes no more jobs
    w.stop()
    w.run()
    assert status(q, a)["status"] == "succeeded"
    assert status(q, b)["status"] == "queued"
    q2, w2, _ = make(engine, drain_timeout_s=0)
    c = submit(q2, steps=50)
    w2.tick()
    w2.stop()
    w2.run()
    assert status(q2, c)["error_code"] == "unavailable"  # in-process: nobody to hand it back to


def test_previews_per_round_are_capped(engine):
    q, w, _ = make(engine, max_previews_per_round=3)
    a = submit(q, steps=11, preview_every=1)  # 10 steps: every 1 is raised to every 4
    run_until_idle(w)
    events = asyncio.run(q.events(a, None, 0))
    assert [e.data["step"] for e in events if e.type == "preview"] == [4, 8]


def test_an_internal_value_error_is_not_blamed_on_the_client(engine):
    """Only the engine's InvalidRequestError is the client's fault; any other error, a ValueError from
    deep inside the engine included, is an internal error whose text never reaches the client."""

    class Broken(Spy):
        def prepare(self, reqs):
            raise ValueError("shapes (3, 7) and (5,) at 0x7f00deadbeef do not match")

    q, w, _ = make(Broken(engine))
    a = submit(q, steps=3)
    run_until_idle(w)
    rec = status(q, a)
    assert rec["status"] == "failed" and rec["error_code"] == "generation_failed"
    assert rec["error_message"] == "internal error (ValueError)"
    # A request the engine itself rejects is still the client's fault.
    q2, w2, _ = make(engine)
    b = submit(q2, steps=3, height=4096, width=64)
    run_until_idle(w2)
    assert status(q2, b)["error_code"] == "invalid_input" and "height" in status(q2, b)["error_message"]
