"""Random checkpoints of any size in the official on-disk format (`rvr make-checkpoint`), and random
in-memory weights for benchmarks.

Every test builds one of these and goes through the real loader; presets also describe the real
BAGEL-7B-MoT shapes for GPU benchmarks with random weights (`random_weights`: no file, built on the
device in seconds even for 14B parameters).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.checkpoint import save_checkpoint
from engine.config import BagelConfig, ImageTransform, LLMConfig, VAEConfig, ViTConfig
from engine.model.bagel import Bagel
from engine.model.heads import PositionEmbedding, sincos_2d_table
from engine.model.llm import RMSNorm, RotaryEmbedding
from engine.model.vae import AutoEncoder
from engine.tokenizer import Tokenizer, write_tiny_tokenizer


def preset(name: str, vocab_size: int = 152064) -> BagelConfig:
    """`tiny` (tests, ~1 MB), `small` (demo-sized), `bagel-7b` (the real shapes)."""
    if name == "tiny":
        return BagelConfig(
            llm=LLMConfig(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=vocab_size,
                max_position_embeddings=4096,
            ),
            vit=ViTConfig(
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=2,
                num_hidden_layers=3,
                image_size=56,
            ),
            vae=VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=4),
            max_latent_size=8,
            vit_max_num_patch_per_side=4,
            vae_transform=ImageTransform(128, 32, 16, max_pixels=128 * 128),
            vit_transform=ImageTransform(56, 28, 14, max_pixels=56 * 56),
        )
    if name == "small":
        return BagelConfig(
            llm=LLMConfig(
                hidden_size=256,
                intermediate_size=512,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=vocab_size,
                max_position_embeddings=4096,
            ),
            vit=ViTConfig(
                hidden_size=96,
                intermediate_size=192,
                num_attention_heads=2,
                num_hidden_layers=4,
                image_size=112,
            ),
            vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=8),
            max_latent_size=8,
            vit_max_num_patch_per_side=8,
            vae_transform=ImageTransform(128, 64, 16, max_pixels=128 * 128),
            vit_transform=ImageTransform(112, 56, 14, max_pixels=112 * 112),
        )
    if name == "bagel-7b":
        return BagelConfig()
    raise ValueError(f"unknown preset {name!r} (tiny, small, bagel-7b)")


PRESETS = ("tiny", "small", "bagel-7b")


def make_checkpoint(
    out_dir: str | Path,
    preset_name: str = "tiny",
    seed: int = 0,
    weights: tuple[str, ...] = ("ema", "rvr"),
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random checkpoint (configs, tokenizer, weight files, ae.safetensors) and return its path.

    With both weight sets, `rvr` gets different random weights than `ema`, so tests can tell them apart.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(out)
    tok = Tokenizer.from_dir(out)
    vocab = -(-tok.vocab_size // 64) * 64  # embedding rows rounded up, like Qwen2's padded vocab
    cfg = preset(preset_name, vocab_size=vocab)
    states, vae = {}, None
    for i, name in enumerate(weights):
        torch.manual_seed(seed + 1000 * i)
        states[name] = Bagel(cfg).state_dict()  # default init (llm2vae random, so outputs vary)
        if vae is None:
            vae = AutoEncoder(cfg.vae)  # drawn after the first weight set, shared by all
    save_checkpoint(out, cfg, states, vae.state_dict(), dtype=dtype)
    return out


def random_module(build, cfg: BagelConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """`build(cfg)` on the meta device, materialised on `device` with N(0, 0.02) weights (norms 1, biases 0,
    the frozen sin-cos tables and RoPE frequencies exact), cast to `dtype`. Draws from torch's global RNG."""
    with torch.device("meta"):
        m = build(cfg)
    m = m.to_empty(device=device)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, PositionEmbedding):
                mod.pos_embed.copy_(sincos_2d_table(mod.grid, mod.pos_embed.shape[1]))
            elif isinstance(mod, RMSNorm | torch.nn.LayerNorm | torch.nn.GroupNorm):
                mod.weight.fill_(1.0)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()
            else:
                for name, p in mod.named_parameters(recurse=False):
                    p.normal_(0, 0.02) if name == "weight" else p.zero_()
        for mod in m.modules():
            if isinstance(mod, RotaryEmbedding):
                fresh = RotaryEmbedding(mod.inv_freq.shape[0] * 2, cfg.llm.rope_theta)
                mod.inv_freq = fresh.inv_freq.to(device)
    return m.to(dtype).eval()


@dataclass
class RandomWeights:
    """Everything an `Engine` is built from, with random weights: config, tokenizer, one Bagel, the VAE."""

    cfg: BagelConfig
    tokenizer: Tokenizer
    model: Bagel
    vae: AutoEncoder


def random_weights(
    preset_name: str, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> RandomWeights:
    """A preset's shapes with random weights on `device` (the VAE in float32 off CUDA, like the loader)."""
    tokdir = tempfile.mkdtemp(prefix="rvr-random-tok-")
    write_tiny_tokenizer(tokdir)
    tok = Tokenizer.from_dir(tokdir)
    cfg = preset(preset_name) if preset_name == "bagel-7b" else preset(preset_name, vocab_size=1024)
    torch.manual_seed(seed)
    model = random_module(Bagel, cfg, device, dtype)
    vae_dtype = dtype if device.type == "cuda" else torch.float32
    vae = random_module(lambda c: AutoEncoder(c.vae), cfg, device, vae_dtype)
    return RandomWeights(cfg, tok, model, vae)
