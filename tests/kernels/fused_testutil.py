"""Shared helpers for the fused-op tests: random cases and float64 goldens written from the formulas.

The goldens are independent of kernels/fused_reference.py: plain float64 math, no dtype roundings.
A result passes when its error against the golden is within twice the PyTorch reference's own error in
the same dtype, plus a dtype-scaled floor (docs/kernel.md §5: tolerances scaled to what PyTorch
achieves).
"""

from __future__ import annotations

import torch

F64 = torch.float64
FLOOR = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # x max|golden|


def rms_golden(x, w, eps):
    x = x.to(F64)
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w.to(F64)


def add_rms_golden(x, r, w, eps):
    h = x.to(F64) + r.to(F64)
    return h, rms_golden(h, w, eps)


def qk_norm_rope_golden(x, wq, wk, num_q, cos, sin, eps):
    x = x.to(F64)
    w = torch.stack([wq.to(F64) if h < num_q else wk.to(F64) for h in range(x.shape[1])])  # (H, D)
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w[None]
    half = x.shape[-1] // 2
    rot = torch.cat([-y[..., half:], y[..., :half]], -1)
    c = cos.to(F64).reshape(cos.shape[0], 1, cos.shape[-1])
    s = sin.to(F64).reshape(sin.shape[0], 1, sin.shape[-1])
    return y * c + rot * s


def silu_mul_golden(gu):
    g, u = gu.to(F64).chunk(2, dim=-1)
    return g / (1 + torch.exp(-g)) * u


def max_err(out, gold) -> float:
    if out.numel() == 0:
        return 0.0
    return (out.to(F64) - gold).abs().max().item()


def within(out, ref, gold, dtype) -> tuple[bool, dict]:
    """`out` vs the golden, allowed twice the reference's error plus the dtype floor."""
    scale = max(gold.abs().max().item(), 1.0) if gold.numel() else 1.0
    e_out, e_ref = max_err(out, gold), max_err(ref, gold)
    same = (out == ref).double().mean().item() if out.numel() else 1.0
    finite = bool(torch.isfinite(out).all())
    ok = finite and out.dtype == ref.dtype and e_out <= 2 * e_ref + FLOOR[dtype] * scale
    return ok, {"err": e_out, "ref_err": e_ref, "equal_to_reference": same, "finite": finite}


def rng_tensor(g: torch.Generator, *shape, dtype=torch.float32, scale=1.0, offset=0.0):
    return (torch.randn(*shape, generator=g) * scale + offset).to(dtype)
