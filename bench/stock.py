"""The baseline every speed ratio refers to: our model code run the way the released inferencer runs it.

BAGEL's `InterleaveInferencer` (docs/model.md §4, docs/rvr.md §3) prefills each CFG context on its
own (deep-copied contexts: no prefix sharing), one forward per text segment and per image block, and at
each denoising step runs every CFG branch as its own forward over [the branch's cached K/V ++ the query
block's K/V], concatenated per call. Attention here is `F.scaled_dot_product_attention` with its default
dispatch (cuDNN / flash on Hopper); text segments, causal and bottom-right aligned against their cache,
pass an explicit boolean mask (SDPA's `is_causal` is top-left aligned), as a PyTorch user would write it.
The modules, weights and KV pool are the engine's, unfused and eager; nothing is packed.

    engine = Engine(cfg, tok, weights, vae, device, dtype, backend=StockBackend())
    state = stock_prepare(engine, request)      # per-context, per-segment prefill
    while not state.done: engine.step([state])  # one forward per CFG branch
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from engine.backends.base import PYTORCH_CAPABILITIES, Backend, Capabilities
from engine.contexts import ContextRange, plan_contexts
from engine.denoise import BranchPlan, velocities_by_branch
from engine.model.packing import RowPacker
from engine.prefill import pack_nodes, vit_embeddings
from engine.preprocess import latent_position_ids
from engine.requests import context_image
from engine.sampler import Velocities, schedule
from kernels import AttentionLayout, Segment, SequenceSpec

if TYPE_CHECKING:
    from engine.core import Engine, RequestState, WeightSet
    from engine.types import GenerationRequest


def stock_attention(q, k, v, k_cache, v_cache, layout: AttentionLayout) -> torch.Tensor:
    """Per sequence: SDPA over cat(its cache range, its own keys); a mask only where rows see fewer keys."""
    out = torch.empty_like(q)
    cu, cache_start, cache_len = layout.host
    gqa = q.shape[1] != k.shape[1]
    for i in range(layout.num_seqs):
        s, e, c0, n = cu[i], cu[i + 1], cache_start[i], cache_len[i]
        kb = torch.cat([k_cache[c0 : c0 + n], k[s:e]]).transpose(0, 1)[None]  # (1, Hkv, S, D)
        vb = torch.cat([v_cache[c0 : c0 + n], v[s:e]]).transpose(0, 1)[None]
        qb = q[s:e].transpose(0, 1)[None]
        mask = None
        if not layout.full_blocks:
            visible = layout.kv_end[s:e].long() + n  # keys each row sees
            mask = torch.arange(n + e - s, device=q.device)[None, :] < visible[:, None]
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=gqa)
        out[s:e] = ob[0].transpose(0, 1)
    return out


class StockDenoiser:
    """Every CFG branch of every request as its own forward (the released `_forward_flow` loop)."""

    def __init__(self, marker_ids: torch.Tensor) -> None:
        self.marker_ids = marker_ids

    def velocities(self, weights: WeightSet, plans: list[BranchPlan]) -> list[Velocities]:
        model = weights.model
        device = self.marker_ids.device
        markers = model.embed_tokens(self.marker_ids)
        out = []
        for plan in plans:
            s = plan.state
            n = s.x.shape[0]
            per_branch = {}
            for branch in plan.branches:
                ctx = s.contexts[branch]
                latents = model.embed_latents(s.x, torch.full((n,), plan.t, device=device), s.latent_ids)
                packer = RowPacker()
                packer.add(markers[:1], ctx.rope, gen=False)
                packer.add(latents, ctx.rope, gen=True)
                packer.add(markers[1:], ctx.rope, gen=False)
                packer.sequences.append(SequenceSpec((Segment(n + 2, causal=False),), ctx.offset, ctx.length))
                embeds, batch = packer.build(device)
                _, h_gen = model.llm(embeds, batch, weights.pool.layers(), stock_attention)
                per_branch[branch] = model.velocity(h_gen)
            out.append(velocities_by_branch(plan, per_branch))
        return out


class StockBackend(Backend):
    name = "stock"

    def capabilities(self) -> Capabilities:
        return PYTORCH_CAPABILITIES

    def attach(self, engine: Engine) -> StockDenoiser:
        return StockDenoiser(engine._marker_ids)


@torch.inference_mode()
def stock_prepare(engine: Engine, request: GenerationRequest) -> RequestState:
    """Prefill one refine or generate request the released way: each context alone, one forward per
    segment over the segments before it. Returns a state `engine.step` advances (with StockBackend)."""
    from engine.core import RequestState

    req = engine.validate(request)
    if req.task not in ("refine", "generate"):
        raise ValueError(f"stock_prepare covers refine and generate, not {req.task}")
    ws, cfg, device = engine.weights_for(req.task), engine.cfg, engine.device
    model = ws.model
    image = context_image(req.image, cfg) if req.image is not None else None
    vit = {"input": vit_embeddings(model, cfg, [image])[0]} if image is not None else {}
    plans = {name: plan_contexts({name: segs}) for name, segs in engine._contexts(req).items()}
    total = sum(p.total_slots for p in plans.values())
    start = ws.pool.allocate(total)
    markers = model.embed_tokens(engine._marker_ids)
    contexts, offset = {}, start
    for name, plan in plans.items():
        ctx = plan.contexts[name]
        done = 0
        for seq in plan.sequences:
            for node in seq.nodes:
                node.offset += offset
                packer = RowPacker()
                segments = pack_nodes(model, packer, [node], markers, vit, {}, write=True)
                packer.sequences.append(SequenceSpec(tuple(segments), offset, done))
                embeds, batch = packer.build(device)
                model.llm(embeds, batch, ws.pool.layers(), stock_attention)
                done += node.segment.kv_len
        contexts[name] = ContextRange(offset + ctx.offset, ctx.length, ctx.rope)
        offset += plan.total_slots
    generator = torch.Generator(device="cpu").manual_seed(req.seed)
    d = cfg.latent_downsample
    h, w = req.height // d, req.width // d
    x = torch.randn(h * w, cfg.latent_channels, generator=generator)
    timesteps, dts = schedule(req.params.steps, req.params.shift)
    return RequestState(
        request=req,
        weights=ws,
        generator=generator,
        grid=(h, w),
        alloc=(start, total),
        contexts=contexts,
        x=x.to(device),
        latent_ids=latent_position_ids(h, w, cfg.max_latent_size).to(device),
        timesteps=timesteps,
        dts=dts,
    )
