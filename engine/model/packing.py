"""How one packed forward is laid out: expert routing by static slices, RoPE positions, attention layout.

Rows are packed sequence after sequence (the attention kernel's order). The Mixture-of-Transformers split
keeps the residual stream as two tensors, und rows and gen rows; `Routing` moves between the two and the
sequence order with slice + cat only (no index tensors), so exported graphs hold no Gather/ScatterND.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels import AttentionLayout, SequenceSpec, build_layout


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
class IndexRouting:
    """Expert routing by index tensors: the row positions (in sequence order) of the und rows and of the
    gen rows. Same interface and values as `Routing`, but the row pattern lives in device tensors, so one
    captured CUDA graph serves every batch with the same row counts (engine/step/graphs.py)."""

    und_rows: torch.Tensor  # (Tu,) int64 positions in sequence order
    gen_rows: torch.Tensor  # (Tg,) int64

    @property
    def num_und(self) -> int:
        return self.und_rows.shape[0]

    @property
    def num_gen(self) -> int:
        return self.gen_rows.shape[0]

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (T, ...) in sequence order -> (und rows, gen rows)."""
        return x.index_select(0, self.und_rows), x.index_select(0, self.gen_rows)

    def merge(self, und: torch.Tensor, gen: torch.Tensor) -> torch.Tensor:
        """Inverse of `split`."""
        out = und.new_empty((self.num_und + self.num_gen, *und.shape[1:]))
        out.index_copy_(0, self.und_rows, und)
        out.index_copy_(0, self.gen_rows, gen)
        return out


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
    routing: Routing | IndexRouting
    layout: AttentionLayout
    cache_writes: list[CacheWrite] = field(default_factory=list)


@dataclass
class RowPacker:
    """Assembles the rows of one packed forward: embeddings, RoPE positions, expert runs, attention
    sequences and cache writes, in sequence order. `build` turns them into the forward's inputs."""

    embeds: list[torch.Tensor] = field(default_factory=list)  # each (n, hidden)
    positions: list[torch.Tensor] = field(default_factory=list)  # each (n,) int64
    runs: list[tuple[bool, int]] = field(default_factory=list)
    sequences: list[SequenceSpec] = field(default_factory=list)
    writes: list[CacheWrite] = field(default_factory=list)
    rows: int = 0

    def add(self, embeds: torch.Tensor, rope: torch.Tensor | int, gen: bool) -> None:
        """Append `embeds` (n, hidden) routed to the gen expert iff `gen`; `rope` is per row or shared."""
        n = embeds.shape[0]
        self.embeds.append(embeds)
        if isinstance(rope, int):
            rope = torch.full((n,), rope, dtype=torch.long)
        self.positions.append(rope)
        self.runs.append((gen, n))
        self.rows += n

    def build(self, device: torch.device) -> tuple[torch.Tensor, ForwardBatch]:
        """(T, hidden) input rows and the ForwardBatch describing them."""
        embeds = torch.cat(self.embeds)
        positions = torch.cat(self.positions).to(device)
        layout = build_layout(self.sequences, device)
        return embeds, ForwardBatch(positions, Routing.from_runs(self.runs), layout, self.writes)
