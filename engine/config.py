"""Model configuration, read from a BAGEL checkpoint directory.

`llm_config.json` (Qwen2), `vit_config.json` (SigLIP) and `config.json` (BagelConfig) hold the official
fields. The autoencoder has no config file upstream: its sizes are read from `ae.safetensors` shapes and
its scale/shift factors default to FLUX's. Optional extension keys in `config.json` (ignored by the
official code) let small models use smaller image transforms and VAE factors.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from engine.errors import CheckpointError


def _pick(cls, raw: dict[str, Any]):
    """Build dataclass `cls` from the keys of `raw` it knows; unknown keys are ignored (HF configs carry many)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in names})


@dataclass(frozen=True)
class LLMConfig:
    """Qwen2 backbone. qk_norm and untied embeddings are forced by BAGEL, so they are not fields."""

    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    vocab_size: int = 152064
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    model_type: str = "qwen2"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads (GQA)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class ViTConfig:
    """SigLIP NaViT. BAGEL runs `num_hidden_layers - 1` layers (the penultimate layer's output)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_attention_heads: int = 16
    num_hidden_layers: int = 27
    patch_size: int = 14
    image_size: int = 980
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    model_type: str = "siglip_vision_model"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def layers_run(self) -> int:
        return self.num_hidden_layers - 1


@dataclass(frozen=True)
class VAEConfig:
    """FLUX autoencoder; defaults are FLUX.1's values as BAGEL's `load_ae` uses them."""

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class ImageTransform:
    """`MaxLongEdgeMinShortEdgeResize(max, min, stride, max_pixels)` parameters."""

    max_size: int
    min_size: int
    stride: int
    max_pixels: int = 14 * 14 * 9 * 1024


@dataclass(frozen=True)
class BagelConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    interpolate_pos: bool = False
    # Extension keys (absent from official files; defaults are the official transforms).
    vae_transform: ImageTransform = field(default_factory=lambda: ImageTransform(1024, 512, 16))
    vit_transform: ImageTransform = field(default_factory=lambda: ImageTransform(980, 224, 14))

    @property
    def latent_channels(self) -> int:
        return self.vae.z_channels * self.latent_patch_size**2

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token side (8 * 2 = 16 for BAGEL)."""
        return self.vae.downsample * self.latent_patch_size

    @property
    def max_image_side(self) -> int:
        return self.max_latent_size * self.latent_downsample


_EXTENSION_KEYS = ("vae_transform", "vit_transform", "vae_scale_factor", "vae_shift_factor")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing file: {path}") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None


def load_config(model_dir: Path, vae: VAEConfig) -> BagelConfig:
    """Read the three JSON files of a checkpoint directory. `vae` comes from `ae.safetensors` shapes."""
    llm = _pick(LLMConfig, read_json(model_dir / "llm_config.json"))
    vit = _pick(ViTConfig, read_json(model_dir / "vit_config.json"))
    raw = read_json(model_dir / "config.json")
    if "vae_scale_factor" in raw or "vae_shift_factor" in raw:
        vae = VAEConfig(
            **{
                **asdict(vae),
                "scale_factor": float(raw.get("vae_scale_factor", vae.scale_factor)),
                "shift_factor": float(raw.get("vae_shift_factor", vae.shift_factor)),
            }
        )
    kwargs: dict[str, Any] = {
        k: raw[k]
        for k in (
            "latent_patch_size",
            "max_latent_size",
            "vit_max_num_patch_per_side",
            "connector_act",
            "interpolate_pos",
        )
        if k in raw
    }
    for key in ("vae_transform", "vit_transform"):
        if key in raw:
            kwargs[key] = ImageTransform(**raw[key])
    return BagelConfig(llm=llm, vit=vit, vae=vae, **kwargs)


def config_to_files(cfg: BagelConfig) -> dict[str, dict[str, Any]]:
    """The JSON documents a checkpoint directory holds for `cfg` (inverse of `load_config`)."""
    main: dict[str, Any] = {
        "visual_gen": True,
        "visual_und": True,
        "latent_patch_size": cfg.latent_patch_size,
        "max_latent_size": cfg.max_latent_size,
        "vit_max_num_patch_per_side": cfg.vit_max_num_patch_per_side,
        "connector_act": cfg.connector_act,
        "interpolate_pos": cfg.interpolate_pos,
        "timestep_shift": 1.0,
        "vae_config": {"z_channels": cfg.vae.z_channels, "downsample": cfg.vae.downsample},
    }
    default = BagelConfig()
    if cfg.vae_transform != default.vae_transform:
        main["vae_transform"] = asdict(cfg.vae_transform)
    if cfg.vit_transform != default.vit_transform:
        main["vit_transform"] = asdict(cfg.vit_transform)
    if (cfg.vae.scale_factor, cfg.vae.shift_factor) != (default.vae.scale_factor, default.vae.shift_factor):
        main["vae_scale_factor"] = cfg.vae.scale_factor
        main["vae_shift_factor"] = cfg.vae.shift_factor
    llm = {**asdict(cfg.llm), "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": False}
    vit = asdict(cfg.vit)
    return {"llm_config.json": llm, "vit_config.json": vit, "config.json": main}
