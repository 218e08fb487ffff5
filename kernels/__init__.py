"""Attention kernels for rvr-serve.

`mixed_attention` is packed varlen attention in which every query row sees one interval of its own
sequence's keys plus a (possibly shared) range of a KV cache: causal text, bidirectional image blocks
and CFG denoising branches in one launch. On CUDA it runs a Triton kernel; on CPU the PyTorch
reference (or the interpreted kernel under TRITON_INTERPRET=1). Triton is imported lazily.

`kernels.fused` holds the decoder layer's fused elementwise ops (RMSNorm, residual + RMSNorm, QK-norm +
RoPE, SiLU-mul), Triton on CUDA with their PyTorch definitions in `kernels.fused_reference`.
"""

from kernels.attention import attention_with_layout, mixed_attention, triton_available
from kernels.layout import AttentionLayout, Segment, SequenceSpec, build_layout, build_tile_table
from kernels.reference import mixed_attention_reference

__all__ = [
    "AttentionLayout",
    "Segment",
    "SequenceSpec",
    "attention_with_layout",
    "build_layout",
    "build_tile_table",
    "mixed_attention",
    "mixed_attention_reference",
    "triton_available",
]
