"""The packed step executor's replayable form: shape buckets, padded step layouts and CUDA-graph replay of
the denoising step (docs/exact-mode.md). The user-facing pipelines (engine/pipelines.py) never see it:
it is a `Denoiser` (engine/denoise.py) that the exact backend hands the engine."""

from engine.step.buckets import GraphBucket, StepShape, choose_bucket, parse_buckets
from engine.step.graphs import CudaGraphCapture, EagerReplay, GraphCapture, GraphDenoiser

__all__ = [
    "CudaGraphCapture",
    "EagerReplay",
    "GraphBucket",
    "GraphCapture",
    "GraphDenoiser",
    "StepShape",
    "choose_bucket",
    "parse_buckets",
]
