"""API hardening (issue 17) through real HTTP: replays under load, hostile bodies, EXIF orientation,
SSE resume after the end, a dead in-process worker, and body parsing off the event loop."""

from __future__ import annotations

import pytest

from tests.server.server_testutil import LONG, poll, refine_multipart, wait_until

pytestmark = pytest.mark.xdist_group("server-api-hardening")

BACKENDS = ["memory", pytest.param("redis", marks=pytest.mark.redis)]


def step_of(client, job_id) -> int:
    return client.get(f"/v1/jobs/{job_id}").json().get("step", 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_replay_of_an_accepted_job_is_answered_when_the_queue_is_full(make_stack, backend):
    """Item 12: the Idempotency-Key lookup comes before the queue-full check."""
    stack = make_stack(backend, max_batch_jobs=1, max_queue_depth=1)
    with stack.client() as client:
        blocker = refine_multipart(client, steps=LONG, rounds=8).json()["id"]
        wait_until(lambda: step_of(client, blocker) >= 1, 60, what="blocker running")
        body = {"prompt": "replayed", "steps": 2}
        first = client.post("/v1/generate", json=body, headers={"Idempotency-Key": "k1"})
        assert first.status_code == 202, first.text
        # The queue is full now: a new job is refused, the replay gets its job back.
        other = client.post("/v1/generate", json={"prompt": "new", "steps": 2})
        assert other.status_code == 503 and other.json()["error"]["code"] == "overloaded"
        replay = client.post("/v1/generate", json=body, headers={"Idempotency-Key": "k1"})
        assert replay.status_code == 202, replay.text
        assert replay.json()["id"] == first.json()["id"]
        # A changed payload under the same key is still a conflict, not a 503.
        changed = client.post(
            "/v1/generate", json={**body, "prompt": "other"}, headers={"Idempotency-Key": "k1"}
        )
        assert changed.status_code == 422 and changed.json()["error"]["code"] == "idempotency_conflict"
        for job in (first.json()["id"], blocker):
            client.delete(f"/v1/jobs/{job}")
        poll(client, first.json()["id"], {"cancelled", "succeeded"})


@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_deeply_nested_json_is_a_4xx(make_stack, opener):
    """Item 14: 100000 nested containers raise RecursionError in json.loads; that is bad input."""
    stack = make_stack("memory")
    with stack.client() as client:
        body = (opener * 100_000).encode()
        for path in ("/v1/refine", "/v1/generate", "/v1/images/generations"):
            r = client.post(path, content=body, headers={"Content-Type": "application/json"})
            assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:200])
            assert r.json()["error"]["code"] == "invalid_input", r.text[:200]
        assert client.get("/livez").status_code == 200
