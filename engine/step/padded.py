"""The row layout of one step padded to a bucket: index routing, RoPE positions, the attention layout.

Real branch sequences come first, each [<|vision_start|>, n latents, <|vision_end|>] attending to its
cached context range plus itself; then one two-row marker sequence per missing branch and one sequence
of spare latent rows. Attention only ever sees the real rows (a prefix of the step's rows), so padding
never touches a real row: every other op of the forward is row-wise. A padded step depends only on the
batch's composition (latent grid and context range of every branch), which is fixed while the batch
is, so it is built once per composition, with one host-to-device copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.step.buckets import GraphBucket
from kernels import AttentionLayout, Segment, SequenceSpec, build_layout


@dataclass(frozen=True)
class BranchRows:
    """One branch sequence of a step: its latents and its cached context."""

    latents: int  # latent rows n (the sequence has n + 2 rows)
    cache_start: int  # context range in the KV pool
    cache_len: int
    rope: int  # RoPE position shared by every row of the block


@dataclass(frozen=True)
class PaddedStep:
    bucket: GraphBucket
    layout: AttentionLayout  # the real sequences only (rows [0, layout.total_q))
    positions: torch.Tensor  # (bucket.rows,) int64 RoPE position of every row
    und_rows: torch.Tensor  # (bucket.und_rows,) int64 row positions of the markers
    gen_rows: torch.Tensor  # (bucket.gen_rows,) int64 row positions of the latents (real ones first)
    gen_offsets: tuple[int, ...]  # first latent row of each real branch in the gen stream, plus the end

    @property
    def real_gen_rows(self) -> int:
        return self.gen_offsets[-1]


def pad_step(branches: list[BranchRows], bucket: GraphBucket, device: torch.device) -> PaddedStep:
    if len(branches) > bucket.branches or sum(b.latents for b in branches) > bucket.gen_rows:
        raise ValueError(
            f"{len(branches)} branches with {sum(b.latents for b in branches)} latent rows "
            f"do not fit bucket {bucket.label}"
        )
    und: list[int] = []
    gen: list[int] = []
    pos: list[int] = []
    specs = []
    offsets = [0]
    row = 0
    for b in branches:
        und += [row, row + b.latents + 1]
        gen += range(row + 1, row + 1 + b.latents)
        pos += [b.rope] * (b.latents + 2)
        specs.append(SequenceSpec((Segment(b.latents + 2, causal=False),), b.cache_start, b.cache_len))
        offsets.append(offsets[-1] + b.latents)
        row += b.latents + 2
    for _ in range(bucket.branches - len(branches)):
        und += [row, row + 1]
        row += 2
    spare = bucket.gen_rows - len(gen)
    gen += range(row, row + spare)
    row += spare
    pos += [0] * (row - len(pos))
    assert row == bucket.rows and len(und) == bucket.und_rows and len(gen) == bucket.gen_rows
    host = torch.tensor(und + gen + pos, dtype=torch.long)
    dev = host.to(device)
    u, g = bucket.und_rows, bucket.gen_rows
    return PaddedStep(
        bucket=bucket,
        layout=build_layout(specs, device),
        positions=dev[u + g :],
        und_rows=dev[:u],
        gen_rows=dev[u : u + g],
        gen_offsets=tuple(offsets),
    )
