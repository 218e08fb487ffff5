"""The exported DenoiseStep: torch.export with dynamic N and P, and parity with the engine's packed step."""

from __future__ import annotations

import pytest
import torch

from engine.backends import ShapeBucket
from engine.backends.branchwise import BucketedStep, PrebuiltBranchwiseBackend, branchwise_denoiser
from engine.backends.export import (
    DenoiseStep,
    branch_inputs,
    export_denoise_step,
    forbidden_aten_ops,
)
from engine.core import Engine
from tests.engine.backends.conftest import BUCKET_ARGS, IndexRouted, fresh_engine, refine_request, run_refine

BRANCHES = ("gen", "cfg_text", "cfg_img")  # the engine packs a request's branches in this order


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def exported(step_module):
    return export_denoise_step(step_module, ShapeBucket(*BUCKET_ARGS))


def test_export_has_dynamic_n_and_p_and_static_routing(exported):
    vals = {n.name: n.meta["val"] for n in exported.graph.nodes if n.op == "placeholder"}
    x, ids, past_k = vals["x"], vals["latent_ids"], vals["past_k"]
    # N (shared by x and latent_ids) and P are symbols; everything else is static.
    assert isinstance(x.shape[0], torch.SymInt) and str(x.shape[0]) == str(ids.shape[0])
    assert isinstance(past_k.shape[1], torch.SymInt) and isinstance(past_k.shape[0], int)
    assert forbidden_aten_ops(exported) == {}


def test_forbidden_aten_guard_sees_index_routing():
    program = torch.export.export(IndexRouted(), (torch.randn(6, 3), torch.tensor([1, 2, 3])))
    assert forbidden_aten_ops(program) == {"index_put_": 1}


@pytest.mark.parametrize("n, p", [(24, 68), (1, 1), (7, 5), (64, 256), (33, 129)])
def test_exported_matches_eager_at_unseen_shapes(step_module, exported, n, p):
    inputs = step_module.example_inputs(n, p, seed=n + p)
    with torch.no_grad():
        expected = step_module(*inputs)
        got = exported.module()(*inputs)
    assert got.shape == (n, step_module.latent_channels) and got.dtype == torch.float32
    assert _rel(got, expected) < 1e-5


def test_exported_rejects_shapes_outside_the_bucket(step_module, exported):
    with pytest.raises(Exception, match="<= 64"):  # guard error type varies across torch versions
        exported.module()(*step_module.example_inputs(65, 8))


def test_denoise_step_equals_engine_packed_step(tiny_ckpt):
    """Every CFG branch of a real refine request: the engine's packed forward vs DenoiseStep on its cache."""
    engine = fresh_engine(tiny_ckpt)
    [state] = engine.prepare([refine_request()])
    step = DenoiseStep.from_engine(engine, state.weights.name)
    # Denoising never writes the pool, so the context K/V read here are the ones the packed step uses.
    with torch.no_grad():
        expected = [step(*branch_inputs(state, b)) for b in BRANCHES]
    assert branch_inputs(state, "gen")[3].shape == (2, state.contexts["gen"].length, 2, 16)
    model = state.weights.model
    velocity, captured = model.velocity, []
    model.velocity = lambda h: captured.append(velocity(h)) or captured[-1]  # instance attr: this engine only
    engine.step([state])
    engine.release(state)
    n = state.x.shape[0]
    [packed] = captured
    assert packed.shape == (len(BRANCHES) * n, step.latent_channels)  # refine runs all three branches
    for i, want in enumerate(expected):
        assert _rel(want, packed[i * n : (i + 1) * n]) < 1e-5, BRANCHES[i]
    # The branches see different contexts, so the comparison is not vacuous.
    assert _rel(expected[0], expected[1]) > 1e-2


def test_branchwise_engine_with_exported_steps_equals_packed(tiny_ckpt, exported, eager_latents):
    """The path the tensorrt backend takes (bucketed per-branch modules), here with exported programs."""
    bucket, small = ShapeBucket(*BUCKET_ARGS), ShapeBucket((1, 8, 8), BUCKET_ARGS[1])

    def steps(engine):
        out = {}
        for name in engine.weight_sets:
            step = DenoiseStep.from_engine(engine, name)
            # Refine runs rvr with N = 24: the exported program's bucket; the eager step holds the small one.
            out[name] = BucketedStep({small: step, bucket: exported.module() if name == "rvr" else step})
        return out

    base = fresh_engine(tiny_ckpt)
    engine = Engine(
        base.cfg,
        base.tokenizer,
        {name: ws.model for name, ws in base.weight_sets.items()},
        base.vae,
        base.device,
        base.dtype,
        attention="reference",
        backend=PrebuiltBranchwiseBackend(steps),
    )
    latents = run_refine(engine)
    assert _rel(latents, eager_latents) < 1e-5
    with pytest.raises(ValueError, match="no step function"):
        branchwise_denoiser(engine, {"rvr": steps(engine)["rvr"]})
