"""Shared fixtures for the engine tests: one tiny random checkpoint and one engine per session."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Tiny shapes: intra-op threads only add contention (2 shared cores make OpenMP spin-waits 10-50x slower).
torch.set_num_threads(1)

# docs/rvr.md §2, written out here independently of engine.prompts.
SYSTEM_PROMPT = (
    "Analyze the potential misalignment between the generated image and the user's prompt. "
    "Then, re-generate the image to precisely align with the user's prompt.\n\n"
    "Here is the generated image:\n"
)
assert len(SYSTEM_PROMPT) == 187
assert hashlib.sha256(SYSTEM_PROMPT.encode()).hexdigest()[:16] == "dbb330a2ae7ea6e9"


def refine_prompt(user_prompt: str) -> str:
    """docs/rvr.md §2 user template (trailing space included)."""
    return "Here is the user's prompt: " + user_prompt + ". "


def vae_rule(width: int, height: int, max_size: int, min_size: int, stride: int, max_pixels: int):
    """docs/model.md §7 resize rule, written from that text (Python's banker's round)."""

    def make_div(v):
        return max(stride, round(v / stride) * stride)

    def apply(w, h, s):
        return make_div(round(w * s)), make_div(round(h * s))

    scale = min(max_size / max(width, height), 1.0)
    scale = max(scale, min_size / min(width, height))
    w, h = apply(width, height, scale)
    if w * h > max_pixels:
        w, h = apply(w, h, max_pixels / (w * h))
    if max(w, h) > max_size:
        w, h = apply(w, h, max_size / max(w, h))
    return w, h


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "LA": 2, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    if channels == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr, mode)


def max_pixel_diff(a: Image.Image, b: Image.Image) -> int:
    assert a.size == b.size
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny random checkpoint (ema + rvr, fp32) written by the real writer. Treat as read-only."""
    from engine.tiny import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "tiny", seed=0)


@pytest.fixture
def ckpt_copy(tiny_ckpt, tmp_path) -> Path:
    """A private, editable copy of the tiny checkpoint."""
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_engine(tiny_ckpt):
    """A float32 CPU engine on the tiny checkpoint (both weight sets, growable KV pools)."""
    from engine.loading import load_engine

    return load_engine(tiny_ckpt, device="cpu", dtype="float32")


def run_llm(model, embeds, positions, segments, pool_layers, *, cache=(0, 0), writes=(), gen_rows=None):
    """One LLM forward of a single sequence with the reference attention (built like engine/core.py).

    `segments`: [(length, causal), ...]; `cache`: (start, len) of pool rows the sequence also sees;
    `writes`: [(row, n, slot), ...] persisted into `pool_layers`; `gen_rows`: [(is_gen, n), ...] runs.
    """
    from engine.attention import select_attention
    from engine.model.packing import CacheWrite, ForwardBatch, Routing
    from kernels import Segment, SequenceSpec, build_layout

    attention = select_attention("reference", torch.device("cpu"))

    n = embeds.shape[0]
    spec = SequenceSpec(tuple(Segment(length, causal) for length, causal in segments), *cache)
    runs = gen_rows if gen_rows is not None else [(False, n)]
    batch = ForwardBatch(
        torch.as_tensor(positions, dtype=torch.long),
        Routing.from_runs(list(runs)),
        build_layout([spec]),
        [CacheWrite(*w) for w in writes],
    )
    return model.llm(embeds, batch, pool_layers, attention)


def empty_pool(model, rows: int):
    """Per-layer (K, V) scratch tensors shaped like the engine's pool."""

    cfg = model.config.llm
    return [
        (
            torch.zeros(rows, cfg.num_key_value_heads, cfg.head_dim),
            torch.zeros(rows, cfg.num_key_value_heads, cfg.head_dim),
        )
        for _ in range(cfg.num_hidden_layers)
    ]
