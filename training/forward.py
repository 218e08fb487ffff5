"""Training forward of the engine's `Bagel` on a packed batch: dense boolean mask + SDPA, MSE and CE losses.

The engine's LLM takes its attention as a callable; training passes one that applies the packed batch's
dense mask with `scaled_dot_product_attention` (simple and exact on CPU; the mask is O(T²) memory, fine
for the small world and for short sequences on GPU). No KV cache is read or written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.bagel import Bagel
from engine.model.packing import ForwardBatch, Routing
from training.packing import PackedBatch, routing_runs


def dense_attention(mask: torch.Tensor):
    """An `AttentionFn` for the LLM layers that ignores caches and applies `mask` (T, T) bool."""

    def attend(q, k, v, k_cache, v_cache, layout) -> torch.Tensor:
        # q: (T, Hq, D); k, v: (T, Hkv, D) -> out (T, Hq, D)
        rep = q.shape[1] // k.shape[1]
        qh = q.transpose(0, 1)  # (Hq, T, D)
        kh = k.repeat_interleave(rep, dim=1).transpose(0, 1)  # (Hq, T, D): GQA by repetition
        vh = v.repeat_interleave(rep, dim=1).transpose(0, 1)
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask).transpose(0, 1)

    return attend


@dataclass
class ForwardOut:
    velocity: torch.Tensor  # (Nn, C) predicted velocity of every noised latent token (context ones left out)
    target: torch.Tensor  # (Nn, C) eps - x0
    logits: torch.Tensor  # (Nc, vocab) at the CE rows
    labels: torch.Tensor  # (Nc,)


def forward(model: Bagel, batch: PackedBatch) -> ForwardOut:
    """Embed the packed rows, run the MoT LLM with the training mask, read velocity and CE logits."""
    dev = next(model.parameters()).device
    dtype = model.vae2llm.weight.dtype
    b = batch
    embeds = torch.zeros(b.num_rows, model.config.llm.hidden_size, device=dev, dtype=dtype)  # (T, hidden)
    embeds = embeds.index_put((b.text_rows.to(dev),), model.embed_tokens(b.text_ids.to(dev)).to(dtype))
    if b.vit_rows.numel():
        vit = model.embed_vit(
            b.vit_patches.to(dev, dtype), b.vit_position_ids.to(dev), b.vit_cu_seqlens
        )  # (Nv, hidden)
        embeds = embeds.index_put((b.vit_rows.to(dev),), vit.to(dtype))
    x0, noise, t = b.lat_x0.to(dev), b.lat_noise.to(dev), b.lat_t.to(dev)
    if b.lat_rows.numel():
        x_t = (1 - t[:, None]) * x0 + t[:, None] * noise  # (Nl, C): x_t = (1 - t) x0 + t eps
        lat = model.embed_latents(x_t, t, b.lat_position_ids.to(dev))  # (Nl, hidden)
        embeds = embeds.index_put((b.lat_rows.to(dev),), lat.to(dtype))
    fb = ForwardBatch(
        positions=b.positions.to(dev),
        routing=Routing.from_runs(routing_runs(b.is_gen)),
        layout=None,  # the dense-mask attention needs no kernel layout
    )
    layers = [(None, None)] * model.config.llm.num_hidden_layers  # no KV pool: nothing is cached
    h_und, h_gen = model.llm(embeds, fb, layers, dense_attention(b.mask.to(dev)))
    # Gen rows are exactly the latent rows, in order; und rows are the rest, in order.
    scored = b.lat_loss.to(dev)  # (Nl,)
    velocity = model.velocity(h_gen[scored]) if scored.any() else torch.zeros(0, x0.shape[-1], device=dev)
    und_index = torch.cumsum(~b.is_gen, 0) - 1  # (T,) row -> index among und rows
    logits = model.logits(h_und[und_index[b.ce_rows].to(dev)])
    return ForwardOut(velocity, (noise - x0)[scored], logits, b.ce_labels.to(dev))


@dataclass
class Losses:
    total: torch.Tensor
    mse: torch.Tensor
    ce: torch.Tensor


def losses(out: ForwardOut, mse_weight: float = 1.0, ce_weight: float = 0.25) -> Losses:
    """MSE on the velocity of the latent tokens plus weighted CE on the answer tokens (zero if absent)."""
    zero = out.velocity.new_zeros(())
    mse = F.mse_loss(out.velocity.float(), out.target.float()) if out.velocity.numel() else zero
    ce = F.cross_entropy(out.logits.float(), out.labels) if out.labels.numel() else zero
    return Losses(mse_weight * mse + ce_weight * ce, mse.detach(), ce.detach())


class TrainForward(nn.Module):
    """`forward` as a module call: under FSDP this wrapper is the root unit, whose call gathers the
    parameters that live outside the sharded layers (embeddings, heads, connector)."""

    def __init__(self, model: Bagel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: PackedBatch) -> ForwardOut:
        return forward(self.model, batch)
