import random

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import BagelConfig, ImageTransform
from engine.errors import InvalidRequestError
from engine.preprocess import (
    latent_position_ids,
    patchify_latent,
    patchify_vit,
    pil_img2rgb,
    resize_dims,
    resize_image,
    tensor_to_pil,
    to_tensor,
    unpatchify_latent,
)

VAE = BagelConfig().vae_transform  # 1024 / 512 / 16
VIT = BagelConfig().vit_transform  # 980 / 224 / 14


# Expected values worked by hand from docs/model.md §7 (Python's banker's round at every step).
@pytest.mark.parametrize(
    ("size", "vae", "vit"),
    [
        ((1024, 1024), (1024, 1024), (980, 980)),  # ViT: 980/1024 * 1024 = 980 = 70 * 14
        ((1920, 1080), (1024, 576), (980, 546)),  # ViT h: round(551.25) = 551 -> 39.36 -> 39 * 14
        ((300, 200), (768, 512), (336, 224)),  # short side enlarged to min (x2.56 / x1.12)
        # 17x4000: min-size enlargement makes 512x120464; the max_pixels step shrinks by the area ratio to
        # round(15)->16 x 3528 -> 220.5 -> 220 * 16 = 3520 (banker's); the long edge is then cut to 1024.
        ((17, 4000), (16, 1024), (14, 980)),
        ((4000, 17), (1024, 16), (980, 14)),
        ((1000, 600), (992, 608), (980, 588)),  # 1000/16 = 62.5 -> 62 (banker's), 600/16 = 37.5 -> 38
        ((511, 513), (512, 512), (504, 518)),  # ViT w: 511/14 = 36.5 -> 36 (banker's) -> 504
        ((3000, 1000), (1024, 336), (980, 322)),  # short side ends below min after the max-size step
        ((1, 1), (512, 512), (224, 224)),
    ],
)
def test_resize_dims_official_values(size, vae, vit):
    assert resize_dims(*size, VAE) == vae
    assert resize_dims(*size, VIT) == vit


def test_inference_resizes_vae_then_vit():
    # The inferencer applies the VAE rule, then the ViT rule to the VAE-resized image.
    assert resize_dims(*resize_dims(1024, 1024, VAE), VIT) == (980, 980)
    assert resize_dims(*resize_dims(300, 200, VAE), VIT) == (770, 518)
    assert resize_dims(*resize_dims(1000, 600, VAE), VIT) == (980, 602)


def test_max_pixels_area_ratio_quirk():
    # 1024x1024 is 4x over a 512*512 budget; the official code scales each side by the area ratio (1/4), not
    # by its square root, giving 256x256 instead of 512x512.
    t = ImageTransform(max_size=1024, min_size=512, stride=16, max_pixels=512 * 512)
    assert resize_dims(1024, 1024, t) == (256, 256)


@pytest.mark.parametrize("t", [VAE, VIT, ImageTransform(980, 378, 14, 2_007_040)])
def test_resize_dims_invariants(t):
    rng = random.Random(0)
    for _ in range(500):
        w, h = rng.randint(1, 6000), rng.randint(1, 6000)
        nw, nh = resize_dims(w, h, t)
        assert nw % t.stride == 0 and nh % t.stride == 0
        assert t.stride <= nw <= t.max_size and t.stride <= nh <= t.max_size


@pytest.mark.parametrize("size", [(0, 10), (10, 0), (0, 0), (-3, 5)])
def test_degenerate_sizes_rejected(size):
    with pytest.raises(InvalidRequestError, match="no pixels"):
        resize_dims(*size, VAE)


def test_resize_image_empty_image_rejected():
    with pytest.raises(InvalidRequestError):
        resize_image(Image.new("RGB", (0, 7)), VAE)


def test_resize_image_bicubic():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    out = resize_image(img, VAE)
    assert out.size == (768, 512)
    assert np.array_equal(np.asarray(out), np.asarray(img.resize((768, 512), Image.BICUBIC)))
    # A flat image stays flat through the (normalised) bicubic kernel.
    flat = resize_image(Image.new("RGB", (1920, 1080), (10, 200, 30)), VIT)
    assert flat.size == (980, 546)
    assert np.all(np.asarray(flat) == np.array([10, 200, 30], dtype=np.uint8))


