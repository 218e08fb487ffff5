"""Building an `Engine` from a checkpoint directory (or the bundled / cached default model)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch

from engine.backends.base import BackendUnavailable, get_backend
from engine.checkpoint import load_bagel, load_vae, read_config, weight_files
from engine.core import Engine
from engine.errors import CheckpointError
from engine.requests import RequestLimits
from engine.tokenizer import Tokenizer

WeightsMode = Literal["auto", "both", "rvr", "ema"]
BUNDLED_MODEL = Path(__file__).parent / "assets" / "demo"
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def default_model_dir(cache_dir: str | Path | None = None) -> Path:
    """The bundled demo model when the package ships one, else a tiny random checkpoint built once in a cache."""
    if (BUNDLED_MODEL / "config.json").is_file():
        return BUNDLED_MODEL
    from engine.tiny import make_checkpoint

    root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "rvr-serve"
    path = root / "tiny-random-v1"
    if not (path / "ae.safetensors").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-random-v1.", dir=root))
        make_checkpoint(tmp, "tiny", seed=0)
        try:
            tmp.rename(path)  # atomic: concurrent starters never see a half-written directory
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise CheckpointError(f"invalid device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device 'cuda' requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """float32 on CPU; bf16 on GPU (norms, RoPE and the flow update stay float32 inside the model)."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def load_engine(
    model_dir: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    *,
    weights: WeightsMode = "auto",
    attention: str = "auto",
    kv_capacity: int | None = None,
    limits: RequestLimits | None = None,
    cache_dir: str | Path | None = None,
    backend: str = "exact",
    backend_options: dict | None = None,
) -> Engine:
    """Load a checkpoint directory into an `Engine`.

    `weights`: `auto`/`both` keep every weight file resident (refine uses rvr, the rest ema);
    `rvr` or `ema` loads one file and uses it for every task. `backend`: `exact` (default: eager's
    computation with concatenated projections, fused kernels, measured attention and CUDA graphs on a GPU),
    `eager` (the reference), `inductor` (torch.compile of the per-token blocks) or `tensorrt` (needs
    TensorRT installed).

        >>> engine = load_engine("models/RvR-7B-MoT", device="cuda")          # doctest: +SKIP
        >>> out = engine.refine(image, "two red apples on a table", seed=42)  # doctest: +SKIP
    """
    path = Path(model_dir) if model_dir is not None else default_model_dir(cache_dir)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    cfg = read_config(path, weights if weights in ("rvr", "ema") else None)
    files = weight_files(path)
    if weights in ("rvr", "ema"):
        if weights not in files:
            raise CheckpointError(f"{path} has no {weights}.safetensors")
        files = {weights: files[weights]}
    elif weights not in ("auto", "both"):
        raise CheckpointError(f"weights must be auto, both, rvr or ema; got {weights!r}")
    tokenizer = Tokenizer.from_dir(path)
    if tokenizer.vocab_size > cfg.llm.vocab_size:
        raise CheckpointError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model embeds {cfg.llm.vocab_size}"
        )
    try:
        compile_backend = get_backend(backend, **(backend_options or {}))
    except (BackendUnavailable, ValueError) as exc:
        raise CheckpointError(f"backend {backend!r}: {exc}") from None
    models = {name: load_bagel(f, cfg, dev, dt) for name, f in files.items()}
    vae = load_vae(path, cfg, dev, dt if dev.type == "cuda" else torch.float32)
    info = {"model_dir": str(path), "weight_files": {k: v.name for k, v in files.items()}}
    try:
        return Engine(
            cfg,
            tokenizer,
            models,
            vae,
            dev,
            dt,
            attention=attention,
            kv_capacity=kv_capacity,
            limits=limits,
            backend=compile_backend,
            info=info,
        )
    except BackendUnavailable as exc:  # e.g. tensorrt on a CPU engine
        raise CheckpointError(f"backend {backend!r}: {exc}") from None
