"""Engine vs an official-structure float64 reference (tests/engine/official_reference.py), in float32.

The engine prefills all segments of all contexts in one packed forward with prefix sharing, routes experts
with static slices and runs every CFG branch of every request in one packed forward per step; the
reference does none of that. Agreement to ~1e-5 relative at every stage is what a correct float32
implementation reaches (issue #2); routing markers to the wrong expert or a top-left causal mask breaks it.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from engine import GenerationRequest, SamplingParams, load_engine, make_checkpoint
from engine.prompts import REFINE_SYSTEM_PROMPT
from tests.engine.official_reference import Reference

RTOL = 1e-5


# RVR_TEST_DEVICE=cuda runs the engine under test on the GPU (float32, TF32 off, the Triton kernel);
# the float64 reference always runs on the CPU.
DEVICE = os.environ.get("RVR_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("parity") / "m", "tiny", seed=3)


@pytest.fixture(scope="module")
def engine(checkpoint):
    if DEVICE.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return load_engine(checkpoint, device=DEVICE, dtype="float32", attention="kernel")
    return load_engine(checkpoint, device="cpu", attention="reference")


@pytest.fixture(scope="module")
def ref_engine(engine, checkpoint):
    return (
        engine
        if engine.device.type == "cpu"
        else load_engine(checkpoint, device="cpu", attention="reference")
    )


def _image(seed: int, size=(100, 70)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _context_kv(engine, state, name: str, layer: int, sys_len: int) -> torch.Tensor:
    """K rows of a context in the reference's order (the engine stores cfg_img as [PROMPT'][SYS])."""
    r = state.contexts[name]
    k = state.weights.pool.k[layer, r.offset : r.offset + r.length].cpu()
    if state.request.task == "refine" and name == "cfg_img":
        prompt_len = r.length - sys_len
        k = torch.cat([k[prompt_len:], k[:prompt_len]])
    return k


def _reference_contexts(ref: Reference, req: GenerationRequest):
    gen = torch.Generator().manual_seed(req.seed)
    if req.task == "refine":
        return ref.refine_contexts(req.image, req.prompt), gen
    if req.task == "edit":
        return ref.edit_contexts(req.image, req.prompt, gen), gen
    return ref.generate_contexts(req.prompt), gen


REQUESTS = [
    GenerationRequest(
        "refine",
        "two red circles above a blue square",
        _image(0),
        SamplingParams.for_task("refine", steps=5),
        7,
    ),
    GenerationRequest(
        "edit", "make the square green", _image(1, (60, 90)), SamplingParams.for_task("edit", steps=4), 11
    ),
    GenerationRequest(
        "generate",
        "a yellow star",
        None,
        SamplingParams.for_task("generate", steps=6, cfg_interval=(0.2, 1.0), cfg_img=1.5),
        5,
        48,
        64,
    ),
]


@pytest.mark.parametrize("packed", [False, True], ids=["alone", "packed"])
def test_engine_matches_official_structure(engine, ref_engine, packed):
    requests = REQUESTS
    groups = [requests] if packed else [[r] for r in requests]
    sys_len = len(engine.tokenizer.encode(REFINE_SYSTEM_PROMPT)) + 2
    for group in groups:
        states = engine.prepare(group)
        for state in states:
            req = state.request
            ref = Reference(ref_engine, state.weights.name)
            contexts, generator = _reference_contexts(ref, req)
            # 1. Prefill: every context's kv length, rope and K/V rows at every layer.
            for name, ctx in contexts.items():
                r = state.contexts[name]
                assert (r.length, r.rope) == (ctx.kv_len, ctx.rope), name
                for layer in range(engine.cfg.llm.num_hidden_layers):
                    if ctx.kv_len:
                        err = _rel(_context_kv(engine, state, name, layer, sys_len), ctx.keys[layer])
                        assert err < RTOL, f"{req.task} {name} layer {layer}: K differs by {err:.2e}"
            # 2. Initial noise: the same CPU stream (after the VAE posterior draw for edit).
            h, w = state.grid
            x_init = torch.randn(h * w, engine.cfg.latent_channels, generator=generator)
            assert torch.equal(state.x.cpu(), x_init)
            state.reference = ref.sample(contexts, x_init, h, w, req.params)
        while not all(s.done for s in states):
            engine.step(states)
        for state in states:
            # 3. Final latents and decoded image.
            err = _rel(state.x.cpu(), state.reference)
            assert err < RTOL, f"{state.request.task}: final latents differ by {err:.2e} (relative)"
            out = engine.finish(state)
            ref_img = np.asarray(
                engine._decode(engine._unpatchify(state, state.reference.float())), dtype=int
            )
            assert np.abs(np.asarray(out.image, dtype=int) - ref_img).max() <= 2
        assert all(ws.pool.used == 0 for ws in engine.weight_sets.values())


def test_top_left_causal_mask_would_be_caught(ref_engine):
    """Sanity check of the reference itself: a top-left aligned causal mask changes chunked text KV."""
    engine = ref_engine
    ref = Reference(engine, "rvr")
    ids = [
        engine.tokenizer.bos_id,
        *engine.tokenizer.encode("a blue square left of a red circle"),
        engine.tokenizer.eos_id,
    ]
    x = ref.embed(ids)
    pos = torch.arange(len(ids))
    q = torch.randn(5, ref.hq, ref.d, dtype=torch.float64)
    k = torch.randn(len(ids), ref.hkv, ref.d, dtype=torch.float64)
    bottom_right = ref.attend(q, k, k, causal=True)
    top_left = ref.attend(q, k[:5], k[:5], causal=True)
    assert x.shape[0] == pos.shape[0] > 5
    assert not torch.allclose(bottom_right, top_left)
