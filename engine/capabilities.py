"""What a loaded engine can do and the limits it enforces, as plain data (docs/serving.md §6).

`Engine.capabilities()` builds one `Capabilities`; the server publishes it (per worker) and intersects it
with its settings, so a request the API accepts is one every live worker can run. Standard library only:
API pods read these dicts without torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

# Bytes read from the start and the end of every weight file's tensor data for the fingerprint.
_SAMPLE_BYTES = 1 << 20
_IDENTITY_FILES = (
    "config.json",
    "llm_config.json",
    "vit_config.json",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
)


@dataclass(frozen=True)
class Capabilities:
    """One engine's tasks, placement and request limits. Sides are pixels of the output image."""

    model: str  # the checkpoint directory's name
    model_hash: str  # checkpoint_fingerprint of that directory
    tasks: tuple[str, ...]
    device: str
    dtype: str
    weights: tuple[str, ...]  # resident weight sets (rvr, ema)
    backend: str
    attention: str
    speed_modes: tuple[str, ...] = ("exact",)
    min_side: int = 16
    max_side: int = 1024
    side_multiple: int = 16
    min_steps: int = 2
    max_steps: int = 1000
    max_rounds: int = 8
    max_prompt_tokens: int = 1024
    tokenizer_hash: str = ""  # sha256 of the tokenizer's JSON: the key it is shared under

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("tasks", "weights", "speed_modes"):
            d[name] = list(d[name])
        return d

    def summary(self) -> str:
        """The one start-up log line of every process that loads a model (rvr serve, rvr worker, the CLI)."""
        return (
            f"model {self.model} ({self.model_hash[:12] or 'no hash'}) on {self.device}, {self.dtype}, "
            f"weights {'+'.join(self.weights)}, backend {self.backend}, attention {self.attention}, "
            f"speed modes {','.join(self.speed_modes)}; output sides {self.min_side}-{self.max_side} "
            f"(multiple of {self.side_multiple})"
        )

    @classmethod
    def from_dict(cls, d: dict) -> Capabilities:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for name in ("tasks", "weights", "speed_modes"):
            if name in known:
                known[name] = tuple(known[name])
        return cls(**known)


def checkpoint_fingerprint(model_dir: str | Path) -> str:
    """A cheap identity of a checkpoint directory (sha256, hex): its config and tokenizer files, and per
    weight file its name, size, safetensors header and the first and last MiB of tensor data. Two copies
    of one checkpoint agree; a fine-tune (every weight changed) differs. Not a digest of every byte: that
    is `rvr check-model` (docs/checkpoints.md)."""
    root = Path(model_dir)
    h = hashlib.sha256()
    for name in _IDENTITY_FILES:
        path = root / name
        if path.is_file():
            h.update(f"{name}\n".encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())
    for path in sorted(root.glob("*.safetensors")):
        size = path.stat().st_size
        h.update(f"{path.name}|{size}\n".encode())
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(header_len, size)))
            data_start = 8 + header_len
            f.seek(data_start)
            h.update(f.read(_SAMPLE_BYTES))
            f.seek(max(data_start, size - _SAMPLE_BYTES))
            h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


def tokenizer_hash(tokenizer_json: str) -> str:
    return hashlib.sha256(tokenizer_json.encode()).hexdigest()
