"""bench/kv_sizing.py counts what the engine counts: its token_budget units are `Engine.kv_tokens`, its KV
slots are the pool rows `prepare` allocates, and its bytes per token are the pool's."""

import json

import pytest
from PIL import Image

from bench.kv_sizing import PROMPT, TASKS, grown_capacity, job_size, main
from engine.loading import load_engine
from engine.tiny import make_checkpoint
from engine.types import GenerationRequest, SamplingParams


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("sizing") / "ckpt", "tiny", seed=0)
    return load_engine(ckpt, device="cpu")


@pytest.mark.parametrize("side", [64, 128])
@pytest.mark.parametrize("task", TASKS)
def test_job_size_matches_the_engine(engine, task, side):
    pool = engine.weights_for(task).pool
    per_token = engine.cfg.llm.num_hidden_layers * 2 * pool.k[0, 0].numel() * pool.k.element_size()
    size = job_size(task, side, engine.cfg, engine.tokenizer, per_token)
    image = Image.new("RGB", (side, side)) if task != "generate" else None
    req = engine.validate(
        GenerationRequest(task, PROMPT, image, SamplingParams.for_task(task), seed=0, height=side, width=side)
    )
    assert size.budget_tokens == engine.kv_tokens(req)
    [state] = engine.prepare([req])
    try:
        assert state.alloc[1] == size.kv_slots  # the planner's slots are what prepare allocates
        assert size.latents == state.x.shape[0]
    finally:
        engine.release(state)
    assert size.kv_bytes == size.kv_slots * per_token


def test_grown_capacity_follows_the_pool():
    # The pool grows to max(2 x capacity, capacity + request) until the request fits.
    assert grown_capacity(100) == 4096
    assert grown_capacity(4097) == 4096 + 4097
    assert grown_capacity(3000, start=1000) == 4000


def test_main_writes_the_figures(engine, tmp_path):
    out = tmp_path / "sizing.json"
    args = ["--model", engine.info()["model_dir"], "--dtype", "float32", "--sizes", "64", "128"]
    result = main([*args, "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [(j["task"], j["side"]) for j in result["jobs"]] == [(t, s) for s in (64, 128) for t in TASKS]
    assert (
        result["kv_bytes_per_token"] == engine.cfg.llm.num_hidden_layers * 2 * 2 * 16 * 4
    )  # tiny: 2 KV heads x 16


def test_measured_run_is_decomposed(engine, tmp_path):
    """--measured splits a benchmark's peak into weights, KV pools (as they grew) and activations."""
    measured = tmp_path / "m.json"
    peak = 1.0
    measured.write_text(
        json.dumps(
            {"device": "cpu", "date": "x", "size": 64, "jobs": 2, "weight_sets": 2, "peak_gpu_mem_gb": peak}
        )
    )
    r = main(["--model", engine.info()["model_dir"], "--sizes", "64", "--measured", str(measured)])
    m = r["measured"]
    job = job_size("refine", 64, engine.cfg, engine.tokenizer, r["kv_bytes_per_token"])
    pools = (grown_capacity(job.kv_slots, jobs=2) + 4096) * r["kv_bytes_per_token"] / 2**30
    weights = (2 * r["params_per_weight_set"] + r["params_autoencoder"]) * 2 / 2**30  # bf16 (the default)
    assert m["kv_pool_gib"] == pytest.approx(pools)
    assert m["activations_gib"] == pytest.approx(peak - weights - pools)
    assert m["bytes_per_row"] == pytest.approx(m["activations_gib"] * 2**30 / (2 * job.query_rows))
