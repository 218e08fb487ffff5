"""TensorRT backend: Torch-TensorRT dynamo on the exported `DenoiseStep` (docs/backends.md §2, §3).

Optional and import-guarded: `tensorrt` and `torch_tensorrt` cannot be installed from PyPI alone (the
TensorRT library wheels are stubs that download from NVIDIA's index, docs/backends.md §6), so constructing
the backend raises `BackendUnavailable` where they are missing. One engine is built per shape bucket with
`use_explicit_typing=True` (TensorRT 11 takes precision only from the graph, docs/backends.md §7.1: load the
model in bf16 for a bf16 engine) and saved as an ExportedProgram (`.ep`) under an `ArtifactKey` directory
that names the GPU architecture and the TensorRT / Torch-TensorRT / torch versions, which Torch-TensorRT's
own engine cache does not (docs/backends.md §3). Prefill stays on the engine's eager path; denoise steps run
branch by branch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.backends.base import (
    ArtifactKey,
    Backend,
    BackendUnavailable,
    Capabilities,
    ShapeBucket,
    default_buckets,
    device_tag,
    library_versions,
    model_hash,
    precision_tag,
)
from engine.backends.branchwise import BranchwiseDenoiser, BucketedStep, branchwise_denoiser
from engine.backends.export import DenoiseStep, export_denoise_step

if TYPE_CHECKING:
    from engine.core import Engine

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "rvr-serve" / "tensorrt"


def require_tensorrt() -> tuple[Any, Any]:
    """(tensorrt, torch_tensorrt) modules, or `BackendUnavailable` saying how to get them."""
    try:
        import tensorrt
        import torch_tensorrt
    except (ImportError, OSError) as exc:  # OSError: bindings installed without the TensorRT libraries
        raise BackendUnavailable(
            "the tensorrt backend needs the `tensorrt` and `torch_tensorrt` packages with the TensorRT "
            f"libraries ({exc}). They cannot be installed from PyPI alone: the TensorRT library wheels "
            "download from NVIDIA's index at install time. Use an NGC PyTorch container or a machine that "
            "can reach NVIDIA's package index, with torch-tensorrt matching this torch's minor version; "
            "otherwise use backend 'inductor' or 'eager'."
        ) from exc
    return tensorrt, torch_tensorrt


class TensorRTBackend(Backend):
    """Options: `cache_dir`, `buckets` (default: two N regimes up to the model's largest image, P up to
    `max_p`), `max_p`, and extra keyword arguments for `torch_tensorrt.dynamo.compile`."""

    name = "tensorrt"

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        *,
        buckets: Sequence[ShapeBucket] | None = None,
        max_p: int = 8192,
        **compile_options: Any,
    ) -> None:
        self.trt, self.torch_trt = require_tensorrt()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
        self.buckets = tuple(buckets) if buckets else None
        self.max_p = max_p
        self.compile_options = {"min_block_size": 1, **compile_options}

    def capabilities(self) -> Capabilities:
        return Capabilities(
            dtypes=("bfloat16", "float16", "float32"),
            devices=("cuda",),
            max_n=max(b.n[2] for b in self.buckets) if self.buckets else None,
            max_p=max(b.p[2] for b in self.buckets) if self.buckets else self.max_p,
            cfg_batching=False,
            varlen=False,
            artifacts=True,
        )

    def key(self, step: DenoiseStep, bucket: ShapeBucket, device: torch.device, digest: str) -> ArtifactKey:
        """`digest`: model_hash(step), computed once per weight set (it reads every weight)."""
        versions = dict(library_versions(()))
        versions.update(tensorrt=self.trt.__version__, torch_tensorrt=self.torch_trt.__version__)
        return ArtifactKey(
            self.name,
            device_tag(device),
            tuple(sorted(versions.items())),
            digest,
            precision_tag(step.dtype),
            bucket.label,
        )

    def build(self, step: DenoiseStep, bucket: ShapeBucket, device: torch.device, digest: str):
        """Load the bucket's engine from the cache, or build and save it."""
        path = self.key(step, bucket, device, digest).directory(self.cache_dir) / "denoise_step.ep"
        if path.is_file():
            return self.torch_trt.load(str(path)).module()
        inputs = self._inputs(step, bucket)
        module = self.torch_trt.dynamo.compile(
            export_denoise_step(step, bucket),
            arg_inputs=inputs,
            device=device,
            use_explicit_typing=True,
            **self.compile_options,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        self.torch_trt.save(module, str(tmp), output_format="exported_program", arg_inputs=inputs)
        os.replace(tmp, path)  # atomic: a concurrent loader never sees a partial file
        return module

    def prepare(
        self, step: DenoiseStep, buckets: Sequence[ShapeBucket], device: torch.device
    ) -> BucketedStep:
        digest = model_hash(step)
        return BucketedStep({b: self.build(step, b, device, digest) for b in buckets})

    def attach(self, engine: Engine) -> BranchwiseDenoiser:
        if engine.device.type != "cuda":
            raise BackendUnavailable(
                f"TensorRT engines run on CUDA devices; this engine is on {engine.device}"
            )
        buckets = self.buckets or default_buckets(engine.cfg.max_latent_size**2, self.max_p)
        steps = {
            name: self.prepare(DenoiseStep.from_engine(engine, name), buckets, engine.device)
            for name in engine.weight_sets
        }
        return branchwise_denoiser(engine, steps)

    def _inputs(self, step: DenoiseStep, bucket: ShapeBucket) -> list:
        # min/opt/max profiles for N and P; t and rope are 0-d.
        spec = self.torch_trt.Input
        c, layers, hkv, d = step.latent_channels, len(step.layers), step.num_kv_heads, step.head_dim
        n, p = bucket.n, bucket.p
        kv = {f"{k}_shape": (layers, p[i], hkv, d) for i, k in enumerate(("min", "opt", "max"))}
        rows = {f"{k}_shape": (n[i],) for i, k in enumerate(("min", "opt", "max"))}
        latents = {k: (*v, c) for k, v in rows.items()}
        return [
            spec(**latents, dtype=torch.float32),
            spec(shape=(), dtype=torch.float32),
            spec(**rows, dtype=torch.int64),
            spec(**kv, dtype=step.dtype),
            spec(**kv, dtype=step.dtype),
            spec(shape=(), dtype=torch.int64),
        ]
