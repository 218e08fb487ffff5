"""Argument validation shared by the Triton path and the PyTorch reference.

Metadata checks (ranks, shapes, dtypes, devices) are host-only and always run. Range checks on the index
tensors need one device-to-host copy, so they run only with `check=True`.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_metadata(q, k, v, k_cache, v_cache, cu_seqlens_q, cache_start, cache_len, kv_end, scale) -> None:
    """Shape/dtype/device checks; no device sync."""
    named = {"q": q, "k": k, "v": v, "k_cache": k_cache, "v_cache": v_cache}
    for name, x in named.items():
        _tensor(name, x)
        if x.dim() != 3:
            raise ValueError(f"{name} must be 3-D (tokens, heads, head_dim), got shape {tuple(x.shape)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q dtype must be one of float16/bfloat16/float32, got {q.dtype}")
    for name, x in named.items():
        if x.dtype != q.dtype:
            raise ValueError(f"{name} dtype {x.dtype} differs from q dtype {q.dtype}")
    idx = {"cu_seqlens_q": cu_seqlens_q, "cache_start": cache_start, "cache_len": cache_len, "kv_end": kv_end}
    for name, x in idx.items():
        _tensor(name, x)
        if x.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {x.dtype}")
        if x.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")
    for name, x in {**named, **idx}.items():
        if x.device != q.device:
            raise ValueError(
                f"{name} is on {x.device} but q is on {q.device}; all tensors must share a device"
            )
    tq, hq, d = q.shape
    tc, hkv, _ = k_cache.shape
    if k.shape != (tq, k.shape[1], d):
        raise ValueError(f"k shape {tuple(k.shape)} must be (Tq={tq}, Hkv, D={d})")
    hkv = k.shape[1]
    if v.shape != k.shape:
        raise ValueError(f"v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}")
    if k_cache.shape[1:] != (hkv, d):
        raise ValueError(f"k_cache shape {tuple(k_cache.shape)} must be (Tc, Hkv={hkv}, D={d})")
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache shape {tuple(v_cache.shape)} must equal k_cache shape {tuple(k_cache.shape)}"
        )
    if hkv < 1 or hq < 1 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a positive multiple of key/value heads ({hkv})")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {d}")
    if cu_seqlens_q.numel() < 1:
        raise ValueError("cu_seqlens_q must have B+1 >= 1 entries")
    b = cu_seqlens_q.numel() - 1
    for name in ("cache_start", "cache_len"):
        if idx[name].numel() != b:
            raise ValueError(
                f"{name} must have B={b} entries (len(cu_seqlens_q) - 1), got {idx[name].numel()}"
            )
    if kv_end.numel() != tq:
        raise ValueError(f"kv_end must have one entry per query row (Tq={tq}), got {kv_end.numel()}")
    if tq >= 2**31 or tc >= 2**31:
        raise ValueError("row counts must fit int32")
    if scale is not None and (
        isinstance(scale, bool)
        or not isinstance(scale, int | float)
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise ValueError(f"scale must be None or a positive finite number, got {scale!r}")


def check_ranges(cu_seqlens_q, cache_start, cache_len, kv_end, total_q: int, cache_rows: int) -> None:
    """Index-range checks: one device-to-host copy, then vectorised host checks."""
    b = cu_seqlens_q.numel() - 1
    host = torch.cat([cu_seqlens_q, cache_start, cache_len, kv_end]).to("cpu", torch.int64)
    cu = host[: b + 1]
    cs = host[b + 1 : 2 * b + 1]
    cl = host[2 * b + 1 : 3 * b + 1]
    ke = host[3 * b + 1 :]
    if cu[0].item() != 0:
        raise ValueError(f"cu_seqlens_q[0] must be 0, got {cu[0].item()}")
    if cu[-1].item() != total_q:
        raise ValueError(
            f"cu_seqlens_q[-1] must equal the number of query rows {total_q}, got {cu[-1].item()}"
        )
    if b > 0:
        bad = torch.nonzero(cu[1:] < cu[:-1])
        if bad.numel():
            i = bad[0, 0].item()
            raise ValueError(
                f"cu_seqlens_q must be non-decreasing: entry {i + 1} ({cu[i + 1].item()}) < {cu[i].item()}"
            )
        bad = torch.nonzero(cs < 0)
        if bad.numel():
            i = bad[0, 0].item()
            raise ValueError(f"cache_start[{i}] = {cs[i].item()} is negative")
        bad = torch.nonzero(cl < 0)
        if bad.numel():
            i = bad[0, 0].item()
            raise ValueError(f"cache_len[{i}] = {cl[i].item()} is negative")
        bad = torch.nonzero(cs + cl > cache_rows)
        if bad.numel():
            i = bad[0, 0].item()
            raise ValueError(
                f"cache range of sequence {i} [{cs[i].item()}, {cs[i].item() + cl[i].item()}) exceeds the "
                f"{cache_rows} rows of k_cache"
            )
    if total_q == 0:
        return
    rows = torch.arange(total_q)
    seq = torch.searchsorted(cu[1:], rows, right=True)
    local = rows - cu[seq]
    length = cu[seq + 1] - cu[seq]
    bad = torch.nonzero((ke <= local) | (ke > length))
    if bad.numel():
        r = bad[0, 0].item()
        raise ValueError(
            f"kv_end[{r}] = {ke[r].item()} out of range: row {local[r].item()} of sequence {seq[r].item()} "
            f"(length {length[r].item()}) needs {local[r].item()} < kv_end <= {length[r].item()}"
        )
    same = seq[1:] == seq[:-1]
    bad = torch.nonzero(same & (ke[1:] < ke[:-1]))
    if bad.numel():
        r = bad[0, 0].item() + 1
        raise ValueError(
            f"kv_end must be non-decreasing within a sequence: kv_end[{r}] = {ke[r].item()} < "
            f"kv_end[{r - 1}] = {ke[r - 1].item()} (sequence {seq[r].item()})"
        )


def validate(
    q, k, v, k_cache, v_cache, cu_seqlens_q, cache_start, cache_len, kv_end, scale, check: bool
) -> None:
    check_metadata(q, k, v, k_cache, v_cache, cu_seqlens_q, cache_start, cache_len, kv_end, scale)
    if check:
        check_ranges(cu_seqlens_q, cache_start, cache_len, kv_end, q.shape[0], k_cache.shape[0])


def default_scale(scale, head_dim: int) -> float:
    return float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
