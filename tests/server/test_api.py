"""The whole API through real HTTP with the tiny model, once per queue backend (same suite)."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from tests.server.server_testutil import (
    LONG,
    Stack,
    b64,
    image_bytes,
    poll,
    read_sse,
    refine_multipart,
    stack_settings,
    wait_until,
)

pytestmark = pytest.mark.xdist_group("server-api")

BACKENDS = ["memory", pytest.param("redis", marks=pytest.mark.redis)]


@pytest.fixture(scope="module", params=BACKENDS)
def stack(request, tiny_model, engine):
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else None
    s = Stack(request.param, stack_settings(request.param, tiny_model, url), engine, url).start()
    yield s
    s.stop()


@pytest.fixture
def client(stack):
    with stack.client() as c:
        yield c


def test_refine_multipart_async(client):
    r = refine_multipart(client, steps=4, seed=3)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] in ("queued", "running") and r.headers["location"] == f"/v1/jobs/{body['id']}"
    view = poll(client, body["id"], {"succeeded", "failed"})
    assert view["status"] == "succeeded", view
    assert view["seed"] == 3 and view["links"]["result"] == f"/v1/jobs/{body['id']}/result"
    assert set(view["timings"]) >= {"queue_s", "run_s", "total_s"}
    res = client.get(view["links"]["result"])
    assert res.status_code == 200 and res.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(res.content)).size == (64, 48)  # the input's size by the VAE rule


def test_refine_json_wait_mode(client):
    r = client.post(
        "/v1/refine",
        json={"prompt": "a red apple", "image": b64(image_bytes()), "steps": 3, "output_format": "jpeg"},
        headers={"Prefer": "wait"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/jpeg" and r.content[:3] == b"\xff\xd8\xff"
    assert client.get(f"/v1/jobs/{r.headers['x-job-id']}").json()["status"] == "succeeded"


@pytest.mark.parametrize(("fmt", "magic"), [("png", b"\x89PNG"), ("webp", b"RIFF"), ("jpeg", b"\xff\xd8")])
def test_result_formats(client, fmt, magic):
    r = client.post("/v1/generate?wait=true", json={"prompt": "a cat", "steps": 2, "output_format": fmt})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == f"image/{fmt}" and r.content.startswith(magic)
    assert Image.open(io.BytesIO(r.content)).size == (128, 128)  # tiny model's largest side


def test_sse_stream_order(client):
    events = read_sse(
        client,
        "POST",
        "/v1/refine",
        data={"prompt": "a red apple", "steps": "6", "preview_every": "2"},
        files={"image": ("a.png", image_bytes(), "image/png")},
    )
    types = [e["event"] for e in events]
    assert types[0] == "queued" and types[1] == "started" and types[-1] == "completed", types
    progress = [e["data"]["step"] for e in events if e["event"] == "progress"]
    assert progress == [1, 2, 3, 4, 5]
    previews = [e for e in events if e["event"] == "preview"]
    assert [p["data"]["step"] for p in previews] == [2, 4]
    img = Image.open(io.BytesIO(__import__("base64").b64decode(previews[0]["data"]["image"])))
    assert img.format == "JPEG" and max(img.size) <= 256
    ids = [e["id"] for e in events]
    assert len(set(ids)) == len(ids)


def test_sse_resume_with_last_event_id(client):
    r = refine_multipart(client, steps=12, preview_every=3)
    job = r.json()["id"]
    first = read_sse(client, "GET", f"/v1/jobs/{job}/events", stop_after=4)
    assert len(first) == 4
    rest = read_sse(client, "GET", f"/v1/jobs/{job}/events", headers={"Last-Event-ID": first[-1]["id"]})
    full = read_sse(client, "GET", f"/v1/jobs/{job}/events")
    assert [e["id"] for e in first + rest] == [e["id"] for e in full]  # no gap, no duplicate
    assert full[-1]["event"] == "completed"


def test_idempotency_key(client):
    img = image_bytes(color=(1, 2, 3))
    headers = {"Idempotency-Key": f"k-{time.time_ns()}"}
    fields = {"prompt": "a red apple", "steps": "2", "seed": "5"}
    a = client.post("/v1/refine", data=fields, files={"image": ("a.png", img, "image/png")}, headers=headers)
    b = client.post("/v1/refine", data=fields, files={"image": ("b.png", img, "image/png")}, headers=headers)
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] == b.json()["id"]
    changed = {**fields, "seed": "6"}
    c = client.post("/v1/refine", data=changed, files={"image": ("a.png", img, "image/png")}, headers=headers)
    assert c.status_code == 422 and c.json()["error"]["code"] == "idempotency_conflict"
    poll(client, a.json()["id"], {"succeeded"})


def test_cancel_while_running(client):
    job = refine_multipart(client, steps=LONG, rounds=8).json()["id"]
    wait_until(lambda: client.get(f"/v1/jobs/{job}").json().get("step", 0) >= 2, 30, what="running")
    r = client.delete(f"/v1/jobs/{job}")
    assert r.status_code == 200
    view = poll(client, job, {"cancelled", "succeeded", "failed"})
    assert view["status"] == "cancelled" and view["step"] < view["total"]
    events = read_sse(client, "GET", f"/v1/jobs/{job}/events")
    assert events[-1]["event"] == "cancelled"
    assert client.get(f"/v1/jobs/{job}/result").json()["error"]["code"] == "cancelled"


def test_judge_and_generate(client):
    r = client.post(
        "/v1/judge", json={"prompt": "a red apple", "image": b64(image_bytes())}, headers={"Prefer": "wait"}
    )
    assert r.status_code == 200, r.text
    score = r.json()["score"]
    assert 0.0 <= score <= 1.0
    assert client.get(f"/v1/jobs/{r.headers['x-job-id']}").json()["score"] == pytest.approx(score)
    g = client.post("/v1/generate", json={"prompt": "a dog", "steps": 2, "height": 64, "width": 96})
    view = poll(client, g.json()["id"], {"succeeded", "failed"})
    assert view["status"] == "succeeded"
    assert Image.open(io.BytesIO(client.get(f"/v1/jobs/{view['id']}/result").content)).size == (96, 64)


def test_until_score_stops_early_and_reports_the_score(client):
    job = refine_multipart(client, steps=3, rounds=3, until_score=0.0).json()["id"]
    view = poll(client, job, {"succeeded", "failed"})
    assert view["status"] == "succeeded" and view["round"] == 1  # any p(yes) >= 0: accepted after round 1
    assert 0.0 <= view["score"] <= 1.0
    assert client.get(f"/v1/jobs/{job}/result").headers["x-score"] == repr(view["score"])


def test_every_round_reports_its_judge_score(client):
    """until_score = 1.0 is never reached, so all rounds run; each round's p(yes) is kept, in order."""
    job = refine_multipart(client, steps=3, rounds=2, until_score=1.0).json()["id"]
    view = poll(client, job, {"succeeded", "failed"})
    assert view["status"] == "succeeded" and view["round"] == 2
    assert len(view["scores"]) == 2 and all(0.0 <= p < 1.0 for p in view["scores"])
    assert view["score"] == view["scores"][-1]
    completed = [e for e in read_sse(client, "GET", f"/v1/jobs/{job}/events") if e["event"] == "completed"]
    assert completed[0]["data"]["scores"] == view["scores"]


