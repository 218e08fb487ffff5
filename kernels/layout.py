"""Attention layouts: per-sequence segment specs -> the int32 tensors of the `mixed_attention` contract.

Callers describe each sequence as a run of segments (causal text runs and bidirectional blocks) plus the
range of the shared KV cache it sees; `build_layout` validates that on the host and produces, with one
host-to-device copy, `cu_seqlens_q`, `cache_start`, `cache_len` and the per-row `kv_end`. The per-q-tile
table the Triton kernel wants is built lazily per BLOCK_M (on the device, no sync) and cached on the
layout, so a layout built once per forward serves every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["AttentionLayout", "Segment", "SequenceSpec", "build_layout", "build_tile_table"]

# The tile table: one int32 row per q-tile with these columns, built by `build_tile_table` and read by
# the Triton kernel (kernels/_triton_attention.py), which takes its column indices from here.
TILE_SEQ = 0  # sequence index
TILE_M0 = 1  # first query row of the tile (global)
TILE_M1 = 2  # end query row of the tile (global, exclusive)
TILE_SEQ_START = 3  # first query row of the tile's sequence
TILE_COLS = 4


@dataclass(frozen=True)
class Segment:
    """A run of `length` query rows: causal text (`causal=True`) or a bidirectional block (`causal=False`)."""

    length: int
    causal: bool


@dataclass(frozen=True)
class SequenceSpec:
    """One sequence of a launch: its query segments, in order, and the cached keys it additionally sees
    (rows `[cache_start, cache_start + cache_len)` of `k_cache`/`v_cache`; ranges may overlap)."""

    segments: tuple[Segment, ...]
    cache_start: int = 0
    cache_len: int = 0

    @property
    def length(self) -> int:
        return sum(s.length for s in self.segments)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def sequence_kv_end(spec: SequenceSpec) -> list[int]:
    """Local kv_end of each row of one sequence: r+1 for causal rows, the block end for block rows."""
    out: list[int] = []
    pos = 0
    for seg in spec.segments:
        end = pos + seg.length
        if seg.causal:
            out.extend(range(pos + 1, end + 1))
        else:
            out.extend([end] * seg.length)
        pos = end
    return out


def _check_spec(i: int, spec: SequenceSpec) -> None:
    if not isinstance(spec, SequenceSpec):
        raise ValueError(f"sequence {i}: expected a SequenceSpec, got {type(spec).__name__}")
    if not isinstance(spec.segments, tuple | list) or len(spec.segments) == 0:
        raise ValueError(f"sequence {i}: needs at least one segment (got {spec.segments!r})")
    for j, seg in enumerate(spec.segments):
        if not isinstance(seg, Segment):
            raise ValueError(f"sequence {i} segment {j}: expected a Segment, got {type(seg).__name__}")
        if not _is_int(seg.length) or seg.length < 1:
            raise ValueError(f"sequence {i} segment {j}: length must be an int >= 1, got {seg.length!r}")
        if not isinstance(seg.causal, bool):
            raise ValueError(f"sequence {i} segment {j}: causal must be a bool, got {seg.causal!r}")
    if not _is_int(spec.cache_start) or spec.cache_start < 0:
        raise ValueError(f"sequence {i}: cache_start must be an int >= 0, got {spec.cache_start!r}")
    if not _is_int(spec.cache_len) or spec.cache_len < 0:
        raise ValueError(f"sequence {i}: cache_len must be an int >= 0, got {spec.cache_len!r}")


@dataclass(frozen=True)
class AttentionLayout:
    """Validated index tensors of one `mixed_attention` launch (all int32, on `device`).

    Host-side facts (`max_seqlen_q`, `total_q`, `max_cache_end`, `visible_pairs`) need no device sync.
    """

    cu_seqlens_q: torch.Tensor
    cache_start: torch.Tensor
    cache_len: torch.Tensor
    kv_end: torch.Tensor
    max_seqlen_q: int
    total_q: int
    num_seqs: int
    max_cache_end: int  # k_cache must have at least this many rows
    visible_pairs: int  # sum over rows of (cache_len + kv_end): query-key pairs per head that are computed
    # Host copies of the per-sequence index tensors: (cu_seqlens_q, cache_start, cache_len) as int tuples,
    # for callers that slice per sequence without a device sync.
    host: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] = field(default=((0,), (), ()), repr=False)
    full_blocks: bool = False  # every row sees its whole sequence and cache range (no mask anywhere)
    _tiles: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def device(self) -> torch.device:
        return self.kv_end.device

    @property
    def indices(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cu_seqlens_q, cache_start, cache_len, kv_end): the index arguments of `mixed_attention`."""
        return self.cu_seqlens_q, self.cache_start, self.cache_len, self.kv_end

    def tile_table(self, block_m: int) -> torch.Tensor:
        """The kernel's (n_tiles, 4) int32 tile table for `block_m`, built once and cached."""
        tab = self._tiles.get(block_m)
        if tab is None:
            tab = build_tile_table(self.cu_seqlens_q, self.kv_end, self.cache_len, self.total_q, block_m)
            self._tiles[block_m] = tab
        return tab


