"""Triton kernels for the per-token elementwise work of a decoder layer (imported lazily, like attention).

Each kernel reads its inputs once and writes its outputs once, where PyTorch runs 3-8 kernels that each
round-trip float32 copies through memory: RMSNorm, residual add + RMSNorm, QK-norm + RoPE (queries and
keys of one expert in one launch, straight from the q/k/v projection's output), SiLU(gate) * up (from the
concatenated gate/up projection's output). Arithmetic is float32, and every value PyTorch stores in the
storage dtype is rounded to it at the same point here, so outputs match `kernels.fused_reference` up to
the order of the float32 mean reduction (in practice: equal, or one unit in the last place of bf16).

No autotuning: block sizes follow from the shapes, so a launch never benchmarks (CUDA-graph capture safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _num_warps(block: int) -> int:
    return min(max(block // 256, 1), 16)


@triton.jit
def _rms_norm_row(h, w, mask, n_cols, eps, STORE_DTYPE: tl.constexpr):
    """h: (BLOCK,) float32 row in storage precision; -> weight * round(h * rsqrt(mean(h^2) + eps)), fp32."""
    h = tl.where(mask, h, 0.0)
    inv = tl.math.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    normed = (h * inv).to(STORE_DTYPE).to(tl.float32)
    return w * normed


@triton.jit
def _rms_norm_fwd(
    X, R, H_OUT, W, Y, stride_x, stride_r, stride_h, stride_y, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        hs = (r.to(tl.float32) + x.to(tl.float32)).to(X.dtype.element_ty)  # residual + x, rounded
        tl.store(H_OUT + row * stride_h + cols, hs, mask=mask)
        x = hs
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = _rms_norm_row(x.to(tl.float32), w, mask, n_cols, eps, X.dtype.element_ty)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x (..., d) -> weight * rmsnorm(x); with `residual`: (residual + x, weight * rmsnorm(residual + x))."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n = x2.shape[0]
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty((n, d), dtype=out_dtype, device=x.device)
    h = r2 = None
    if residual is not None:
        r2 = residual.reshape(-1, d)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        h = torch.empty((n, d), dtype=x.dtype, device=x.device)
    if n:
        block = triton.next_power_of_2(d)
        _rms_norm_fwd[(n,)](
            x2, r2 if r2 is not None else x2, h if h is not None else y, weight.contiguous(), y,
            x2.stride(0), r2.stride(0) if r2 is not None else 0, h.stride(0) if h is not None else 0,
            y.stride(0), d, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_num_warps(block),
        )  # fmt: skip
    y = y.reshape(*x.shape[:-1], d)
    if residual is None:
        return y
    return h.reshape(*x.shape[:-1], d), y


@triton.jit
def _qk_norm_rope_fwd(
    X, WQ, WK, COS, SIN, OUT,
    stride_xt, stride_xh, stride_ct, stride_st, stride_ot, stride_oh,
    n_heads, num_q_heads, eps,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per row: every head of the row, RMSNorm over the head dim, then rotate-half RoPE."""
    row = tl.program_id(0).to(tl.int64)
    HALF: tl.constexpr = HEAD_DIM // 2
    heads = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    ok = (heads < n_heads)[:, None] & d_ok[None, :]
    # The partner of column d in rotate_half: d + D/2 for the first half (negated), d - D/2 for the second.
    partner = tl.where(d < HALF, d + HALF, d - HALF)
    sign = tl.where(d < HALF, -1.0, 1.0)
    base = X + row * stride_xt + heads[:, None] * stride_xh
    x = tl.load(base + d[None, :], mask=ok, other=0.0).to(tl.float32)
    xp = tl.load(base + partner[None, :], mask=ok, other=0.0).to(tl.float32)
    inv = tl.math.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)  # (BLOCK_H,)
    is_q = (heads < num_q_heads)[:, None]
    w = tl.where(
        is_q, tl.load(WQ + d, mask=d_ok, other=0.0)[None, :], tl.load(WK + d, mask=d_ok, other=0.0)[None, :]
    )
    wp = tl.where(
        is_q,
        tl.load(WQ + partner, mask=d_ok, other=0.0)[None, :],
        tl.load(WK + partner, mask=d_ok, other=0.0)[None, :],
    )
    y = w.to(tl.float32) * (x * inv[:, None])
    y_rot = sign[None, :] * (wp.to(tl.float32) * (xp * inv[:, None]))
    c = tl.load(COS + row * stride_ct + d, mask=d_ok, other=0.0)[None, :]
    s = tl.load(SIN + row * stride_st + d, mask=d_ok, other=0.0)[None, :]
    out = y * c + y_rot * s
    tl.store(
        OUT + row * stride_ot + heads[:, None] * stride_oh + d[None, :], out.to(OUT.dtype.element_ty), mask=ok
    )


