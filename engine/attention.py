"""Attention dispatch for the LLM: the fused Triton kernel on CUDA, the PyTorch reference elsewhere."""

from __future__ import annotations

from typing import Literal

import torch

from kernels import AttentionLayout, attention_with_layout, mixed_attention_reference

AttentionImpl = Literal["auto", "kernel", "reference"]
ATTENTION_IMPLS: tuple[str, ...] = ("auto", "kernel", "reference")


def _reference(q, k, v, k_cache, v_cache, layout: AttentionLayout) -> torch.Tensor:
    # The layout was validated on the host by build_layout: skip the range check and its device sync.
    return mixed_attention_reference(q, k, v, k_cache, v_cache, *layout.indices, check=False)


def _kernel(q, k, v, k_cache, v_cache, layout: AttentionLayout) -> torch.Tensor:
    return attention_with_layout(q, k, v, k_cache, v_cache, layout)


def select_attention(impl: AttentionImpl, device: torch.device):
    """`auto` uses the kernel on CUDA (every LLM attention: prefill and packed denoising steps)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl == "kernel" or (impl == "auto" and device.type == "cuda"):
        return _kernel
    return _reference
