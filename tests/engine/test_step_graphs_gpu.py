"""CUDA-graph replay of the denoising step on a GPU: replayed steps equal the same engine's eager steps.

The tiny checkpoint on CUDA, exact backend, declared buckets captured by `warm_up`; the same requests run
through the engine's eager fallback (the packed forward) and through the graphs. float32 (TF32 off) must
agree to float32 rounding; bf16 to bf16 rounding (padding changes GEMM shapes, so cuBLAS may pick other
kernels).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine import GenerationRequest, SamplingParams, load_engine
from engine.step import GraphDenoiser

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _image(w, h, seed):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


REQUESTS = [
    GenerationRequest(
        "refine", "a red cup", _image(64, 64, 0), SamplingParams.for_task("refine", steps=5), seed=1
    ),
    GenerationRequest(
        "refine", "a cat", _image(32, 32, 1), SamplingParams.for_task("refine", steps=5), seed=2
    ),
]


def _final(engine, reqs):
    states = engine.prepare(reqs)
    while not all(s.done for s in states):
        engine.step(states)
    out = [s.x.float().cpu() for s in states]
    for s in states:
        engine.release(s)
    return out


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_replay_equals_eager(tiny_ckpt, dtype, tol):
    torch.backends.cuda.matmul.allow_tf32 = False
    # 64^2 refine: 3 x 16 latents; both refines: 6 branches, 60 rows (two pad branches in 8x9).
    engine = load_engine(
        tiny_ckpt,
        device="cuda",
        dtype=dtype,
        backend_options={"graph_buckets": ("3x16", "8x9"), "max_padding": 0.5},
    )
    graphs = engine.denoiser
    assert isinstance(graphs, GraphDenoiser)
    eager = {
        k: _final_with(engine, graphs.fallback, r) for k, r in (("one", REQUESTS[:1]), ("two", REQUESTS))
    }
    assert engine.warm_up() == {"rvr": ["3x16", "8x9"], "ema": ["3x16", "8x9"]}
    replayed = {"one": _final(engine, REQUESTS[:1]), "two": _final(engine, REQUESTS)}
    assert graphs.replays == 8 and graphs.fallbacks == 0, (graphs.replays, graphs.fallbacks)
    for key, xs in eager.items():
        for a, b in zip(replayed[key], xs, strict=True):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _final_with(engine, denoiser, reqs):
    saved = engine._denoiser
    engine._denoiser = denoiser
    try:
        return _final(engine, reqs)
    finally:
        engine._denoiser = saved
