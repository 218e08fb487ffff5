"""The exact mode's model changes on CPU: concatenated projections keep the checkpoint's names and values,
and the fused-ops path computes what the unfused layer computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import GenerationRequest, SamplingParams, load_engine
from engine.config import LLMConfig
from engine.model.bagel import Bagel
from engine.model.llm import DecoderLayer
from engine.model.packing import Routing
from engine.tiny import preset


@pytest.fixture(scope="module")
def cfg():
    return preset("tiny", vocab_size=128)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_fused_projections_keep_checkpoint_keys_and_values(cfg):
    torch.manual_seed(0)
    model = Bagel(cfg)
    before = _state(model)
    model.llm.fuse_projections()
    layer = model.llm.layers[0]
    assert hasattr(layer.self_attn, "qkv_proj_moe_gen") and not hasattr(layer.self_attn, "q_proj")
    assert hasattr(layer.mlp, "gate_up_proj") and not hasattr(layer.mlp, "up_proj")
    after = model.state_dict()
    assert list(sorted(after)) == list(sorted(before))
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    # An unfused model loads the fused model's state dict, and a fused one loads an official state dict.
    fresh = Bagel(cfg)
    fresh.load_state_dict(after)
    fused_fresh = Bagel(cfg)
    fused_fresh.llm.fuse_projections()
    fused_fresh.load_state_dict(before)
    for k, v in before.items():
        assert torch.equal(fresh.state_dict()[k], v) and torch.equal(fused_fresh.state_dict()[k], v), k
    model.llm.fuse_projections()  # idempotent
    assert list(sorted(model.state_dict())) == list(sorted(before))


def _layer_inputs(llm_cfg: LLMConfig, seed=0):
    g = torch.Generator().manual_seed(seed)
    tu, tg = 5, 9
    h_und = torch.randn(tu, llm_cfg.hidden_size, generator=g)
    h_gen = torch.randn(tg, llm_cfg.hidden_size, generator=g)
    routing = Routing.from_runs([(False, 1), (True, 4), (False, 3), (True, 5), (False, 1)])
    pos = torch.randint(0, 50, (tu + tg,), generator=g)
    return h_und, h_gen, routing, pos


@pytest.mark.parametrize("fuse_projections", [False, True])
def test_fused_ops_path_equals_the_layer_as_written(cfg, fuse_projections):
    torch.manual_seed(1)
    model = Bagel(cfg)
    for p in model.parameters():  # non-trivial norm weights and biases
        p.data.add_(torch.randn_like(p) * 0.05)
    llm, layer = model.llm, model.llm.layers[0]
    h_und, h_gen, routing, pos = _layer_inputs(cfg.llm)
    rope = llm.rotary_emb(pos)
    with torch.no_grad():
        ref_q, ref_k, ref_v = layer.attention_inputs(h_und, h_gen, routing, rope)
        o = torch.randn(ref_q.shape)
        ref_out = layer.attention_outputs(h_und, h_gen, o, routing)
        if fuse_projections:
            llm.fuse_projections()
        llm.use_fused_ops(True)
        q, k, v = layer.attention_inputs(h_und, h_gen, routing, rope)
        out = layer.attention_outputs(h_und, h_gen, o, routing)
    tol = {"rtol": 1e-6, "atol": 1e-6}
    for a, b in ((q, ref_q), (k, ref_k), (v, ref_v), *zip(out, ref_out, strict=True)):
        torch.testing.assert_close(a, b, **tol)


def test_pre_attention_contract_survives_fusion(cfg):
    """The exported DenoiseStep and inductor wrap `pre_attention`: unchanged by fused projections."""
    torch.manual_seed(2)
    layer = DecoderLayer(cfg.llm)
    h = torch.randn(6, cfg.llm.hidden_size)
    with torch.no_grad():
        ref = layer.pre_attention(h, gen=True)
        layer.self_attn.fuse_projections()
        got = layer.pre_attention(h, gen=True)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fused_kernels", [None, True], ids=["default", "fused-ops"])
def test_exact_engine_matches_eager_on_cpu(tiny_ckpt, fused_kernels):
    exact = load_engine(tiny_ckpt, device="cpu", backend_options={"fused_kernels": fused_kernels})
    eager = load_engine(tiny_ckpt, device="cpu", backend="eager")
    assert exact.backend.name == "exact" and eager.backend.name == "eager"
    assert exact.weight_sets["rvr"].model.llm.fused_ops == bool(fused_kernels)  # default: on CUDA only
    assert hasattr(exact.weight_sets["rvr"].model.llm.layers[0].mlp, "gate_up_proj")
    img = np.random.RandomState(0).rand(48, 64, 3)
    from PIL import Image

    image = Image.fromarray((img * 255).astype("uint8"))
    reqs = [
        GenerationRequest("refine", "a red cup", image, SamplingParams.for_task("refine", steps=4), seed=1),
        GenerationRequest(
            "generate", "a ball", None, SamplingParams.for_task("generate", steps=4), 2, 32, 48
        ),
    ]
    finals = []
    for engine in (exact, eager):
        states = engine.prepare(reqs)
        while not all(s.done for s in states):
            engine.step(states)
        finals.append([s.x.clone() for s in states])
        for s in states:
            engine.release(s)
    for a, b in zip(*finals, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