def test_pil_img2rgb_composites_alpha_on_white():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (10, 20, 30, 0))  # transparent -> white
    rgba.putpixel((1, 0), (10, 20, 30, 255))  # opaque -> unchanged
    rgba.putpixel((2, 0), (0, 0, 0, 128))  # half black over white -> mid grey
    out = pil_img2rgb(rgba)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (10, 20, 30)
    assert all(120 <= c <= 135 for c in out.getpixel((2, 0)))


def test_pil_img2rgb_la_and_palette_transparency():
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (50, 0))
    la.putpixel((1, 0), (50, 255))
    out = pil_img2rgb(la)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (50, 50, 50)

    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    out = pil_img2rgb(pal)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (200, 10, 10)

    grey = pil_img2rgb(Image.new("L", (1, 1), 77))
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (77, 77, 77)


def test_to_tensor_range_and_layout():
    img = Image.new("RGB", (3, 2))
    img.putpixel((2, 1), (0, 128, 255))  # x=2, y=1
    x = to_tensor(img)
    assert x.shape == (3, 2, 3) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 1, 2], torch.tensor([-1.0, 128 / 255 * 2 - 1, 1.0]))
    assert torch.all(x[:, 0, 0] == -1.0)
    with pytest.raises(ValueError, match="RGB"):
        to_tensor(Image.new("RGBA", (1, 1)))


def test_tensor_to_pil_truncates():
    # Values just below an integer level truncate down (round-to-nearest would give 128 and 255).
    v = torch.tensor([127.9 / 255, 254.6 / 255, 0.5 / 255]) * 2 - 1
    x = torch.stack([v[0].expand(2, 2), v[1].expand(2, 2), v[2].expand(2, 2)])
    assert tensor_to_pil(x).getpixel((0, 0)) == (127, 254, 0)
    clipped = torch.stack([torch.full((1, 1), 3.0), torch.full((1, 1), -3.0), torch.full((1, 1), 1.0)])
    assert tensor_to_pil(clipped).getpixel((0, 0)) == (255, 0, 255)
    # Round trip of exact uint8 levels through to_tensor.
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    back = np.asarray(tensor_to_pil(to_tensor(img).double()))
    assert back.shape == (5, 7, 3)
    assert np.abs(back.astype(int) - np.asarray(img).astype(int)).max() <= 1


def test_patchify_vit_order_and_ids():
    p, max_side = 2, 70
    x = torch.randn(3, 6, 4)
    patches, ids, grid = patchify_vit(x, p, max_side)
    assert grid == (3, 2) and patches.shape == (6, 12)
    for r in range(3):
        for c in range(2):
            tok = r * 2 + c
            # features in (p_row, p_col, channel) order
            assert torch.equal(
                patches[tok], x[:, r * p : (r + 1) * p, c * p : (c + 1) * p].permute(1, 2, 0).flatten()
            )
            assert ids[tok].item() == r * max_side + c
    # Official data_utils.patchify: einsum "chpwq->hwpqc".
    ref = torch.einsum("chpwq->hwpqc", x.reshape(3, 3, p, 2, p)).reshape(-1, p * p * 3)
    assert torch.equal(patches, ref)
    with pytest.raises(ValueError, match="multiple"):
        patchify_vit(torch.randn(3, 5, 4), p, max_side)
    with pytest.raises(ValueError, match="exceeds"):
        patchify_vit(torch.randn(3, 2, 8), p, 3)


def test_latent_patchify_round_trip_and_order():
    c, h, w, p = 4, 3, 5, 2
    z = torch.randn(c, h * p, w * p)
    tokens = patchify_latent(z, p)
    assert tokens.shape == (h * w, p * p * c)
    ref = torch.einsum("chpwq->hwpqc", z.reshape(c, h, p, w, p)).reshape(-1, p * p * c)
    assert torch.equal(tokens, ref)
    assert torch.equal(unpatchify_latent(tokens, h, w, p, c), z)
    # Official decode_image: reshape (h, w, p, p, c), einsum "hwpqc->chpwq".
    ref_back = torch.einsum("hwpqc->chpwq", tokens.reshape(h, w, p, p, c)).reshape(c, h * p, w * p)
    assert torch.equal(unpatchify_latent(tokens, h, w, p, c), ref_back)
    with pytest.raises(ValueError, match="tokens shape"):
        unpatchify_latent(tokens, h, w + 1, p, c)


def test_latent_position_ids():
    ids = latent_position_ids(2, 3, 64)
    assert ids.tolist() == [0, 1, 2, 64, 65, 66]
    with pytest.raises(ValueError, match="max_latent_size"):
        latent_position_ids(65, 1, 64)
