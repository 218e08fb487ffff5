"""Public entry points: dispatch between the Triton kernel and the PyTorch reference."""

from __future__ import annotations

import os

import torch

from kernels._validate import check_metadata, validate
from kernels.layout import AttentionLayout
from kernels.reference import mixed_attention_reference

__all__ = ["attention_with_layout", "mixed_attention", "triton_available"]

_TRITON = None  # cached module or False


def _triton_impl():
    """The kernel module, or None when triton cannot be imported."""
    global _TRITON
    if _TRITON is None:
        try:
            from kernels import _triton_attention
        except Exception:  # ImportError, or a triton build that fails to initialise
            _TRITON = False
        else:
            _TRITON = _triton_attention
    return _TRITON or None


def triton_available() -> bool:
    return _triton_impl() is not None


def _use_kernel(q: torch.Tensor) -> bool:
    if q.is_cuda:
        return triton_available()
    if os.environ.get("TRITON_INTERPRET", "0") == "1" and q.device.type == "cpu":
        # The interpreter cannot do bf16 arithmetic (triton-lang/triton#11584): bf16 uses the reference.
        return q.dtype in (torch.float16, torch.float32) and triton_available()
    return False


def mixed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cache_start: torch.Tensor,
    cache_len: torch.Tensor,
    kv_end: torch.Tensor,
    scale: float | None = None,
    return_lse: bool = False,
    check: bool = True,
):
    """Packed varlen attention where each query row sees one key interval plus its sequence's cache range.

    q (Tq, Hq, D); k, v (Tq, Hkv, D) packed sequence after sequence (`cu_seqlens_q`, int32 (B+1,));
    k_cache, v_cache (Tc, Hkv, D). Sequence b sees cached keys [cache_start[b], cache_start[b] +
    cache_len[b]) and its local row r sees its own rows [0, kv_end[r]) (int32 (Tq,), r < kv_end[r] <=
    len_b, non-decreasing within a sequence). Returns (Tq, Hq, D) in q's dtype, plus the natural-log LSE
    (fp32 (Tq, Hq)) with `return_lse=True`. `check=True` validates index ranges (one device sync).

    Runs the Triton kernel for CUDA tensors (or CPU fp16/fp32 tensors under TRITON_INTERPRET=1), else the
    PyTorch reference.
    """
    validate(q, k, v, k_cache, v_cache, cu_seqlens_q, cache_start, cache_len, kv_end, scale, check)
    if _use_kernel(q):
        return _triton_impl().mixed_attention_triton(
            q, k, v, k_cache, v_cache, cu_seqlens_q, cache_start, cache_len, kv_end, scale, return_lse
        )
    return mixed_attention_reference(
        q,
        k,
        v,
        k_cache,
        v_cache,
        cu_seqlens_q,
        cache_start,
        cache_len,
        kv_end,
        scale,
        return_lse,
        check=False,
    )


def attention_with_layout(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: AttentionLayout,
    scale: float | None = None,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
):
    """`mixed_attention` with the index tensors of a validated `build_layout` result (no device sync).

    `out` (Tq, Hq, D) in q's dtype, if given, receives the result (the kernel writes it in place)."""
    if not isinstance(layout, AttentionLayout):
        raise ValueError(f"layout must be an AttentionLayout, got {type(layout).__name__}")
    if isinstance(q, torch.Tensor) and q.dim() >= 1 and q.shape[0] != layout.total_q:
        raise ValueError(f"q has {q.shape[0]} rows but the layout has {layout.total_q}")
    check_metadata(q, k, v, k_cache, v_cache, *layout.indices, scale)
    if k_cache.shape[0] < layout.max_cache_end:
        raise ValueError(
            f"k_cache has {k_cache.shape[0]} rows but the layout's cache ranges reach row {layout.max_cache_end}"
        )
    if out is not None and (
        out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1
    ):
        raise ValueError(
            f"out must be a {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}, unit stride in D"
        )
    args = (q, k, v, k_cache, v_cache, *layout.indices)
    if _use_kernel(q):
        impl = _triton_impl()
        block_m = impl.default_block_m(q.shape[-1], layout.max_seqlen_q)
        tiles = layout.tile_table(block_m)
        return impl.mixed_attention_triton(*args, scale, return_lse, tiles=tiles, block_m=block_m, out=out)
    res = mixed_attention_reference(*args, scale, return_lse, check=False)
    if out is None:
        return res
    out.copy_(res[0] if return_lse else res)
    return (out, res[1]) if return_lse else out
