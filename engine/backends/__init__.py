"""Compile backends for the engine (docs/backends.md §2): `exact` (the default: eager's computation with
fused kernels and CUDA graphs), `eager` (reference), `inductor`
(torch.compile of the per-token blocks), `tensorrt` (optional; engines built from the exported
`DenoiseStep`). A backend is given to the engine's constructor: `Engine(..., backend=get_backend(name))`,
or `load_engine(dir, backend=name)`.
"""

from __future__ import annotations

from engine.backends.base import (
    BACKENDS,
    ArtifactKey,
    Backend,
    BackendUnavailable,
    Capabilities,
    ShapeBucket,
    artifact_key,
    default_buckets,
    get_backend,
    model_hash,
    select_bucket,
)

__all__ = [
    "BACKENDS",
    "ArtifactKey",
    "Backend",
    "BackendUnavailable",
    "Capabilities",
    "ShapeBucket",
    "artifact_key",
    "default_buckets",
    "get_backend",
    "model_hash",
    "select_bucket",
]
