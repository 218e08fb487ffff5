"""Fused elementwise ops of a decoder layer: Triton on CUDA, the PyTorch reference everywhere else.

The Triton path is taken for CUDA tensors outside autograd and outside `torch.compile` tracing (inductor
fuses the reference formulas itself), and for CPU fp16/fp32 tensors under TRITON_INTERPRET=1 (tests).
Training (inputs that require grad) always gets the reference, which autograd differentiates.
"""

from __future__ import annotations

import os

import torch

from kernels.fused_reference import (
    add_rms_norm_reference,
    qk_norm_rope_reference,
    rms_norm_reference,
    silu_mul_reference,
)

__all__ = ["add_rms_norm", "fused_available", "qk_norm_rope", "rms_norm", "silu_mul"]

_TRITON = None  # cached module or False


def _impl():
    global _TRITON
    if _TRITON is None:
        try:
            from kernels import _triton_fused
        except Exception:  # ImportError, or a triton build that fails to initialise
            _TRITON = False
        else:
            _TRITON = _triton_fused
    return _TRITON or None


def fused_available() -> bool:
    return _impl() is not None


def _use_triton(*tensors: torch.Tensor) -> bool:
    x = tensors[0]
    if torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if x.is_cuda:
        return fused_available()
    if os.environ.get("TRITON_INTERPRET", "0") == "1" and x.device.type == "cpu":
        # The interpreter cannot do bf16 arithmetic (triton-lang/triton#11584): bf16 uses the reference.
        return x.dtype in (torch.float16, torch.float32) and fused_available()
    return False


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (`rms_norm_reference`); x (..., d), weight (d,)."""
    if _use_triton(x, weight):
        return _impl().rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + x, RMSNorm(residual + x)) in one pass; x, residual (..., d) of one dtype."""
    if _use_triton(x, residual, weight):
        return _impl().rms_norm_triton(x, weight, eps, residual=residual)
    return add_rms_norm_reference(x, residual, weight, eps)


def qk_norm_rope(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    num_q_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """QK-norm + RoPE of the query and key heads of one expert (`qk_norm_rope_reference`).

    x (n, H, D): heads [0, num_q_heads) are queries (normed with `q_weight`), the rest keys (`k_weight`);
    cos, sin (n, D) or (n, 1, D) float32. Returns (n, H, D) in `out_dtype`.
    """
    if _use_triton(x, q_weight, k_weight):
        return _impl().qk_norm_rope_triton(x, q_weight, k_weight, num_q_heads, cos, sin, eps, out_dtype)
    return qk_norm_rope_reference(x, q_weight, k_weight, num_q_heads, cos, sin, eps, out_dtype)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the concatenated gate/up projection output: (..., 2I) -> (..., I)."""
    if _use_triton(gate_up):
        return _impl().silu_mul_triton(gate_up)
    return silu_mul_reference(gate_up)