def qk_norm_rope_triton(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    num_q_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """x (n, H, D) with unit stride in D (any row / head strides) -> (n, H, D) `out_dtype`, contiguous."""
    n, h, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos = cos.reshape(cos.shape[0], cos.shape[-1])
    sin = sin.reshape(sin.shape[0], sin.shape[-1])
    if cos.stride(-1) != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    out = torch.empty((n, h, d), dtype=out_dtype, device=x.device)
    if n and h:
        block_h, block_d = triton.next_power_of_2(h), triton.next_power_of_2(d)
        _qk_norm_rope_fwd[(n,)](
            x, q_weight.contiguous(), k_weight.contiguous(), cos, sin, out,
            x.stride(0), x.stride(1), cos.stride(0), sin.stride(0), out.stride(0), out.stride(1),
            h, num_q_heads, eps,
            HEAD_DIM=d, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=_num_warps(block_h * block_d),
        )  # fmt: skip
    return out


@triton.jit
def _silu_mul_fwd(GU, OUT, stride_g, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(GU + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * stride_g + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(OUT.dtype.element_ty).to(tl.float32)  # silu, rounded like F.silu
    tl.store(OUT + row * stride_o + cols, (s * u).to(OUT.dtype.element_ty), mask=mask)


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (..., 2I) = [gate | up] -> silu(gate) * up (..., I)."""
    two_i = gate_up.shape[-1]
    half = two_i // 2
    gu = gate_up.reshape(-1, two_i)
    if gu.stride(-1) != 1:
        gu = gu.contiguous()
    n = gu.shape[0]
    out = torch.empty((n, half), dtype=gate_up.dtype, device=gate_up.device)
    if n and half:
        block = min(1024, triton.next_power_of_2(half))
        grid = (n, triton.cdiv(half, block))
        _silu_mul_fwd[grid](
            gu, out, gu.stride(0), out.stride(0), half, BLOCK=block, num_warps=_num_warps(block)
        )
    return out.reshape(*gate_up.shape[:-1], half)


# Ahead-of-time compilation for an NVIDIA target (no GPU needed), for the tests: the interpreter accepts
# programs that the GPU compiler rejects. Per kernel: its float arguments, float32 pointers, constexprs.
_AOT = {
    "rms_norm": (_rms_norm_fwd, {"eps"}, set(), {"HAS_RESIDUAL": True, "BLOCK": 4096}),
    "qk_norm_rope": (
        _qk_norm_rope_fwd,
        {"eps"},
        {"COS", "SIN"},
        {"HEAD_DIM": 128, "BLOCK_H": 32, "BLOCK_D": 128},
    ),
    "silu_mul": (_silu_mul_fwd, set(), set(), {"BLOCK": 1024}),
}


def compile_for_target(kernel: str, dtype: str = "bf16", arch: int = 90, num_warps: int | None = None):
    """Compile one fused kernel at the BAGEL-7B shapes (hidden 3584, 28 + 4 heads of 128, FFN 18944)."""
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, floats, fp32_ptrs, const = _AOT[kernel]
    sig, attrs = {}, {}
    for i, name in enumerate(inspect.signature(fn.fn).parameters):
        if name in const:
            sig[name] = "constexpr"
        elif name in floats:
            sig[name] = "fp32"
        elif name.isupper():  # pointers are the upper-case parameters
            sig[name] = "*fp32" if name in fp32_ptrs else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name.startswith("stride") or name == "n_cols":  # what the JIT infers for these shapes
                attrs[(i,)] = [["tt.divisibility", 16]]
    block = const.get("BLOCK") or const["BLOCK_H"] * const["BLOCK_D"]
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    options = {"num_warps": num_warps or _num_warps(block)}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
