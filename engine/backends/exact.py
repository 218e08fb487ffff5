"""The exact mode (the default): the eager engine's computation, faster, images within bf16 rounding.

Attached to an engine it (1) concatenates q/k/v and gate/up of every expert into one GEMM each (checkpoint
keys unchanged), (2) runs the per-token elementwise work through the fused Triton kernels on CUDA
(kernels/fused.py), (3) on CUDA with `attention="auto"`, picks kernel or SDPA per shape class of the
denoising step by measurement (engine/attention_choice.py), and (4) on CUDA replays the denoising step
from CUDA graphs for the declared buckets (engine/step/graphs.py; captured by `Engine.warm_up`). On the
CPU only (1) applies (unless `fused_kernels=True` forces the fused ops' PyTorch formulas, for tests), so
the engine computes what eager does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from engine.attention import kernel_attention, sdpa_attention
from engine.attention_choice import MeasuredAttention, cuda_timer
from engine.backends.base import PYTORCH_CAPABILITIES, Backend, Capabilities
from engine.denoise import Denoiser, PackedDenoiser
from engine.step.buckets import parse_buckets

if TYPE_CHECKING:
    from engine.core import Engine

# One 1024x1024 and one 512x512 refine with all three CFG branches.
DEFAULT_GRAPH_BUCKETS = ("3x4096", "3x1024")


class ExactBackend(Backend):
    """Options: `graph_buckets` ("BRANCHESxLATENT_ROWS" specs; empty: no CUDA graphs), `max_padding`
    (largest fraction of padded latent rows a step may replay with), `fused_kernels` (None: on CUDA only,
    where they are Triton; elsewhere they would run the same PyTorch formulas with extra copies),
    `cuda_graphs`."""

    name = "exact"

    def __init__(
        self,
        graph_buckets: Iterable[str] = DEFAULT_GRAPH_BUCKETS,
        *,
        max_padding: float = 0.25,
        fused_kernels: bool | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        if not max_padding >= 0.0:  # also refuses NaN
            raise ValueError(f"max_padding must be >= 0, got {max_padding}")
        self.buckets = parse_buckets(graph_buckets)
        self.max_padding, self.fused_kernels, self.cuda_graphs = max_padding, fused_kernels, cuda_graphs
        self.attention: MeasuredAttention | None = None  # the denoise attention choice, on CUDA

    def capabilities(self) -> Capabilities:
        return PYTORCH_CAPABILITIES

    def attach(self, engine: Engine) -> Denoiser:
        cuda = engine.device.type == "cuda"
        fused_ops = cuda if self.fused_kernels is None else self.fused_kernels
        for ws in engine.weight_sets.values():
            ws.model.llm.fuse_projections()
            ws.model.llm.use_fused_ops(fused_ops)
        attention = engine._attention
        if cuda and engine.attention_impl == "auto":
            candidates = {"kernel": kernel_attention, "sdpa": sdpa_attention}
            self.attention = MeasuredAttention(candidates, default="kernel", timer=cuda_timer())
            attention = self.attention
        packed = PackedDenoiser(engine._marker_ids, attention)
        if not (cuda and self.cuda_graphs and self.buckets):
            return packed
        from engine.step.graphs import CudaGraphCapture, GraphDenoiser

        capture = CudaGraphCapture(engine.device)
        return GraphDenoiser(engine._marker_ids, attention, self.buckets, capture, packed, self.max_padding)
