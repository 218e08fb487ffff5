"""Image preprocessing and token-grid helpers, matching BAGEL's `data/transforms.py` and `data/data_utils.py`.

Resize: `MaxLongEdgeMinShortEdgeResize` with Python's (banker's) `round`, then bicubic with antialias. For PIL
inputs torchvision's `F.resize(..., antialias=True)` calls `PIL.Image.resize(size, BICUBIC)`, so PIL is used
directly. Pixels go to [-1, 1] via ToTensor + Normalize(0.5, 0.5); decoded images come back with a truncating
uint8 cast, as in the official `decode_image`.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from engine.config import ImageTransform
from engine.errors import InvalidRequestError

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def pil_img2rgb(img: Image.Image) -> Image.Image:
    """RGB copy of `img`; images with alpha or palette transparency are composited on white."""
    if img.mode in _ALPHA_MODES or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return img.convert("RGB")


def _make_divisible(value: int, stride: int) -> int:
    return max(stride, int(round(value / stride) * stride))


def _apply_scale(width: int, height: int, scale: float, stride: int) -> tuple[int, int]:
    return _make_divisible(round(width * scale), stride), _make_divisible(round(height * scale), stride)


def resize_dims(width: int, height: int, t: ImageTransform) -> tuple[int, int]:
    """(new_w, new_h) per the official `MaxLongEdgeMinShortEdgeResize.forward` (one image, img_num=1).

    Both results are multiples of `t.stride`, at least `t.stride` and at most `t.max_size` (when max_size is a
    multiple of stride). Extreme aspect ratios are not rejected: the official rule maps them to stride x max_size
    (e.g. 17x4000 -> 16x1024 for the VAE rule), which is still a valid grid.
    """
    if width <= 0 or height <= 0:
        raise InvalidRequestError(f"image has no pixels ({width}x{height})")
    stride = t.stride
    # docs/model.md §7 steps 1-2: shrink the long edge to max_size (never enlarge), then enlarge the short
    # edge up to min_size.
    scale = min(t.max_size / max(width, height), 1.0)
    scale = max(scale, t.min_size / min(width, height))
    new_w, new_h = _apply_scale(width, height, scale, stride)
    # Step 3: an *area* ratio applied to each side (official quirk; over-shrinks by sqrt of the ratio).
    if new_w * new_h > t.max_pixels:
        scale = t.max_pixels / (new_w * new_h)
        new_w, new_h = _apply_scale(new_w, new_h, scale, stride)
    # Step 4: the long edge back under max_size.
    if max(new_w, new_h) > t.max_size:
        scale = t.max_size / max(new_w, new_h)
        new_w, new_h = _apply_scale(new_w, new_h, scale, stride)
    return new_w, new_h


def resize_image(img: Image.Image, t: ImageTransform) -> Image.Image:
    """Resize by the rule of `t` with bicubic + antialias (PIL's BICUBIC filter scales its support when shrinking)."""
    return img.resize(resize_dims(img.width, img.height, t), Image.BICUBIC)


def to_tensor(img: Image.Image) -> Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1] (ToTensor, then Normalize(mean 0.5, std 0.5))."""
    if img.mode != "RGB":
        raise ValueError(f"to_tensor expects an RGB image, got mode {img.mode!r} (use pil_img2rgb)")
    # arr: (H, W, 3) uint8
    arr = np.asarray(img, dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div(255.0)
    return (x - 0.5) / 0.5


def tensor_to_pil(x: Tensor) -> Image.Image:
    """(3, H, W) decoder output in ~[-1, 1] -> RGB image: clamp(x*0.5+0.5, 0, 1)*255, truncated to uint8."""
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"expected (3, H, W), got {tuple(x.shape)}")
    # (H, W, 3); `.to(torch.uint8)` truncates toward zero, as the official post-processing does.
    img = (x * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0) * 255
    return Image.fromarray(img.to(torch.uint8).cpu().numpy())


def patchify_vit(x: Tensor, patch: int, max_side: int) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """(C, H, W) image -> patches (h*w, p*p*C), position ids (h*w,) = row*max_side + col, grid (h, w).

    Tokens are in (row, col) order; features in (p_row, p_col, channel) order, channel fastest.
    """
    c, height, width = x.shape
    if height % patch or width % patch:
        raise ValueError(f"image size {width}x{height} is not a multiple of patch {patch}")
    h, w = height // patch, width // patch
    if h > max_side or w > max_side:
        raise ValueError(f"patch grid {h}x{w} exceeds max {max_side} per side")
    # (C, h, p, w, p) -> (h, w, p, p, C)
    patches = x.reshape(c, h, patch, w, patch).permute(1, 3, 2, 4, 0).reshape(h * w, patch * patch * c)
    return patches, _grid_ids(h, w, max_side, x.device), (h, w)


def _grid_ids(h: int, w: int, max_side: int, device: torch.device | None = None) -> Tensor:
    # (h*w,) flattened row*max_side + col ("extrapolate" ids: the table is not resampled to the grid)
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    return (rows[:, None] * max_side + cols[None, :]).flatten()


def patchify_latent(z: Tensor, p: int) -> Tensor:
    """(C, h*p, w*p) latent -> (h*w, p*p*C) tokens, row-major over (h, w), features (p_row, p_col, channel)."""
    c, height, width = z.shape
    if height % p or width % p:
        raise ValueError(f"latent size {height}x{width} is not a multiple of patch {p}")
    h, w = height // p, width // p
    # (C, h, p, w, p) -> (h, w, p, p, C)
    return z.reshape(c, h, p, w, p).permute(1, 3, 2, 4, 0).reshape(h * w, p * p * c)


def unpatchify_latent(tokens: Tensor, h: int, w: int, p: int, c: int) -> Tensor:
    """Inverse of `patchify_latent`: (h*w, p*p*C) -> (C, h*p, w*p)."""
    if tokens.shape != (h * w, p * p * c):
        raise ValueError(f"tokens shape {tuple(tokens.shape)} != ({h * w}, {p * p * c})")
    # (h, w, p, p, C) -> (C, h, p, w, p)
    return tokens.reshape(h, w, p, p, c).permute(4, 0, 2, 1, 3).reshape(c, h * p, w * p)


def latent_position_ids(h: int, w: int, max_latent_size: int) -> Tensor:
    """(h*w,) ids r*max_latent_size + c into `latent_pos_embed`."""
    if h > max_latent_size or w > max_latent_size:
        raise ValueError(f"latent grid {h}x{w} exceeds max_latent_size {max_latent_size}")
    return _grid_ids(h, w, max_latent_size)
