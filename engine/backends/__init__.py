"""Compile backends for the engine (compile-backends.md §7): `eager` (reference), `inductor`
(torch.compile of the per-token blocks), `tensorrt` (optional; engines built from the exported
`DenoiseStep`). `apply_backend(engine, name, **options)` switches a loaded engine in place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from engine.batching import Engine


def apply_backend(engine: Engine, name: str = "eager", **options) -> Backend:
    """Switch `engine` to backend `name` in place and return the configured backend.

    Raises `ValueError` for an unknown name or option and `BackendUnavailable` when the backend cannot run
    here (TensorRT libraries missing, or a CPU engine for `tensorrt`).
    """
    backend = get_backend(name, **options)
    backend.apply(engine)
    return backend


__all__ = [
    "BACKENDS",
    "ArtifactKey",
    "Backend",
    "BackendUnavailable",
    "Capabilities",
    "ShapeBucket",
    "apply_backend",
    "artifact_key",
    "default_buckets",
    "get_backend",
    "model_hash",
    "select_bucket",
]
