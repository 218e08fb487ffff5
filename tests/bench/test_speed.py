"""`python -m bench.speed` on the CPU at tiny size: every mode side by side, with ratios and drift."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from bench.speed import MODES, classify, fast_supported, main
from bench.stock import StockBackend, stock_prepare
from engine import GenerationRequest, SamplingParams, load_engine, make_checkpoint
from engine.core import Engine


def test_speed_bench_reports_every_mode(tmp_path):
    out = tmp_path / "speed.json"
    assert main(["--preset", "tiny", "--device", "cpu", "--sizes", "32:3,64:3", "--profile-steps", "1",
                 "--out", str(out)]) == 0  # fmt: skip
    r = json.loads(out.read_text())
    assert set(r["modes"]) == set(MODES)
    rows = {(row["mode"], row["size"]): row for row in r["summary"]}
    assert len(rows) == 2 * len(MODES)
    for size in (32, 64):
        assert rows[("stock", size)]["total_vs_stock"] == 1.0
        for mode in ("stock", "eager", "exact"):
            row = rows[(mode, size)]
            assert row["step_s_median"] > 0 and row["prefill_s"] > 0 and row["total_s"] > 0
            share = row["time_share"]
            assert abs(share["attention"] + share["gemm"] + share["other"] - 1) < 1e-3 and share["gemm"] > 0
        # float32 on CPU: the released structure and the exact mode compute what eager computes
        assert rows[("exact", size)]["drift_vs_eager"]["max_abs"] < 1e-5
        assert rows[("stock", size)]["drift_vs_eager"]["max_abs"] < 1e-5
        if not fast_supported():
            assert rows[("fast", size)]["status"].startswith("not available")
    assert r["modes"]["stock"]["64"]["steps"] == 2 and "final" not in r["modes"]["stock"]["64"]


def test_kernel_names_are_classified():
    assert classify("_mixed_attn_fwd") == "attention"
    assert classify("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    assert classify("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN") == "gemm"
    assert classify("sm90_xmma_gemm_bf16bf16_bf16f32") == "gemm"
    assert classify("_rms_norm_fwd") == "other" and classify("_silu_mul_fwd") == "other"


def test_stock_structure_matches_the_engine(tmp_path):
    """The baseline is honest: per-context, per-segment prefill and one forward per branch compute what the
    packed engine computes (float32)."""
    ckpt = make_checkpoint(tmp_path / "ckpt", "tiny", seed=0)
    eager = load_engine(ckpt, device="cpu", backend="eager", weights="rvr")
    weights = {n: w.model for n, w in eager.weight_sets.items()}
    stock = Engine(
        eager.cfg, eager.tokenizer, weights, eager.vae, eager.device, eager.dtype, backend=StockBackend()
    )
    image = Image.fromarray((np.random.RandomState(0).rand(48, 64, 3) * 255).astype("uint8"))
    req = GenerationRequest("refine", "a red cup", image, SamplingParams.for_task("refine", steps=4), seed=1)
    [a] = eager.prepare([req])
    b = stock_prepare(stock, req)
    for name, ctx in a.contexts.items():
        assert (b.contexts[name].length, b.contexts[name].rope) == (ctx.length, ctx.rope)
        ka = a.weights.pool.k[:, ctx.offset : ctx.offset + ctx.length]
        kb = b.weights.pool.k[:, b.contexts[name].offset : b.contexts[name].offset + ctx.length]
        if name != "cfg_img":  # the engine stores cfg_img as [PROMPT'][SYS]; stock in official order
            torch.testing.assert_close(ka, kb, rtol=1e-5, atol=1e-5)
    while not a.done:
        eager.step([a])
        stock.step([b])
    torch.testing.assert_close(a.x, b.x, rtol=1e-5, atol=1e-5)
