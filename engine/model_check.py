"""`rvr check-model DIR`: verify a checkpoint directory without a GPU and without loading its weights.

Everything the loader (`engine.checkpoint`, `engine.loading`) would refuse is found here from the files'
headers alone: missing or unreadable files (a truncated download fails its safetensors header check),
missing, unexpected or wrongly shaped keys against the model the configs describe (built on the meta
device, so no memory is allocated), stored dtypes the loader cannot convert, and a tokenizer larger than
the embedding. SHA-256 digests of every file the loader reads are printed so a copy can be compared with
its source. The layout itself is described in docs/checkpoints.md.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from engine.checkpoint import (
    AE_FILE,
    WEIGHT_FILES,
    _ignorable,
    dtype_problems,
    key_problems,
    read_header,
)
from engine.config import BagelConfig, load_config
from engine.errors import CheckpointError

CONFIG_FILES = ("llm_config.json", "vit_config.json", "config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
_HASH_CHUNK = 8 << 20


@dataclass
class FileReport:
    """One file the loader reads: size, tensor summary (weight files) and digest."""

    name: str
    size: int
    tensors: int = 0
    params: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)  # safetensors dtype -> tensor count
    sha256: str | None = None


@dataclass
class ModelReport:
    model_dir: Path
    weights: list[str] = field(default_factory=list)  # weight sets a load with this mode would keep
    files: list[FileReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # facts worth knowing that do not stop a load
    problems: list[str] = field(default_factory=list)  # each one would make the loader refuse

    @property
    def ok(self) -> bool:
        return not self.problems


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_model(model_dir: str | Path, weights: str = "auto", hashes: bool = True) -> ModelReport:
    """Check `model_dir` as `load_engine(model_dir, weights=weights)` would read it; never raises for a bad
    checkpoint (every problem is listed in the report)."""
    root = Path(model_dir)
    report = ModelReport(root)
    if not root.is_dir():
        report.problems.append(f"model directory not found: {root}")
        return report
    if weights not in ("auto", "both", "rvr", "ema"):
        report.problems.append(f"weights must be auto, both, rvr or ema; got {weights!r}")
        return report

    headers: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
    for name in (AE_FILE, *_weight_names(root, weights, report)):
        try:
            headers[name] = read_header(root / name)
        except CheckpointError as exc:
            report.problems.append(str(exc))
    cfg = _config(root, headers, report)
    if cfg is not None:
        _check_tensors(cfg, headers, report)
        _check_tokenizer(root, cfg, report)
    for name in _files_read(root, headers):
        report.files.append(_file_report(root / name, headers.get(name), hashes))
    return report


def _weight_names(root: Path, weights: str, report: ModelReport) -> list[str]:
    present = [n for n, f in WEIGHT_FILES.items() if (root / f).is_file()]
    wanted = {"auto": present, "both": ["ema", "rvr"], "rvr": ["rvr"], "ema": ["ema"]}[weights]
    if not present:
        report.problems.append(f"missing file: {root} holds neither ema.safetensors nor rvr.safetensors")
        return []
    for name in wanted:
        if name not in present:
            report.problems.append(f"missing file: {root / WEIGHT_FILES[name]} (--weights {weights})")
    report.weights = [n for n in wanted if n in present]
    if weights in ("auto", "both") and present == ["ema"]:
        report.notes.append(
            "no rvr.safetensors: refine requests would run on the BAGEL (ema) weights, not RvR"
        )
    if weights in ("auto", "both") and present == ["rvr"]:
        report.notes.append("no ema.safetensors: generate, edit and judge would run on the RvR weights")
    return [WEIGHT_FILES[n] for n in report.weights]


def _config(root: Path, headers: dict, report: ModelReport) -> BagelConfig | None:
    """The config the loader would build, or None when the files do not allow one (problems recorded)."""
    from engine.model.vae import vae_config_from_shapes

    for name in CONFIG_FILES:
        if not (root / name).is_file():
            report.problems.append(f"missing file: {root / name}")
    if AE_FILE not in headers or any(not (root / n).is_file() for n in CONFIG_FILES):
        return None
    try:
        vae = vae_config_from_shapes({k: shape for k, (shape, _) in headers[AE_FILE].items()})
        cfg = load_config(root, vae)
    except (CheckpointError, KeyError, ValueError, TypeError) as exc:
        report.problems.append(f"{root}: inconsistent configuration ({exc})")
        return None
    weight_headers = [h for n, h in headers.items() if n != AE_FILE]
    if not weight_headers:
        return None
    rows = weight_headers[0].get("latent_pos_embed.pos_embed", ((0,), ""))[0][0]
    side = math.isqrt(rows)
    if side == 0 or side * side != rows:
        report.problems.append(f"latent_pos_embed.pos_embed has {rows} rows, not a square grid")
        return None
    if side != cfg.max_latent_size:
        report.notes.append(
            f"config.json says max_latent_size {cfg.max_latent_size}; the stored table says {side} (used)"
        )
    return replace(cfg, max_latent_size=side)


def _check_tensors(cfg: BagelConfig, headers: dict, report: ModelReport) -> None:
    import torch

    from engine.model.bagel import Bagel
    from engine.model.vae import AutoEncoder

    with torch.device("meta"):  # shapes and dtypes only: nothing is allocated
        models = {AE_FILE: AutoEncoder(cfg.vae).state_dict(), "bagel": Bagel(cfg).state_dict()}
    for name, header in headers.items():
        state = models[AE_FILE] if name == AE_FILE else models["bagel"]
        shapes = {k: shape for k, (shape, _) in header.items()}
        dtypes = {k: d for k, (_, d) in header.items()}
        expected = {k: tuple(v.shape) for k, v in state.items()}
        problems = key_problems(expected, shapes, None if name == AE_FILE else cfg)
        problems += dtype_problems({k: v.dtype for k, v in state.items()}, dtypes)
        report.problems += [f"{name}: {p}" for p in problems]
        ignored = [k for k in header if k not in state and name != AE_FILE and _ignorable(k, cfg)]
        if ignored:
            report.notes.append(f"{name}: {len(ignored)} tensors of ViT layers that never run are ignored")


def _check_tokenizer(root: Path, cfg: BagelConfig, report: ModelReport) -> None:
    from engine.tokenizer import Tokenizer

    try:
        tok = Tokenizer.from_dir(root)
    except CheckpointError as exc:
        report.problems.append(str(exc))
        return
    if tok.vocab_size > cfg.llm.vocab_size:
        report.problems.append(
            f"tokenizer has {tok.vocab_size} tokens but the model embeds {cfg.llm.vocab_size}"
        )


def _files_read(root: Path, headers: dict) -> list[str]:
    tokenizer = [n for n in TOKENIZER_FILES if (root / n).is_file()]
    configs = [n for n in CONFIG_FILES if (root / n).is_file()]
    return [
        *configs,
        *tokenizer,
        *(n for n in headers if n != AE_FILE),
        *([AE_FILE] if AE_FILE in headers else []),
    ]


def _file_report(path: Path, header: dict | None, hashes: bool) -> FileReport:
    rep = FileReport(path.name, path.stat().st_size)
    if header is not None:
        rep.tensors = len(header)
        for shape, dtype in header.values():
            rep.params += math.prod(shape)
            rep.dtypes[dtype] = rep.dtypes.get(dtype, 0) + 1
    if hashes:
        rep.sha256 = sha256_file(path)
    return rep


def format_report(report: ModelReport) -> list[str]:
    """Human-readable lines for stdout: one per file, then notes and the verdict."""
    lines = []
    width = max((len(f.name) for f in report.files), default=0)
    for f in report.files:
        parts = [f"{f.name:<{width}}", f"{f.size:>15,} B"]
        if f.tensors:
            dtypes = ", ".join(f"{d} x{n}" for d, n in sorted(f.dtypes.items()))
            parts.append(f"{f.tensors} tensors, {f.params:,} params ({dtypes})")
        if f.sha256:
            parts.append(f"sha256 {f.sha256}")
        lines.append("  ".join(parts))
    lines += [f"note: {n}" for n in report.notes]
    if report.ok:
        lines.append(f"ok: {report.model_dir} loads with weights {', '.join(report.weights)}")
    return lines
