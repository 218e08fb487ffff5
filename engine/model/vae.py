"""FLUX autoencoder (`ae.safetensors`), with the official module names so the file loads without renaming.

Structure follows `flux/modules/autoencoder.py` (as copied into BAGEL's `modeling/autoencoder.py`): GroupNorm(32,
eps 1e-6) + swish ResBlocks, one single-head spatial attention in each mid-block, stride-2 downsampling with
asymmetric zero padding, nearest x2 upsampling. Every channel count is `ch * ch_mult[i]`, so GroupNorm(32) needs
`ch` to be a multiple of 32; small test configs use ch=32.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.config import VAEConfig
from engine.errors import CheckpointError

_GROUPS = 32
_EPS = 1e-6


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=_GROUPS, num_channels=channels, eps=_EPS, affine=True)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1-conv projections."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C, H, W)
        b, c, h, w = x.shape
        hn = self.norm(x)
        # q, k, v: (B, 1, H*W, C), one head of width C, as in FLUX
        q, k, v = (proj(hn).reshape(b, 1, c, h * w).transpose(-1, -2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        # The 1x1 shortcut exists (and is stored) only when the channel count changes.
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C_in, H, W) -> (B, C_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Pad right and bottom only (0,1,0,1): (B, C, H, W) -> (B, C, H/2, W/2) for even H, W.
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _MidBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _DownLevel(nn.Module):
    """Encoder level `down.{i}`: `block` ResBlocks, then `downsample` except at the deepest level."""

    def __init__(self, c_in: int, c_out: int, num_blocks: int, downsample: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(num_blocks))
        self.downsample = Downsample(c_out) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class _UpLevel(nn.Module):
    """Decoder level `up.{i}`: `block` ResBlocks, then `upsample` except at level 0 (full resolution)."""

    def __init__(self, c_in: int, c_out: int, num_blocks: int, upsample: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(num_blocks))
        self.upsample = Upsample(c_out) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, kernel_size=3, stride=1, padding=1)
        in_mult = (1, *cfg.ch_mult)
        last = len(cfg.ch_mult) - 1
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            self.down.append(_DownLevel(cfg.ch * in_mult[i], cfg.ch * mult, cfg.num_res_blocks, i != last))
        c_mid = cfg.ch * cfg.ch_mult[-1]
        self.mid = _MidBlock(c_mid)
        self.norm_out = _norm(c_mid)
        self.conv_out = nn.Conv2d(c_mid, 2 * cfg.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, 3, H, W) -> moments (B, 2*z, H/8, W/8)
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        c = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, kernel_size=3, stride=1, padding=1)
        self.mid = _MidBlock(c)
        # Built deepest-first like FLUX (`up.insert(0, ...)`), so `up.{i}` has ch*ch_mult[i] channels; the
        # forward pass walks `up` in reverse.
        levels: list[_UpLevel] = []
        for i in reversed(range(len(cfg.ch_mult))):
            c_out = cfg.ch * cfg.ch_mult[i]
            levels.insert(0, _UpLevel(c, c_out, cfg.num_res_blocks + 1, i != 0))
            c = c_out
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, cfg.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        # z: (B, z, h, w) -> (B, out_ch, 8h, 8w)
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """FLUX VAE with BAGEL's scale/shift. State-dict keys are `encoder.*` / `decoder.*` with no prefix."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        if cfg.ch % _GROUPS:
            raise ValueError(f"VAE ch={cfg.ch} must be a multiple of {_GROUPS} (GroupNorm groups)")
        if not cfg.ch_mult or cfg.num_res_blocks < 1 or cfg.z_channels < 1:
            raise ValueError(f"invalid VAE config: {cfg}")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """x: (B, 3, H, W) in [-1, 1] -> scale * (z - shift), z: (B, z_channels, H/8, W/8).

        z = mean + exp(0.5 * logvar) * noise (BAGEL samples the posterior); the caller draws `noise` so the
        engine controls the generator. `noise=None` returns the mean (deterministic encode).
        """
        moments = self.encoder(x)
        mean, logvar = torch.chunk(moments, 2, dim=1)
        if noise is None:
            z = mean
        else:
            if tuple(noise.shape) != tuple(mean.shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} != posterior shape {tuple(mean.shape)}")
            z = mean + torch.exp(0.5 * logvar) * noise.to(device=mean.device, dtype=mean.dtype)
        return self.cfg.scale_factor * (z - self.cfg.shift_factor)

    def decode(self, z: Tensor) -> Tensor:
        """z: (B, z_channels, h, w) scaled latent -> image (B, out_ch, 8h, 8w), roughly in [-1, 1]."""
        return self.decoder(z / self.cfg.scale_factor + self.cfg.shift_factor)


def posterior_shape(cfg: VAEConfig, height: int, width: int) -> tuple[int, int, int]:
    """(z_channels, H/8, W/8): the shape of one image's latent (and of its encode noise, batch dim aside)."""
    d = cfg.downsample
    if height <= 0 or width <= 0 or height % d or width % d:
        raise ValueError(f"image size {width}x{height} must be positive multiples of {d}")
    return cfg.z_channels, height // d, width // d


def _shape(shapes: Mapping[str, Sequence[int]], key: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in shapes[key])
    except KeyError:
        raise CheckpointError(f"ae.safetensors: missing key {key!r}") from None


def _indices(shapes: Mapping[str, Sequence[int]], pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern` (one group) over all keys."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def vae_config_from_shapes(
    shapes: Mapping[str, Sequence[int]],
    scale_factor: float = VAEConfig.scale_factor,
    shift_factor: float = VAEConfig.shift_factor,
) -> VAEConfig:
    """Infer the VAE sizes from `ae.safetensors` key -> shape; raises CheckpointError on an inconsistent file."""
    ch, in_channels = _shape(shapes, "encoder.conv_in.weight")[:2]
    levels = _indices(shapes, r"encoder\.down\.(\d+)\.")
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(f"ae.safetensors: encoder.down levels {levels} are not 0..n-1")
    n_blocks = _indices(shapes, r"encoder\.down\.0\.block\.(\d+)\.")
    num_res_blocks = len(n_blocks)
    ch_mult = []
    for i in levels:
        out_channels = _shape(shapes, f"encoder.down.{i}.block.0.conv1.weight")[0]
        if out_channels % ch:
            raise CheckpointError(
                f"ae.safetensors: level {i} has {out_channels} channels, not a multiple of {ch}"
            )
        ch_mult.append(out_channels // ch)
    z2 = _shape(shapes, "encoder.conv_out.weight")[0]
    z_channels = _shape(shapes, "decoder.conv_in.weight")[1]
    if z2 != 2 * z_channels:
        raise CheckpointError(
            f"ae.safetensors: encoder outputs {z2} channels, decoder takes {z_channels} (need 2x)"
        )
    up_blocks = _indices(shapes, r"decoder\.up\.0\.block\.(\d+)\.")
    if len(up_blocks) != num_res_blocks + 1:
        raise CheckpointError(
            f"ae.safetensors: decoder has {len(up_blocks)} blocks per level, expected {num_res_blocks + 1}"
        )
    out_ch = _shape(shapes, "decoder.conv_out.weight")[0]
    return VAEConfig(
        in_channels=in_channels,
        ch=ch,
        out_ch=out_ch,
        ch_mult=tuple(ch_mult),
        num_res_blocks=num_res_blocks,
        z_channels=z_channels,
        scale_factor=float(scale_factor),
        shift_factor=float(shift_factor),
    )
