"""What the API says about a job is true: a queued job's ETA counts its steps and rounds, DELETE answers
the state it leaves the job in, a deadline that passes in the queue answers 504 at once, and answers sent
before routing (413) are counted under their route."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.server.server_testutil import LONG, poll, refine_multipart, wait_until

BACKENDS = ["memory", pytest.param("redis", marks=pytest.mark.redis)]


def _running(client, job_id: str) -> None:
    wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json().get("step", 0) >= 1, 60, what="job running")


def test_queued_eta_counts_steps_and_rounds(make_stack):
    stack = make_stack("memory", max_batch_jobs=1)
    q = stack.rt.queue
    with stack.client() as client:
        quick = client.post("/v1/generate", json={"prompt": "x", "steps": 3}, headers={"Prefer": "wait"})
        assert quick.status_code == 200
        blocker = refine_multipart(client, steps=LONG).json()["id"]
        _running(client, blocker)
        wait_until(lambda: q._stats is not None and q._stats.step_s > 0 and q._stats.job_s > 0, 10)
        big = refine_multipart(client, steps=200, rounds=8).json()
        try:
            assert big["status"] == "queued" and big["position"] == 0
            step_s, job_s = q._stats.step_s, q._stats.job_s
            # 199 evaluations x 8 rounds at the measured step time, not one short job's time
            assert big["eta_s"] >= 0.5 * 199 * 8 * step_s and big["eta_s"] > 10 * job_s, (big, step_s, job_s)
        finally:
            client.delete(f"/v1/jobs/{big['id']}")
            client.delete(f"/v1/jobs/{blocker}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_delete_answers_cancelling_for_a_running_job(make_stack, backend):
    stack = make_stack(backend)
    with stack.client() as client:
        job = refine_multipart(client, steps=LONG, rounds=8).json()["id"]
        _running(client, job)
        r = client.delete(f"/v1/jobs/{job}")
        assert r.status_code == 200 and r.json()["status"] == "cancelling", r.json()
        assert "cancel" not in r.json()["links"] and "eta_s" not in r.json()
        assert poll(client, job, {"cancelled", "succeeded", "failed"})["status"] == "cancelled"
        queued = client.post("/v1/generate", json={"prompt": "x", "steps": 3, "deadline_s": 60})
        # a queued (or just taken) job: cancelled at once, or cancelling until the worker drops it
        assert client.delete(f"/v1/jobs/{queued.json()['id']}").json()["status"] in {
            "cancelled",
            "cancelling",
        }


@pytest.mark.parametrize("backend", BACKENDS)
def test_deadline_passing_in_the_queue_answers_504_without_waiting_for_a_slot(make_stack, backend):
    stack = make_stack(backend, max_batch_jobs=1, max_wait_s=20)
    with stack.client() as client:
        blocker = refine_multipart(client, steps=LONG, rounds=8).json()["id"]
        _running(client, blocker)
        t0 = time.monotonic()
        with ThreadPoolExecutor(1) as pool:
            body = {"prompt": "late", "steps": 3, "deadline_s": 0.5}
            r = pool.submit(client.post, "/v1/generate", json=body, headers={"Prefer": "wait"}).result(30)
        waited = time.monotonic() - t0
        assert r.status_code == 504 and r.json()["error"]["code"] == "queue_timeout", r.text
        assert waited < 5, waited  # at the deadline, not when the blocker frees its slot (or max_wait_s)
        assert client.get(f"/v1/jobs/{blocker}").json()["status"] == "running"
        client.delete(f"/v1/jobs/{blocker}")
        late = poll(client, r.json()["error"]["job_id"], {"failed", "succeeded", "cancelled"})
        assert late["status"] == "failed" and late["error"]["code"] == "queue_timeout" and "step" not in late


def test_413_is_counted_under_its_route(make_stack):
    stack = make_stack("memory", max_upload_bytes=2048)
    with stack.client() as client:
        files = {"image": ("in.png", b"\0" * 4096, "image/png")}
        r = client.post("/v1/refine", data={"prompt": "x"}, files=files)
        assert r.status_code == 413
        metrics = client.get("/metrics").text
    assert 'rvr_requests_total{code="413",route="/v1/refine"} 1.0' in metrics, metrics
    assert 'code="413",route="unmatched"' not in metrics
