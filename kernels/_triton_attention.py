"""Triton forward kernel for `mixed_attention` (imported lazily: `import kernels` works without triton).

One program per (q-tile, q-head). The tile table (kernels.layout.build_tile_table) gives each program its
sequence and rows [m0, m1), which never straddle sequences. Because kv_end is non-decreasing within a
sequence, the tile's visible own-key range is bounded by hi_min = kv_end[m0] and hi_max = kv_end[m1-1]:

* cached keys [0, cache_len): fully visible to every row; whole BLOCK_N tiles run without score masking,
  the ragged cache tail runs with a column mask;
* own keys [0, hi_min): fully visible; whole tiles run without score masking;
* own keys [floor(hi_min / BN) * BN, hi_max): partial tiles, masked with col < kv_end[row];
* everything beyond hi_max is never loaded.

Cached and fresh keys are read from their own tensors (no concatenation); GQA reads kv_head = h // G.
Online softmax in base 2 with fp32 accumulators and a safe max; rows that saw no key output 0.
Loads that could reach past a tensor are masked (the interpreter segfaults on out-of-bounds loads); whole key
tiles are in bounds by construction and, without head-dim padding, load unmasked so that they vectorise.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels._validate import default_scale
from kernels.layout import TILE_COLS, TILE_M0, TILE_M1, TILE_SEQ, TILE_SEQ_START, build_tile_table

LOG2E = 1.4426950408889634
# Tile-table columns (kernels/layout.py) as compile-time constants of the kernel.
_COLS, _SEQ, _M0, _M1, _SEQ_START = (
    tl.constexpr(c) for c in (TILE_COLS, TILE_SEQ, TILE_M0, TILE_M1, TILE_SEQ_START)
)


def is_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _update(acc, l_i, m_i, q, k, v, qk_scale, mask, APPLY_MASK: tl.constexpr, IEEE: tl.constexpr):
    if IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    # qk_scale > 0 (validated), so max(qk) * scale is the scaled max and qk * scale - m is one FMA per score.
    if APPLY_MASK:
        qk = tl.where(mask, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # safe max: fully masked rows so far
    else:
        # Unmasked tiles: every score is finite, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = m_new
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if IEEE:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _load_full(k_rows, v_rows, offs_d, d_ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """K and V of a whole key tile (every row in bounds): `k_rows`/`v_rows` are (BLOCK_N, 1) row pointers.
    With no padded head-dim columns the loads carry no mask, so they vectorise fully."""
    if HEAD_DIM == BLOCK_D:
        k = tl.load(k_rows + offs_d[None, :])
        v = tl.load(v_rows + offs_d[None, :])
    else:
        k = tl.load(k_rows + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        v = tl.load(v_rows + offs_d[None, :], mask=d_ok[None, :], other=0.0)
    return k, v


@triton.jit
def _mixed_attn_fwd(
    Q,
    K,
    V,
    KC,
    VC,
    Out,
    LSE,
    TILES,
    KV_END,
    CACHE_START,
    CACHE_LEN,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kct,
    stride_kch,
    stride_vct,
    stride_vch,
    stride_ot,
    stride_oh,
    stride_lt,
    stride_lh,
    qk_scale,
    num_hq,
    t_bucket,  # autotuning key only (coarse length bucket)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
    RETURN_LSE: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    tile = pid // num_hq
    h = pid % num_hq  # heads of one tile are neighbouring programs: the G heads of a KV head share K/V in L2
    seq = tl.load(TILES + tile * _COLS + _SEQ)
    m0 = tl.load(TILES + tile * _COLS + _M0)
    m1 = tl.load(TILES + tile * _COLS + _M1)
    if m1 <= m0:
        return
    seq_start = tl.load(TILES + tile * _COLS + _SEQ_START)
    kvh = h // GROUP
    c0 = tl.load(CACHE_START + seq).to(tl.int64)
    n_cache = tl.load(CACHE_LEN + seq)
    hi_min = tl.load(KV_END + m0)
    hi_max = tl.load(KV_END + m1 - 1)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < m1
    hi = tl.load(KV_END + offs_m, mask=row_ok, other=0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q_ptrs = Q + offs_m.to(tl.int64)[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    no_mask = row_ok[:, None]  # placeholder for the unmasked updates (ignored)

    # ---- cached prefix: whole tiles, no score masking --------------------------------------------
    kc_base = KC + kvh * stride_kch
    vc_base = VC + kvh * stride_vch
    n_cache_full = n_cache // BLOCK_N
    for j in range(0, n_cache_full):
        cols = j * BLOCK_N + offs_n
        rows64 = (c0 + cols)[:, None]
        k, v = _load_full(
            kc_base + rows64 * stride_kct, vc_base + rows64 * stride_vct, offs_d, d_ok, HEAD_DIM, BLOCK_D
        )
        acc, l_i, m_i = _update(acc, l_i, m_i, q, k, v, qk_scale, no_mask, False, IEEE)
    # ---- ragged cache tail (0 or 1 tile): column mask ---------------------------------------------
    for j in range(n_cache_full, tl.cdiv(n_cache, BLOCK_N)):
        cols = j * BLOCK_N + offs_n
        col_ok = cols < n_cache
        ld = col_ok[:, None] & d_ok[None, :]
        rows64 = (c0 + cols)[:, None]
        k = tl.load(kc_base + rows64 * stride_kct + offs_d[None, :], mask=ld, other=0.0)
        v = tl.load(vc_base + rows64 * stride_vct + offs_d[None, :], mask=ld, other=0.0)
        acc, l_i, m_i = _update(acc, l_i, m_i, q, k, v, qk_scale, col_ok[None, :], True, IEEE)

    # ---- own keys visible to every row of the tile: whole tiles, no score masking ----------------------
    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_vh
    n_own_full = hi_min // BLOCK_N
    for j in range(0, n_own_full):
        cols = j * BLOCK_N + offs_n
        rows64 = (seq_start + cols).to(tl.int64)[:, None]
        k, v = _load_full(
            k_base + rows64 * stride_kt, v_base + rows64 * stride_vt, offs_d, d_ok, HEAD_DIM, BLOCK_D
        )
        acc, l_i, m_i = _update(acc, l_i, m_i, q, k, v, qk_scale, no_mask, False, IEEE)
    # ---- partial own tiles up to hi_max: mask col < kv_end[row] -----------------------------------------
    for j in range(n_own_full, tl.cdiv(hi_max, BLOCK_N)):
        cols = j * BLOCK_N + offs_n
        ld = (cols < hi_max)[:, None] & d_ok[None, :]
        rows64 = (seq_start + cols).to(tl.int64)[:, None]
        k = tl.load(k_base + rows64 * stride_kt + offs_d[None, :], mask=ld, other=0.0)
        v = tl.load(v_base + rows64 * stride_vt + offs_d[None, :], mask=ld, other=0.0)
        vis = cols[None, :] < hi[:, None]
        acc, l_i, m_i = _update(acc, l_i, m_i, q, k, v, qk_scale, vis, True, IEEE)

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = Out + offs_m.to(tl.int64)[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if RETURN_LSE:
        lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + offs_m.to(tl.int64) * stride_lt + h * stride_lh, lse, mask=row_ok)


# Autotuned variants: BLOCK_M is fixed outside autotuning (the tile table depends on it); the tuner picks
# BLOCK_N / warps / stages from a small fixed set, keyed on the head dim, GQA group and a length bucket.
_CONFIGS_SMALL_D = [
    triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3),
]
_CONFIGS_LARGE_D = [
    triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=2),
]
_KEY = ["HEAD_DIM", "BLOCK_M", "GROUP", "RETURN_LSE", "t_bucket"]


_tuned_small = triton.autotune(configs=_CONFIGS_SMALL_D, key=_KEY)(_mixed_attn_fwd)
_tuned_large = triton.autotune(configs=_CONFIGS_LARGE_D, key=_KEY)(_mixed_attn_fwd)

# Interpreter defaults: small tiles so that tiny test shapes still cross many tile boundaries.
INTERPRET_BLOCK_M = 32
INTERPRET_BLOCK_N = 32


def block_d_for(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def default_block_m(head_dim: int, max_seqlen_q: int | None = None) -> int:
    """BLOCK_M for the tile table: 128 (64 for D > 128); smaller when no sequence has that many rows
    (decode / tiny batches), so that q-tiles are not mostly padding. A host-side bound suffices."""
    if is_interpreter():
        return INTERPRET_BLOCK_M
    bm = 128 if block_d_for(head_dim) <= 128 else 64
    if max_seqlen_q is not None:
        while bm > 16 and bm // 2 >= max_seqlen_q:
            bm //= 2
    return bm


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def mixed_attention_triton(
    q,
    k,
    v,
    k_cache,
    v_cache,
    cu_seqlens_q,
    cache_start,
    cache_len,
    kv_end,
    scale=None,
    return_lse=False,
    tiles: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    out: torch.Tensor | None = None,
):
    """Launch the kernel on validated arguments.

    `tiles` is the tile table for `block_m` (built here if None). With `block_n` given, the kernel runs
    with that fixed config; otherwise (GPU) it is autotuned. `out`, if given, is written in place (tests
    pass a NaN-poisoned view to check that every row, and nothing else, is written).
    """
    tq, hq, d = q.shape
    hkv = k.shape[1]
    q, k, v, k_cache, v_cache = (_last_dim_contiguous(x) for x in (q, k, v, k_cache, v_cache))
    cu_seqlens_q, cache_start, cache_len, kv_end = (
        x.contiguous() for x in (cu_seqlens_q, cache_start, cache_len, kv_end)
    )
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty((tq, hq), dtype=torch.float32, device=q.device) if return_lse else None
    if tq == 0:
        return (out, lse) if return_lse else out
    if block_m is None:
        block_m = default_block_m(d, tq)
    if block_n is None and is_interpreter():
        block_n = INTERPRET_BLOCK_N
    if tiles is None:
        tiles = build_tile_table(cu_seqlens_q, kv_end, cache_len, tq, block_m)
    n_tiles = tiles.shape[0]
    if n_tiles == 0:
        return (out, lse) if return_lse else out
    if k_cache.shape[0] == 0:
        # A zero-row tensor may have no storage; the kernel never reads it (all cache_len are 0).
        k_cache = k.new_zeros((1, hkv, d))
        v_cache = k_cache
    qk_scale = default_scale(scale, d) * LOG2E
    lse_arg = lse if lse is not None else out  # never written when RETURN_LSE is False
    lse_strides = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)
    block_d = block_d_for(d)
    args = (
        q, k, v, k_cache, v_cache, out, lse_arg, tiles, kv_end, cache_start, cache_len,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1), lse_strides[0], lse_strides[1],
        qk_scale, hq, triton.next_power_of_2(max(tq, 1024)),
    )  # fmt: skip
    meta = dict(
        HEAD_DIM=d,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        GROUP=hq // hkv,
        RETURN_LSE=return_lse,
        IEEE=q.dtype == torch.float32,
    )
    grid = (n_tiles * hq,)
    if block_n is not None:
        _mixed_attn_fwd[grid](*args, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **meta)
    else:
        kern = _tuned_small if block_d <= 128 else _tuned_large
        kern[grid](*args, **meta)
    return (out, lse) if return_lse else out


_AOT_PTRS = ("Q", "K", "V", "KC", "VC", "Out", "LSE", "TILES", "KV_END", "CACHE_START", "CACHE_LEN")
_AOT_CONST = ("HEAD_DIM", "BLOCK_D", "BLOCK_M", "BLOCK_N", "GROUP", "RETURN_LSE", "IEEE")


def compile_for_target(
    dtype: str = "bf16",
    head_dim: int = 128,
    block_m: int = 128,
    block_n: int = 64,
    num_warps: int = 8,
    num_stages: int = 3,
    group: int = 7,
    return_lse: bool = False,
    arch: int = 90,
):
    """Compile the kernel ahead of time for an NVIDIA target (no GPU needed; uses triton's bundled ptxas).

    Pointer arguments get the 16-divisibility hint the JIT gives aligned tensors, and the strides too when
    head_dim is a multiple of 16, so the PTX matches what a GPU launch would build. Returns the compiled
    kernel (`.asm["ptx"]`, `.metadata.shared`). Used by the tests to check that the kernel compiles for
    sm_90 (the interpreter accepts programs the GPU compiler rejects).
    """
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(_mixed_attn_fwd.fn).parameters)
    sig, attrs = {}, {}
    div16 = [["tt.divisibility", 16]]
    for i, n in enumerate(names):
        if n in _AOT_PTRS:
            if n == "LSE":
                sig[n] = "*fp32"
            elif n in ("TILES", "KV_END", "CACHE_START", "CACHE_LEN"):
                sig[n] = "*i32"
            else:
                sig[n] = f"*{dtype}"
            attrs[(i,)] = div16
        elif n in _AOT_CONST:
            sig[n] = "constexpr"
        elif n == "qk_scale":
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
            if n.startswith("stride") and not n.startswith("stride_l") and head_dim % 16 == 0:
                attrs[(i,)] = div16
    const = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": block_d_for(head_dim),
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "GROUP": group,
        "RETURN_LSE": return_lse,
        "IEEE": dtype == "fp32",
    }
    src = ASTSource(fn=_mixed_attn_fwd, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