def test_job_status_errors(client):
    assert client.get("/v1/jobs/doesnotexist").status_code == 404
    assert client.get("/v1/jobs/doesnotexist").json()["error"]["code"] == "not_found"
    assert client.delete("/v1/jobs/nope").status_code == 404
    job = refine_multipart(client, steps=LONG, rounds=8).json()["id"]
    r = client.get(f"/v1/jobs/{job}/result")
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_ready"
    assert client.get(f"/v1/jobs/{job}/events", headers={"Last-Event-ID": "x; drop"}).status_code == 400
    client.delete(f"/v1/jobs/{job}")
    poll(client, job, {"cancelled"})


def _batch_vs_alone(client, jobs):
    def submit(j):
        fields = {k: v for k, v in j.items() if k != "size"}
        return refine_multipart(client, image=image_bytes(j["size"], color=(40, 90, 200)), **fields)

    def result(job_id):
        poll(client, job_id, {"succeeded"})
        return np.asarray(Image.open(io.BytesIO(client.get(f"/v1/jobs/{job_id}/result").content)), np.int16)

    together = [submit(j).json()["id"] for j in jobs]
    batched = [result(i) for i in together]
    alone = [result(submit(j).json()["id"]) for j in jobs]
    for a, b in zip(batched, alone, strict=True):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 2  # float32 packing order may move a rounding by a level


def test_batched_equals_one_by_one(client, stack):
    """Jobs of different sizes, steps and CFG settings share a batch and give the images they give alone."""
    _batch_vs_alone(
        client,
        [
            {"prompt": "a red apple", "size": (64, 48), "steps": 6, "seed": 1},
            {"prompt": "two green pears", "size": (32, 96), "steps": 4, "seed": 2, "cfg_text": 2.5},
            {"prompt": "a blue cup", "size": (96, 96), "steps": 5, "seed": 3, "cfg_interval": "0.2,0.9"},
        ],
    )
    packed = stack.worker_metrics().registry.collect()
    rows = [s for m in packed if m.name == "rvr_step_seconds" for s in m.samples if s.name.endswith("_count")]
    # One job packs at most 3 sequences (its CFG branches): 4 or more means jobs shared a step.
    assert any(int(s.labels["sequences"]) >= 4 and s.value > 0 for s in rows)


def test_metrics_and_probes(client, stack):
    assert client.get("/livez").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["backend"] == stack.backend
    text = client.get("/metrics").text
    for name in (
        "rvr_requests_total",
        "rvr_queue_depth",
        "rvr_queue_oldest_wait_seconds",
        "rvr_request_seconds",
    ):
        assert name in text
    if stack.backend == "memory":  # worker metrics live in the same process only here
        for name in (
            "rvr_step_seconds_bucket",
            "rvr_step_batch_rows",
            "rvr_e2e_seconds",
            "rvr_queue_wait_seconds",
        ):
            assert name in text
