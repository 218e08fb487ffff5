"""Small BAGEL modules around the LLM: connector, timestep embedder, frozen 2D sin-cos position tables."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def sincos_2d_table(grid: int, dim: int) -> torch.Tensor:
    """MAE-style 2D table: row r*grid+c = [E(c), E(r)], E(u) = [sin(u*w_k), cos(u*w_k)], w_k = 1e4^(-k/(dim/4)).

    Computed in float64 like the reference, returned as float32 (grid*grid, dim).
    """
    if dim % 4:
        raise ValueError(f"sin-cos table width must be a multiple of 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))  # (dim/4,)

    def encode(u: np.ndarray) -> np.ndarray:  # (n,) -> (n, dim/2)
        out = np.einsum("m,d->md", u, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    table = np.concatenate([encode(cols.reshape(-1)), encode(rows.reshape(-1))], axis=1)
    return torch.from_numpy(table).float()


class PositionEmbedding(nn.Module):
    """Frozen 2D sin-cos table, stored in the checkpoint as `pos_embed` (grid^2, dim)."""

    def __init__(self, grid: int, dim: int) -> None:
        super().__init__()
        self.grid = grid
        self.pos_embed = nn.Parameter(sincos_2d_table(grid, dim), requires_grad=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


class TimestepEmbedder(nn.Module):
    """DiT timestep embedder: sinusoid (cos first, raw t in [0, 1]) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        # t: (N,) float -> (N, dim) float32
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        weight = self.mlp[0].weight
        return self.mlp(self.sinusoid(t, self.frequency_size).to(weight.dtype))


class Connector(nn.Module):
    """MLPconnector: ViT width -> LLM width (fc1, gelu-tanh, fc2)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))
