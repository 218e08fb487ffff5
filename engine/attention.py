"""Attention implementations for the LLM, one signature: (q, k, v, k_cache, v_cache, layout) -> (T, Hq, D).

- `kernel`: the fused Triton kernel (kernels/), every layout in one launch; CUDA (or the interpreter).
- `reference`: the PyTorch reference of the same contract (the CPU path).
- `sdpa`: `F.scaled_dot_product_attention` with its default dispatch (cuDNN / flash on Hopper), one call
  per sequence over [its cached range ++ its own keys]: the released inferencer's attention. It needs a
  layout without masks (every sequence one bidirectional block: the denoising step); other layouts go to
  the kernel on CUDA and the reference elsewhere.

`auto` is the kernel on CUDA and the reference elsewhere; the exact backend measures kernel against SDPA
per shape class instead (engine/attention_choice.py).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from kernels import AttentionLayout, attention_with_layout, mixed_attention_reference

AttentionImpl = Literal["auto", "kernel", "reference", "sdpa"]
ATTENTION_IMPLS: tuple[str, ...] = ("auto", "kernel", "reference", "sdpa")


def reference_attention(q, k, v, k_cache, v_cache, layout: AttentionLayout) -> torch.Tensor:
    # The layout was validated on the host by build_layout: skip the range check and its device sync.
    return mixed_attention_reference(q, k, v, k_cache, v_cache, *layout.indices, check=False)


def kernel_attention(q, k, v, k_cache, v_cache, layout: AttentionLayout) -> torch.Tensor:
    return attention_with_layout(q, k, v, k_cache, v_cache, layout)


def sdpa_attention(q, k, v, k_cache, v_cache, layout: AttentionLayout) -> torch.Tensor:
    """One SDPA call per sequence (K/V of its cache range and its rows concatenated), default dispatch."""
    if not layout.full_blocks:
        fallback = kernel_attention if q.is_cuda else reference_attention
        return fallback(q, k, v, k_cache, v_cache, layout)
    out = torch.empty_like(q)
    cu, cache_start, cache_len = layout.host
    gqa = q.shape[1] != k.shape[1]
    for i in range(layout.num_seqs):
        s, e, c0, n = cu[i], cu[i + 1], cache_start[i], cache_len[i]
        if e <= s:
            continue
        kb = torch.cat([k_cache[c0 : c0 + n], k[s:e]]).transpose(0, 1)  # (Hkv, S, D)
        vb = torch.cat([v_cache[c0 : c0 + n], v[s:e]]).transpose(0, 1)
        ob = F.scaled_dot_product_attention(q[s:e].transpose(0, 1)[None], kb[None], vb[None], enable_gqa=gqa)
        out[s:e] = ob[0].transpose(0, 1)
    return out


def select_attention(impl: AttentionImpl, device: torch.device):
    """`auto` uses the kernel on CUDA (every LLM attention: prefill and packed denoising steps)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl == "sdpa":
        return sdpa_attention
    if impl == "kernel" or (impl == "auto" and device.type == "cuda"):
        return kernel_attention
    return reference_attention
