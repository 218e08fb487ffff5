"""The inductor backend (torch.compile of the per-token blocks) on a tiny engine, CPU (gcc codegen)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from engine.backends import get_backend
from engine.backends.inductor import _CompiledBlock
from tests.engine.backends.conftest import fresh_engine, run_refine


@pytest.mark.slow
def test_inductor_refine_matches_eager(tiny_ckpt, eager_latents):
    engine = fresh_engine(tiny_ckpt, "inductor")
    layers = [layer for ws in engine.weight_sets.values() for layer in ws.model.llm.layers]
    assert all(
        isinstance(vars(layer)[b], _CompiledBlock)
        for layer in layers
        for b in ("pre_attention", "post_attention")
    )
    first = vars(layers[0])["pre_attention"]
    get_backend("inductor").attach(engine)  # idempotent: no double wrapping
    assert vars(layers[0])["pre_attention"] is first

    graphs = counters["stats"]["unique_graphs"]
    latents = run_refine(engine)
    # Regional compilation: one graph per (block, expert), shared by every layer of both weight sets.
    assert counters["stats"]["unique_graphs"] - graphs <= 4
    assert torch.isfinite(latents).all()
    assert ((latents - eager_latents).abs().max() / eager_latents.abs().max()).item() < 1e-5
