"""Plain-PyTorch definitions of the fused elementwise ops (the CPU path, autograd path and test oracle).

These are the model's own formulas (engine/model/llm.py), written once: the Triton kernels in
`kernels._triton_fused` compute the same thing in one pass over memory, with the same float32 internal
precision and the same roundings to the storage dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "add_rms_norm_reference",
    "qk_norm_rope_reference",
    "rms_norm_reference",
    "rotate_half",
    "silu_mul_reference",
]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)) over the last dim: normalised in float32, rounded to x's
    dtype, then multiplied by the weight in the promoted dtype of (weight, x)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + x, rms_norm(residual + x)): the residual add (in the storage dtype) and the next norm."""
    h = residual + x
    return h, rms_norm_reference(h, weight, eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def qk_norm_rope_reference(
    x: torch.Tensor,  # (n, H, D) raw q and/or k heads of one expert (any strides)
    q_weight: torch.Tensor,  # (D,) QK-norm weight of heads [0, num_q_heads)
    k_weight: torch.Tensor,  # (D,) QK-norm weight of heads [num_q_heads, H)
    num_q_heads: int,
    cos: torch.Tensor,  # (n, D) or (n, 1, D) float32
    sin: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """QK-norm (RMSNorm over the head dim, in float32) then rotate-half RoPE in float32, rounded to
    `out_dtype`: (n, H, D). Heads below `num_q_heads` are queries, the rest keys."""
    cos = cos.reshape(cos.shape[0], 1, cos.shape[-1])
    sin = sin.reshape(sin.shape[0], 1, sin.shape[-1])
    parts = []
    for heads, weight in ((x[:, :num_q_heads], q_weight), (x[:, num_q_heads:], k_weight)):
        if heads.shape[1]:
            y = rms_norm_reference(heads.float(), weight, eps)  # float32 (weight promotes to float32)
            parts.append((y * cos + rotate_half(y) * sin).to(out_dtype))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dim: (n, 2I) -> (n, I)."""
    half = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :half]) * gate_up[..., half:]
