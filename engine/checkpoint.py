"""Checkpoint directories in the official BAGEL / RvR layout.

    llm_config.json  vit_config.json  config.json     model configs
    tokenizer.json | vocab.json + merges.txt           tokenizer (+ tokenizer_config.json)
    ema.safetensors  and/or  rvr.safetensors          BAGEL weights / RvR weights (same keys)
    ae.safetensors                                     FLUX autoencoder

Weights are read tensor by tensor from the memory-mapped file straight into the target dtype and device
(the model is built on the meta device first), so host memory holds at most one tensor at a time beyond
the page cache: a 29 GB file loads on a 64 GB host.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from engine.config import BagelConfig, config_to_files, load_config
from engine.errors import CheckpointError
from engine.model.bagel import Bagel
from engine.model.llm import RotaryEmbedding
from engine.model.vae import AutoEncoder, vae_config_from_shapes

WEIGHT_FILES = {"ema": "ema.safetensors", "rvr": "rvr.safetensors"}
AE_FILE = "ae.safetensors"
_VIT_LAYER = re.compile(r"^vit_model\.vision_model\.encoder\.layers\.(\d+)\.")


# Stored dtypes the loader converts exactly into any float target dtype (a quantized or integer tensor
# cast to float would load silently as garbage).
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
_TORCH_TO_SAFETENSORS = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, safetensors dtype) from a file's header; no tensor data is read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for k in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                view = f.get_slice(k)
                out[k] = (tuple(view.get_shape()), view.get_dtype())
            return out
    except FileNotFoundError:
        raise CheckpointError(f"missing file: {path}") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt or truncated files
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {k: shape for k, (shape, _) in read_header(path).items()}


def dtype_problems(expected: dict[str, torch.dtype], stored: dict[str, str]) -> list[str]:
    """Stored dtypes the loader cannot convert faithfully: non-float data for float parameters, or another
    dtype for non-float buffers."""
    problems = []
    for k in sorted(set(expected) & set(stored)):
        want = expected[k]
        ok = stored[k] in FLOAT_DTYPES if want.is_floating_point else stored[k] == _TORCH_TO_SAFETENSORS[want]
        if not ok:
            need = "a float dtype (" + ", ".join(FLOAT_DTYPES) + ")" if want.is_floating_point else want
            problems.append(f"dtype {stored[k]} for {k}: the model needs {need}")
    if len(problems) > 12:
        problems = [*problems[:12], f"... and {len(problems) - 12} more tensors with a wrong dtype"]
    return problems


def weight_files(model_dir: Path) -> dict[str, Path]:
    found = {name: model_dir / f for name, f in WEIGHT_FILES.items() if (model_dir / f).is_file()}
    if not found:
        raise CheckpointError(f"{model_dir} holds neither ema.safetensors nor rvr.safetensors")
    return found


def read_config(model_dir: Path, prefer: str | None = None) -> BagelConfig:
    """Configs from the JSON files, VAE sizes from ae.safetensors, max_latent_size from the stored table."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory not found: {model_dir}")
    try:
        vae = vae_config_from_shapes(read_shapes(model_dir / AE_FILE))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{model_dir / AE_FILE}: unexpected autoencoder layout ({exc})") from None
    cfg = load_config(model_dir, vae)
    files = weight_files(model_dir)
    # Read only the weight file that will be loaded, so a broken other file cannot stop a single-file load.
    shapes = read_shapes(files.get(prefer) or next(iter(files.values())))
    rows = shapes.get("latent_pos_embed.pos_embed", (0,))[0]
    side = math.isqrt(rows)
    if side * side != rows or side == 0:
        raise CheckpointError(f"latent_pos_embed.pos_embed has {rows} rows, not a square grid")
    # Some checkpoints advertise a stale max_latent_size; the stored table is the truth.
    return replace(cfg, max_latent_size=side)


def _ignorable(key: str, cfg: BagelConfig) -> bool:
    """The ViT layer BAGEL drops (the 27th) may be stored; it is never run."""
    m = _VIT_LAYER.match(key)
    return bool(m) and int(m.group(1)) >= cfg.vit.layers_run


def key_problems(
    expected: dict[str, tuple[int, ...]], stored: dict[str, tuple[int, ...]], cfg: BagelConfig | None
) -> list[str]:
    """Missing, unexpected and wrongly shaped keys of a weight file, each kind as one short message."""
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(k for k in set(stored) - set(expected) if cfg is None or not _ignorable(k, cfg))
    wrong = sorted(k for k in set(expected) & set(stored) if tuple(expected[k]) != tuple(stored[k]))
    problems = []
    if missing:
        problems.append(
            f"missing keys ({len(missing)}): {', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}"
        )
    if unexpected:
        problems.append(
            f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:12])}{' ...' if len(unexpected) > 12 else ''}"
        )
    for k in wrong[:12]:
        problems.append(f"shape mismatch for {k}: file {stored[k]}, model {expected[k]}")
    return problems


def check_keys(
    path: Path, expected: dict[str, tuple[int, ...]], stored: dict[str, tuple[int, ...]], cfg
) -> None:
    problems = key_problems(expected, stored, cfg)
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))


def _assign(model: nn.Module, key: str, value: torch.Tensor) -> None:
    *path, name = key.split(".")
    module = model.get_submodule(".".join(path))
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[name] = value


def _load_into(model: nn.Module, path: Path, device: torch.device, dtype: torch.dtype, cfg) -> None:
    state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    header = read_header(path)
    check_keys(path, expected, {k: shape for k, (shape, _) in header.items()}, cfg)
    problems = dtype_problems({k: v.dtype for k, v in state.items()}, {k: d for k, (_, d) in header.items()})
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in expected:
            _assign(model, key, f.get_tensor(key).to(device=device, dtype=dtype))


def load_bagel(path: Path, cfg: BagelConfig, device: torch.device, dtype: torch.dtype) -> Bagel:
    with torch.device("meta"):
        model = Bagel(cfg)
    _load_into(model, path, device, dtype, cfg)
    # Non-persistent buffers are not stored; rebuild them on the target device.
    model.language_model.model.rotary_emb = RotaryEmbedding(cfg.llm.head_dim, cfg.llm.rope_theta).to(device)
    return model.eval()


def load_vae(model_dir: Path, cfg: BagelConfig, device: torch.device, dtype: torch.dtype) -> AutoEncoder:
    with torch.device("meta"):
        vae = AutoEncoder(cfg.vae)
    _load_into(vae, Path(model_dir) / AE_FILE, device, dtype, None)
    return vae.eval()


def save_checkpoint(
    out_dir: Path,
    cfg: BagelConfig,
    weights: dict[str, dict[str, torch.Tensor]],
    vae_state: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.bfloat16,
) -> None:
    """Write configs and weight files (`weights` maps "ema"/"rvr" to Bagel state dicts). The tokenizer is separate."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, doc in config_to_files(cfg).items():
        (out_dir / name).write_text(json.dumps(doc, indent=2) + "\n")
    for name, state in weights.items():
        tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
        save_file(tensors, str(out_dir / WEIGHT_FILES[name]), metadata={"format": "pt"})
    ae = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in vae_state.items()}
    save_file(ae, str(out_dir / AE_FILE), metadata={"format": "pt"})
