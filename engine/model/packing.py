"""How one packed forward is laid out: expert routing by static slices, RoPE positions, attention layout.

Rows are packed sequence after sequence (the attention kernel's order). The Mixture-of-Transformers split
keeps the residual stream as two tensors, und rows and gen rows; `Routing` moves between the two and the
sequence order with slice + cat only (no index tensors), so exported graphs hold no Gather/ScatterND.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels import AttentionLayout


@dataclass(frozen=True)
class Routing:
    """Expert of each row, as runs `(is_gen, length)` in sequence order (adjacent runs merged)."""

    runs: tuple[tuple[bool, int], ...]

    @classmethod
    def from_runs(cls, runs: list[tuple[bool, int]]) -> Routing:
        merged: list[tuple[bool, int]] = []
        for is_gen, n in runs:
            if n == 0:
                continue
            if merged and merged[-1][0] == is_gen:
                merged[-1] = (is_gen, merged[-1][1] + n)
            else:
                merged.append((is_gen, n))
        return cls(tuple(merged))

    @property
    def num_und(self) -> int:
        return sum(n for g, n in self.runs if not g)

    @property
    def num_gen(self) -> int:
        return sum(n for g, n in self.runs if g)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (T, ...) in sequence order -> (und rows, gen rows), each in sequence order."""
        if len(self.runs) <= 1:
            empty = x[:0]
            return (empty, x) if self.runs and self.runs[0][0] else (x, empty)
        und, gen, offset = [], [], 0
        for is_gen, n in self.runs:
            (gen if is_gen else und).append(x[offset : offset + n])
            offset += n
        return torch.cat(und) if und else x[:0], torch.cat(gen) if gen else x[:0]

    def merge(self, und: torch.Tensor, gen: torch.Tensor) -> torch.Tensor:
        """Inverse of `split`."""
        if len(self.runs) <= 1:
            return gen if self.runs and self.runs[0][0] else und
        parts, iu, ig = [], 0, 0
        for is_gen, n in self.runs:
            if is_gen:
                parts.append(gen[ig : ig + n])
                ig += n
            else:
                parts.append(und[iu : iu + n])
                iu += n
        return torch.cat(parts)


@dataclass(frozen=True)
class CacheWrite:
    """Rows [row, row + n) of this forward persist in KV-pool slots [slot, slot + n)."""

    row: int
    n: int
    slot: int


@dataclass
class ForwardBatch:
    """Everything one packed LLM forward needs besides the input embeddings."""

    positions: torch.Tensor  # (T,) int64 RoPE position of every row
    routing: Routing
    layout: AttentionLayout
    cache_writes: list[CacheWrite] = field(default_factory=list)
