"""SigLIP NaViT vision encoder as BAGEL runs it (`modeling/bagel/siglip_navit.py`).

The module's own keys start with `vision_model.`; BAGEL's container holds it as `vit_model`, which gives the
checkpoint names `vit_model.vision_model.*`. Only `cfg.layers_run` (= num_hidden_layers - 1) encoder layers are
built; `post_layernorm` is applied to the last of them. Patches of several images are packed into one sequence and
attention is restricted to each image by `cu_seqlens`.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.config import ViTConfig


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        # Checkpoint layout: the Conv2d(C, hidden, p, stride p) weight permuted (out, C, p, q) -> (out, p, q, C) and
        # flattened, so input features are in (patch_row, patch_col, channel) order.
        self.patch_embedding = nn.Linear(cfg.patch_size * cfg.patch_size * cfg.num_channels, cfg.hidden_size)
        self.num_positions = (cfg.image_size // cfg.patch_size) ** 2
        self.position_embedding = nn.Embedding(self.num_positions, cfg.hidden_size)

    def forward(self, pixel_patches: Tensor, position_ids: Tensor) -> Tensor:
        # pixel_patches: (T, p*p*C), position_ids: (T,) -> (T, hidden)
        x = self.patch_embedding(pixel_patches.to(self.patch_embedding.weight.dtype))
        return x + self.position_embedding(position_ids)


class SiglipAttention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(
                f"ViT hidden_size {cfg.hidden_size} not divisible by {cfg.num_attention_heads} heads"
            )
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: Tensor, cu_seqlens: list[int]) -> Tensor:
        # x: (T, D); q, k, v: (heads, T, head_dim)
        t = x.shape[0]
        q, k, v = (
            proj(x).view(t, self.num_heads, self.head_dim).transpose(0, 1)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = torch.empty_like(q)
        # Non-causal attention inside each image; the default scale is head_dim**-0.5 as in SigLIP.
        for start, end in pairwise(cu_seqlens):
            out[:, start:end] = F.scaled_dot_product_attention(
                q[:, start:end], k[:, start:end], v[:, start:end]
            )
        return self.out_proj(out.transpose(0, 1).reshape(t, -1))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        if cfg.hidden_act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"unsupported ViT hidden_act {cfg.hidden_act!r}")
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: Tensor, cu_seqlens: list[int]) -> Tensor:
        # x: (T, D), pre-norm residual blocks
        x = x + self.self_attn(self.layer_norm1(x), cu_seqlens)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.layers_run))

    def forward(self, x: Tensor, cu_seqlens: list[int]) -> Tensor:
        for layer in self.layers:
            x = layer(x, cu_seqlens)
        return x


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_patches: Tensor, position_ids: Tensor, cu_seqlens: list[int]) -> Tensor:
        x = self.embeddings(pixel_patches, position_ids)
        return self.post_layernorm(self.encoder(x, cu_seqlens))


class SiglipVisionModel(nn.Module):
    """Packed SigLIP: (T, p*p*C) patches of all images -> (T, hidden) features."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        if cfg.layers_run < 1:
            raise ValueError(f"ViT num_hidden_layers={cfg.num_hidden_layers} leaves no layer to run")
        self.cfg = cfg
        self.vision_model = SiglipVisionTransformer(cfg)

    def forward(self, pixel_patches: Tensor, position_ids: Tensor, cu_seqlens: list[int]) -> Tensor:
        """pixel_patches: (T, p*p*C) packed over images; position_ids: (T,) = row * (image_size // patch) + col;
        cu_seqlens: [0, n_0, n_0 + n_1, ..., T] image boundaries. Returns (T, hidden)."""
        t = pixel_patches.shape[0]
        if position_ids.shape != (t,):
            raise ValueError(f"position_ids shape {tuple(position_ids.shape)} != ({t},)")
        if len(cu_seqlens) < 2 or cu_seqlens[0] != 0 or cu_seqlens[-1] != t:
            raise ValueError(f"cu_seqlens {cu_seqlens} must run from 0 to {t}")
        if any(b <= a for a, b in pairwise(cu_seqlens)):
            raise ValueError(f"cu_seqlens {cu_seqlens} must be strictly increasing")
        return self.vision_model(pixel_patches, position_ids, cu_seqlens)
