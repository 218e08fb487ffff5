"""The BAGEL container module: LLM, ViT, connector, generation heads, position tables.

Attribute names reproduce the official state-dict keys (`language_model.*`, `vit_model.vision_model.*`,
`connector.*`, `time_embedder.*`, `vae2llm`, `llm2vae`, `latent_pos_embed.pos_embed`,
`vit_pos_embed.pos_embed`). The FLUX autoencoder is separate (`ae.safetensors`) and shared between
weight sets.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.config import BagelConfig
from engine.model.heads import Connector, PositionEmbedding, TimestepEmbedder
from engine.model.llm import Qwen2MoTForCausalLM
from engine.model.vit import SiglipVisionModel


class Bagel(nn.Module):
    def __init__(self, cfg: BagelConfig) -> None:
        super().__init__()
        self.config = cfg
        d = cfg.llm.hidden_size
        self.language_model = Qwen2MoTForCausalLM(cfg.llm)
        self.vit_model = SiglipVisionModel(cfg.vit)
        self.connector = Connector(cfg.vit.hidden_size, d)
        self.vit_pos_embed = PositionEmbedding(cfg.vit_max_num_patch_per_side, d)
        self.time_embedder = TimestepEmbedder(d)
        self.vae2llm = nn.Linear(cfg.latent_channels, d)
        self.llm2vae = nn.Linear(d, cfg.latent_channels)
        self.latent_pos_embed = PositionEmbedding(cfg.max_latent_size, d)

    @property
    def llm(self):
        return self.language_model.model

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: (n,) int64 -> (n, hidden)
        return self.llm.embed_tokens(ids)

    def embed_vit(
        self, patches: torch.Tensor, vit_position_ids: torch.Tensor, cu_seqlens: list[int]
    ) -> torch.Tensor:
        """Packed ViT forward for several images -> LLM-width tokens (connector + ViT position table)."""
        # patches: (N, p*p*3); vit_position_ids: (N,) row*vit_grid + col
        feats = self.vit_model(patches, vit_position_ids, cu_seqlens)  # (N, vit_hidden)
        return self.connector(feats) + self.vit_pos_embed(vit_position_ids)

    def embed_latents(
        self, x: torch.Tensor, t: torch.Tensor, latent_position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Latent tokens -> LLM rows: vae2llm(x) + temb(t) + latent position table."""
        # x: (N, latent_channels) float32; t: (N,) flow time per token; latent_position_ids: (N,)
        w = self.vae2llm.weight
        return (
            self.vae2llm(x.to(w.dtype)) + self.time_embedder(t) + self.latent_pos_embed(latent_position_ids)
        )

    def velocity(self, h_gen: torch.Tensor) -> torch.Tensor:
        """Final-normed gen rows -> predicted velocity (float32)."""
        return self.llm2vae(h_gen).float()

    def logits(self, h_und: torch.Tensor) -> torch.Tensor:
        return self.language_model.lm_head(h_und).float()