def build_layout(seqs: Sequence[SequenceSpec], device: torch.device | str | None = None) -> AttentionLayout:
    """Validate `seqs` on the host and build the launch's index tensors with a single host-to-device copy."""
    seqs = list(seqs)
    for i, spec in enumerate(seqs):
        _check_spec(i, spec)
    cu = [0]
    kv_end: list[int] = []
    for spec in seqs:
        kv_end.extend(sequence_kv_end(spec))
        cu.append(len(kv_end))
    total_q = len(kv_end)
    if total_q >= 2**31:
        raise ValueError(f"too many query rows for int32 indices: {total_q}")
    starts = [s.cache_start for s in seqs]
    lens = [s.cache_len for s in seqs]
    max_cache_end = max((a + n for a, n in zip(starts, lens, strict=True)), default=0)
    if max_cache_end >= 2**31:
        raise ValueError(f"cache range end {max_cache_end} does not fit int32")
    b = len(seqs)
    host = torch.tensor(cu + starts + lens + kv_end, dtype=torch.int32)
    dev = host.to(device) if device is not None else host
    visible = sum(kv_end) + sum(n * s.length for n, s in zip(lens, seqs, strict=True))
    return AttentionLayout(
        cu_seqlens_q=dev[: b + 1],
        cache_start=dev[b + 1 : 2 * b + 1],
        cache_len=dev[2 * b + 1 : 3 * b + 1],
        kv_end=dev[3 * b + 1 :],
        max_seqlen_q=max((s.length for s in seqs), default=0),
        total_q=total_q,
        num_seqs=b,
        max_cache_end=max_cache_end,
        visible_pairs=visible,
        host=(tuple(cu), tuple(starts), tuple(lens)),
        full_blocks=all(len(s.segments) == 1 and not s.segments[0].causal for s in seqs),
    )


def build_tile_table(
    cu_seqlens_q: torch.Tensor, kv_end: torch.Tensor, cache_len: torch.Tensor, total_q: int, block_m: int
) -> torch.Tensor:
    """Per-q-tile table, columns `TILE_*` (int32, on the inputs' device), built without a sync.

    q-tiles never straddle sequences: sequence b contributes ceil(len_b / block_m) tiles starting at its
    first row. The table has a host-known upper bound of rows (total_q // block_m + B); unused rows have
    m0 == m1 == 0 and the kernel returns at once for them. Tiles are ordered by decreasing work
    (cache_len + kv_end of the last row), longest first, like FA3's LPT scheduling.
    """
    dev = cu_seqlens_q.device
    b = cu_seqlens_q.numel() - 1
    if b <= 0 or total_q == 0:
        return torch.zeros((0, TILE_COLS), dtype=torch.int32, device=dev)
    cu = cu_seqlens_q.long()
    lens = cu[1:] - cu[:-1]
    ntiles = (lens + block_m - 1) // block_m
    cum = torch.cumsum(ntiles, 0)
    upper = total_q // block_m + b
    t = torch.arange(upper, device=dev)
    seq = torch.searchsorted(cum, t, right=True)
    valid = seq < b
    seq = seq.clamp(max=b - 1)
    j = t - (cum[seq] - ntiles[seq])
    m0 = cu[seq] + j * block_m
    m1 = torch.minimum(m0 + block_m, cu[seq + 1])
    zero = torch.zeros_like(m0)
    m0 = torch.where(valid, m0, zero)
    m1 = torch.where(valid, m1, zero)
    last = (m1 - 1).clamp(min=0, max=max(kv_end.numel() - 1, 0))
    cost = torch.where(valid, cache_len.long()[seq] + kv_end.long()[last], torch.full_like(m0, -1))
    order = torch.argsort(cost, descending=True, stable=True)
    columns = {TILE_SEQ: seq, TILE_M0: m0, TILE_M1: m1, TILE_SEQ_START: cu[seq]}
    table = torch.stack([columns[c] for c in range(TILE_COLS)], dim=1)[order]
    return table.to(torch.int32).contiguous()
