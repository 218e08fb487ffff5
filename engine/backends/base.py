"""Backend interface, registry, shape buckets and artifact cache keys (docs/backends.md §2, §3, §4).

A backend changes how an `Engine` runs its LLM forwards without changing what they compute; it comes in
through the engine's constructor. `exact` (the default) is eager's computation with concatenated
projections, fused elementwise kernels, measured attention and CUDA-graph replay; `eager` is the
reference, `inductor` compiles the per-token blocks, `tensorrt` builds engines from the exported
`DenoiseStep`. Artifacts that outlive a process (TensorRT engines) live under an `ArtifactKey` directory:
Torch-TensorRT's own engine cache keys on the graph and input specs only, not on the GPU or library
versions (docs/backends.md §3), so the service namespaces by device SM, library versions, model hash,
precision and shape bucket itself.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from engine.core import Engine
    from engine.denoise import Denoiser


class BackendUnavailable(RuntimeError):
    """The backend's libraries or hardware are missing on this machine."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can run; the engine (or its operator) checks requests against it."""

    dtypes: tuple[str, ...]  # model dtypes it runs ("float32", "bfloat16", ...)
    devices: tuple[str, ...]  # device types ("cpu", "cuda")
    max_n: int | None  # latent tokens per image; None: any
    max_p: int | None  # cached context tokens per CFG branch; None: any
    cfg_batching: bool  # all CFG branches of all requests in one packed forward
    varlen: bool  # branches with different cached lengths P in one call
    artifacts: bool  # builds on-disk artifacts under an ArtifactKey


# The packed PyTorch forward (eager or torch.compile'd blocks): any dtype, device and shape, all branches
# of all requests in one call.
PYTORCH_CAPABILITIES = Capabilities(
    dtypes=("float32", "bfloat16", "float16"),
    devices=("cpu", "cuda"),
    max_n=None,
    max_p=None,
    cfg_batching=True,
    varlen=True,
    artifacts=False,
)


class Backend(ABC):
    name: ClassVar[str]

    @abstractmethod
    def capabilities(self) -> Capabilities: ...

    @abstractmethod
    def attach(self, engine: Engine) -> Denoiser | None:
        """Prepare `engine`'s weight sets for this backend (called once, by `Engine.__init__`); returns the
        denoiser its steps run through, or None for the engine's packed forward."""


# ---------------------------------------------------------------------------------------------- registry

_REGISTRY = {
    "exact": ("engine.backends.exact", "ExactBackend"),
    "eager": ("engine.backends.eager", "EagerBackend"),
    "inductor": ("engine.backends.inductor", "InductorBackend"),
    "tensorrt": ("engine.backends.tensorrt", "TensorRTBackend"),
}
BACKENDS: tuple[str, ...] = tuple(_REGISTRY)


def get_backend(name: str, **options) -> Backend:
    """A configured backend; raises `BackendUnavailable` when its libraries are missing here."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    module, cls = _REGISTRY[name]
    # Imported lazily, so an unused backend costs nothing; constructing it is what may fail.
    backend_cls = getattr(importlib.import_module(module), cls)
    try:
        inspect.signature(backend_cls).bind(**options)
    except TypeError as exc:
        raise ValueError(f"backend {name!r}: {exc}") from None
    return backend_cls(**options)


# ------------------------------------------------------------------------------------------ shape buckets


@dataclass(frozen=True)
class ShapeBucket:
    """One dynamic-shape profile: (min, opt, max) of latent tokens N and cached context tokens P.

    Kernels are tuned at `opt`, so a service builds one artifact per resolution bucket instead of one
    wide range (docs/backends.md §4).
    """

    n: tuple[int, int, int]
    p: tuple[int, int, int]

    def __post_init__(self) -> None:
        for dim, (lo, opt, hi) in (("n", self.n), ("p", self.p)):
            # max >= 2: a dimension of size 1 is specialised (made static) by torch.export.
            if not (1 <= lo <= opt <= hi and hi >= 2):
                raise ValueError(f"bucket {dim} needs 1 <= min <= opt <= max, max >= 2; got {(lo, opt, hi)}")

    def contains(self, n: int, p: int) -> bool:
        return self.n[0] <= n <= self.n[2] and self.p[0] <= p <= self.p[2]

    @property
    def label(self) -> str:
        return "n{}-{}-{}_p{}-{}-{}".format(*self.n, *self.p)


def default_buckets(max_n: int, max_p: int) -> tuple[ShapeBucket, ...]:
    """Two N regimes (up to a quarter of the largest image, and the rest), one P range."""
    quarter = max_n // 4
    p = (1, min(1024, max_p), max_p)
    if quarter < 2:
        return (ShapeBucket((1, max_n, max_n), p),)
    return ShapeBucket((1, quarter, quarter), p), ShapeBucket((quarter + 1, max_n, max_n), p)


def select_bucket(buckets: Iterable[ShapeBucket], n: int, p: int) -> ShapeBucket:
    """The tightest bucket holding (n, p): smallest max N, then smallest max P."""
    fits = [b for b in buckets if b.contains(n, p)]
    if not fits:
        raise ValueError(f"no shape bucket holds N={n}, P={p}")
    return min(fits, key=lambda b: (b.n[2], b.p[2]))


# ------------------------------------------------------------------------------------------- cache keys

_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


def device_tag(device: torch.device | str) -> str:
    """`sm_90` for a CUDA device (the architecture a TensorRT plan is tied to), else the device type."""
    dev = torch.device(device)
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        return f"sm_{major}{minor}"
    return dev.type


def library_versions(names: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """Installed distribution versions (`none` when absent); torch's local tag carries the CUDA build."""
    out = {"torch": torch.__version__}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "none"
    return tuple(sorted(out.items()))


def model_hash(module: torch.nn.Module) -> str:
    """Content hash of a module's state dict: names, dtypes, shapes and bytes (reads every weight once)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def precision_tag(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        dtype, str(dtype).removeprefix("torch.")
    )


@dataclass(frozen=True)
class ArtifactKey:
    """Identity of one built artifact; two keys are equal iff the artifact is interchangeable."""

    backend: str
    device: str  # device_tag(): sm_XY or cpu
    versions: tuple[tuple[str, str], ...]  # library_versions()
    model_hash: str
    precision: str  # precision_tag()
    bucket: str  # ShapeBucket.label
    graph: str = "denoise_step"  # which exported module

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def directory(self, root: str | Path) -> Path:
        """root/backend/sm/versions/model/precision/graph/bucket: a readable, namespaced cache directory.

        The version component is the full version string when short, else a hash of it (path-length limits).
        """
        versions = "_".join(f"{lib}-{ver}" for lib, ver in self.versions)
        if len(versions) > 120:
            versions = hashlib.sha256(versions.encode()).hexdigest()[:16]
        parts = (
            self.backend,
            self.device,
            versions,
            self.model_hash[:16],
            self.precision,
            self.graph,
            self.bucket,
        )
        return Path(root).joinpath(*(_SAFE.sub("_", p) for p in parts))


def artifact_key(
    backend: str,
    device: torch.device | str,
    libraries: Iterable[str],
    model_digest: str,
    dtype: torch.dtype,
    bucket: ShapeBucket,
    graph: str = "denoise_step",
) -> ArtifactKey:
    """The key for an artifact built here, now: fills in the device SM and the installed versions."""
    return ArtifactKey(
        backend,
        device_tag(device),
        library_versions(libraries),
        model_digest,
        precision_tag(dtype),
        bucket.label,
        graph,
    )
