"""Rows of a prefill forward: context segments (text, ViT blocks, clean VAE blocks) as packed rows.

Prefill and the judge both lay context nodes out with `pack_nodes`; the ViT of every image of a forward
runs as one packed ViT call (`vit_embeddings`), and edit's clean VAE context comes from `encode_vae`.
"""

from __future__ import annotations

import itertools

import torch

from engine.config import BagelConfig
from engine.contexts import ImageSegment, Node, TextSegment
from engine.model.bagel import Bagel
from engine.model.packing import CacheWrite, RowPacker
from engine.model.vae import AutoEncoder
from engine.preprocess import latent_position_ids, patchify_latent, patchify_vit, to_tensor
from engine.requests import ContextImage
from kernels import Segment as AttentionSegment

# Per image key of a request: ViT embeddings (N, hidden), or VAE tokens (N, C) with their position ids (N,).
VitEmbeds = dict[str, torch.Tensor]
VaeTokens = dict[str, tuple[torch.Tensor, torch.Tensor]]


def pack_nodes(
    model: Bagel,
    packer: RowPacker,
    nodes: list[Node],
    markers: torch.Tensor,  # (2, hidden) <|vision_start|>, <|vision_end|> embeddings
    vit_embeds: VitEmbeds,
    vae_tokens: VaeTokens,
    write: bool = False,
) -> list[AttentionSegment]:
    """Append the rows of `nodes` (one sequence, path order); returns the sequence's attention segments.
    With `write`, each node's rows persist in the KV pool at the node's offset."""
    device = markers.device
    segments = []
    for node in nodes:
        seg, row0 = node.segment, packer.rows
        if isinstance(seg, TextSegment):
            ids = torch.tensor(seg.ids, device=device)
            positions = torch.arange(node.rope_start, node.rope_start + len(seg.ids))
            packer.add(model.embed_tokens(ids), positions, gen=False)
            segments.append(AttentionSegment(len(seg.ids), causal=True))
        else:
            _pack_image_block(model, packer, seg, node.rope_start, markers, vit_embeds, vae_tokens)
            segments.append(AttentionSegment(seg.kv_len, causal=False))
        if write:
            packer.writes.append(CacheWrite(row0, seg.kv_len, node.offset))
    return segments


def _pack_image_block(
    model: Bagel,
    packer: RowPacker,
    seg: ImageSegment,
    rope: int,
    markers: torch.Tensor,
    vit_embeds: VitEmbeds,
    vae_tokens: VaeTokens,
) -> None:
    # Markers are und rows; ViT tokens are und rows; clean VAE latents (t = 0) are gen rows.
    packer.add(markers[:1], rope, gen=False)
    if seg.kind == "vit":
        packer.add(vit_embeds[seg.key], rope, gen=False)
    else:
        tokens, ids = vae_tokens[seg.key]
        t = torch.zeros(tokens.shape[0], device=tokens.device)
        packer.add(model.embed_latents(tokens, t, ids), rope, gen=True)
    packer.add(markers[1:], rope, gen=False)


def vit_embeddings(model: Bagel, cfg: BagelConfig, images: list[ContextImage]) -> list[torch.Tensor]:
    """One packed ViT forward over all images -> per image (N_i, hidden)."""
    if not images:
        return []
    device = model.connector.fc1.weight.device
    patches, ids, cu = [], [], [0]
    p, side = cfg.vit.patch_size, cfg.vit_max_num_patch_per_side
    for ci in images:
        pp, pid, _ = patchify_vit(to_tensor(ci.vit_image), p, side)
        patches.append(pp)
        ids.append(pid)
        cu.append(cu[-1] + pp.shape[0])
    dtype = model.connector.fc1.weight.dtype
    out = model.embed_vit(torch.cat(patches).to(device, dtype), torch.cat(ids).to(device), cu)
    return list(out.split([b - a for a, b in itertools.pairwise(cu)]))


def encode_vae(
    vae: AutoEncoder, cfg: BagelConfig, image: ContextImage, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled VAE encode of a context image -> (tokens (N, C), position ids (N,)). The posterior noise
    comes from the request's CPU generator, so its draws match the official release's order."""
    dtype = next(vae.parameters()).dtype
    device = next(vae.parameters()).device
    x = to_tensor(image.vae_image)[None].to(device, dtype)  # (1, 3, H, W)
    z_c, d = cfg.vae.z_channels, cfg.vae.downsample
    noise = torch.randn(1, z_c, x.shape[2] // d, x.shape[3] // d, generator=generator)
    z = vae.encode(x, noise.to(device, dtype))[0].float()  # (z, H/8, W/8)
    p = cfg.latent_patch_size
    tokens = patchify_latent(z, p)  # (h*w, C)
    ids = latent_position_ids(z.shape[1] // p, z.shape[2] // p, cfg.max_latent_size).to(device)
    return tokens, ids
