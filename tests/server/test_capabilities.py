"""`GET /v1/info` and submit validation against it: the settings and the loaded model together, published
by the workers (in-process, or through Redis), so nothing accepted fails later for a known limit."""

from __future__ import annotations

import httpx
import pytest

from engine.capabilities import Capabilities
from server.capabilities import service_info
from server.settings import Settings
from tests.server.server_testutil import Stack, stack_settings, wait_until

LONG_PROMPT = " ".join(["apple"] * 40)  # 40+ tokens, 240 characters


def _published(client: httpx.Client) -> dict:
    return wait_until(
        lambda: (i := client.get("/v1/info").json())["workers"] >= 1 and i, 30, what="capabilities"
    )


def test_info_lists_model_and_intersected_limits(make_stack, engine):
    stack = make_stack("memory", max_prompt_tokens=16, max_output_side=2048)
    with stack.client() as client:
        info = _published(client)
    caps = engine.capabilities()
    assert (
        info["model"] == caps.model and info["model_hash"] == caps.model_hash and len(caps.model_hash) == 64
    )
    assert info["tasks"] == ["refine", "generate", "judge"] and info["speed_modes"] == ["exact"]
    assert info["device"] == ["cpu"] and info["dtype"] == ["float32"] and info["weights"] == ["ema", "rvr"]
    limits = info["limits"]
    # the model's largest side (128 for the tiny model), not the setting's 2048
    assert limits["max_side"] == caps.max_side == 128 and limits["side_multiple"] == 16
    assert limits["min_side"] == 16 and limits["max_prompt_tokens"] == 16
    assert limits["max_steps"] == stack.settings.max_steps and limits["max_rounds"] == 8
    assert limits["max_upload_bytes"] == stack.settings.max_upload_bytes
    assert limits["max_image_pixels"] == stack.settings.max_image_pixels


def test_submit_refuses_what_the_model_cannot_make(make_stack):
    stack = make_stack("memory", max_prompt_tokens=16)
    with stack.client() as client:
        _published(client)
        r = client.post("/v1/generate", json={"prompt": "a red ball", "height": 256, "width": 128})
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_input" and err["param"] == "height"
        assert err["limit_name"] == "max_side" and err["limit"] == 128
        assert "128" in err["message"]
        ok = client.post(
            "/v1/generate", json={"prompt": "a red ball", "height": 128, "width": 64, "steps": 2}
        )
        assert ok.status_code == 202, ok.text


def test_prompt_over_the_token_limit_is_refused_at_submit(make_stack):
    stack = make_stack("memory", max_prompt_tokens=16)
    with stack.client() as client:
        _published(client)
        r = client.post("/v1/generate", json={"prompt": LONG_PROMPT, "steps": 2})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_input" and err["param"] == "prompt"
    assert err["limit_name"] == "max_prompt_tokens" and err["limit"] == 16
    assert "tokens" in err["message"]


@pytest.mark.redis
def test_redis_workers_publish_capabilities_and_tokenizer(tiny_model, engine, redis_server):
    """API and worker share only Redis: the API counts tokens with the tokenizer the worker shared."""
    settings = stack_settings("redis", tiny_model, redis_server.url, max_prompt_tokens=16)
    api_only = Stack("memory", settings, None)  # the API side alone: no worker has published yet
    api_only.live.start()
    try:
        with api_only.client() as client:
            info = client.get("/v1/info").json()
            assert info["workers"] == 0 and info["model"] == tiny_model.name
            assert info["limits"]["max_side"] == 2048 and info["limits"]["max_prompt_tokens"] is None
            # accepted: with no worker, only the settings' limits are known (the worker checks the rest)
            queued = client.post("/v1/generate", json={"prompt": "a red ball", "steps": 2})
            assert queued.status_code == 202, queued.text
    finally:
        api_only.live.stop()
    stack = Stack("redis", settings, engine, redis_server.url).start()
    try:
        with stack.client() as client:
            info = _published(client)
            assert info["limits"]["max_side"] == 128 and info["limits"]["max_prompt_tokens"] == 16
            assert info["tokenizer_hashes"] == [engine.capabilities().tokenizer_hash]
            r = client.post("/v1/generate", json={"prompt": LONG_PROMPT, "steps": 2})
            assert r.status_code == 422 and r.json()["error"]["param"] == "prompt", r.text
            r = client.post("/v1/generate", json={"prompt": "a red ball", "height": 144, "steps": 2})
            assert r.status_code == 422 and r.json()["error"]["limit"] == 128, r.text
    finally:
        stack.stop()


def _caps(**kw) -> Capabilities:
    base = dict(
        model="m", model_hash="h", tasks=("refine", "generate", "edit", "judge"), device="cuda:0",
        dtype="bfloat16", weights=("ema", "rvr"), backend="exact", attention="auto",
    )  # fmt: skip
    return Capabilities(**{**base, **kw})


def test_intersection_across_workers():
    s = Settings(max_output_side=2048, output_size_multiple=16, max_steps=200, max_rounds=8)
    a = _caps(max_side=1024, side_multiple=16, speed_modes=("exact", "fast"), max_prompt_tokens=1024)
    b = _caps(
        max_side=1000, side_multiple=40, min_side=40, speed_modes=("exact",), max_rounds=4, device="cuda:1"
    )
    info = service_info(s, [a, b])
    assert info.workers == 2 and info.speed_modes == ["exact"] and info.device == ["cuda:0", "cuda:1"]
    lim = info.limits
    assert lim.side_multiple == 80 and lim.min_side == 80 and lim.max_side == 960  # lcm(16, 40), rounded
    assert lim.max_rounds == 4 and lim.max_steps == 200 and lim.max_prompt_tokens == 1024
    bare = service_info(s, [])
    assert bare.workers == 0 and bare.speed_modes == ["exact"] and bare.limits.max_side == 2048
    assert bare.limits.max_prompt_tokens is None


def test_rvr_info_prints_what_v1_info_serves(tiny_model, capsys):
    import json

    from server.cli import main

    argv = ["info", "--model", str(tiny_model), "--device", "cpu", "--max-prompt-tokens", "16"]
    assert main(argv) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["workers"] == 1 and info["model"] == tiny_model.name
    assert info["limits"]["max_side"] == 128 and info["limits"]["max_prompt_tokens"] == 16


def test_worker_ready_metric_and_startup_line_in_process(make_stack, caplog):
    """`rvr serve` runs the worker in-process: its readiness gauge and its one start-up line are set too."""
    caplog.set_level("INFO", logger="rvr.worker")
    stack = make_stack("memory")
    with stack.client() as client:
        _published(client)
        metrics = client.get("/metrics").text
    assert "rvr_worker_ready 1.0" in metrics
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("engine: model")]
    for part in ("on cpu", "float32", "weights ema+rvr", "backend exact", "attention", "speed modes exact"):
        assert part in line, line
