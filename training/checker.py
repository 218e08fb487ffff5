"""An automatic prompt/image alignment checker that reads only pixels (the world's GenEval detector).

Pipeline: estimate the background from the border; unmix every pixel against each palette colour
(pixel = bg + alpha·(colour − bg) + residual) and keep pixels with coverage alpha ≥ 0.5 and a small
residual, which recovers anti-aliased shapes at their true area; 4-connected components per colour;
drop specks; classify each component by its bbox (size from extent, shape from fill ratio and vertical
mass asymmetry); report bbox centres. `check` then applies `prompts.evaluate`, the same truth function
used on symbolic scenes, so the checker's accuracy is exactly its detection accuracy.

Run `python -m training.checker --n 1000` for the validation report.
"""

from __future__ import annotations

import argparse
import json
from collections import deque

import numpy as np
from PIL import Image, ImageFilter

from training.prompts import (
    CATEGORIES,
    DIMENSIONS,
    PromptSpec,
    evaluate,
    random_scene,
    sample_scene,
    sample_spec,
    sample_violation,
    scene_truth,
)
from training.world import HALF_EXTENT, PALETTE, Obj, render

COLOR_NAMES = tuple(PALETTE)
_PALETTE_RGB = np.array([PALETTE[c] for c in COLOR_NAMES], dtype=np.float32)  # (K, 3)

# A component's bbox extent (fraction of the side) below this is "small": halfway between the nominal
# small (0.15) and large (0.26) box sides, so ±8 % size jitter and a pixel of rasterisation stay clear.
SIZE_THRESHOLD = HALF_EXTENT["small"] + HALF_EXTENT["large"]
# Fill ratios of the shapes in their bbox: square 1, circle π/4 ≈ 0.785, cross 5/9 ≈ 0.556, triangle 0.5.
# Triangles are told apart by their centroid (1/6 of the height below the box centre), the rest by fill;
# CIRCLE_FILL sits nearer the circle because blur raises a small cross's fill more than a circle's.
TRIANGLE_ASYM = 0.05
SQUARE_FILL = 0.9
CIRCLE_FILL = 0.74


def background(img: np.ndarray) -> np.ndarray:
    """Median of the border pixels: objects never touch the border, so this is the plain background."""
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])  # (4S, 3)
    return np.median(border, axis=0)


def _balanced(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(img, background) with each channel of img (H, W, 3) scaled so that its background is neutral; a
    neutral background (every render without a cast) leaves img exactly as it is."""
    bg = background(img)
    if bg.min() <= 0:
        return img, bg
    return img * (bg.max() / bg), np.full(3, bg.max())


def white_balance(img: Image.Image) -> Image.Image:
    """`img` with its colour cast undone (world.color_cast), judged from its border background."""
    arr, _ = _balanced(np.asarray(img.convert("RGB"), dtype=np.float64))
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))


def unmix(img: np.ndarray, residual_tol: float = 40.0) -> tuple[np.ndarray, np.ndarray]:
    """Explain every pixel as background blended with one palette colour. img: (H, W, 3) float.

    Returns (labels, alpha): labels (H, W) is the palette index of the pixel's object, or -1 where the
    pixel is background (coverage < 1/2) or no colour explains it; alpha (H, W, K) is the coverage of
    each colour, clipped to [0, 1], used for sub-pixel shape measurements.

    A tinted background (a colour cast, world.color_cast) is first scaled back to neutral, channel by
    channel; a neutral one (every render without a cast) is left exactly as it is.
    """
    img, bg = _balanced(img)
    d = _PALETTE_RGB - bg  # (K, 3) direction from the background to each colour
    p = img - bg  # (H, W, 3)
    alpha = np.einsum("hwc,kc->hwk", p, d) / (d * d).sum(-1)  # (H, W, K) coverage along each colour
    resid = np.linalg.norm(p[:, :, None, :] - alpha[..., None] * d, axis=-1)  # (H, W, K)
    # The colour is chosen before thresholding coverage: an orange edge pixel at 45 % coverage is also
    # ~50 % "yellow" with a moderate residual, and must not become a yellow fringe.
    resid = np.where(alpha > 0.1, resid, np.inf)
    k = resid.argmin(-1)  # (H, W)
    best_alpha = np.take_along_axis(alpha, k[..., None], -1)[..., 0]
    best_resid = np.take_along_axis(resid, k[..., None], -1)[..., 0]
    labels = np.where((best_alpha >= 0.5) & (best_resid < residual_tol), k, -1)
    return labels, np.clip(alpha, 0.0, 1.0)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an (N, 2) array of (y, x)."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    comps = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        q, pix = deque([(y0, x0)]), []
        while q:
            y, x = q.popleft()
            pix.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    q.append((ny, nx))
        comps.append(np.array(pix))
    return comps


def measure(
    pix: np.ndarray, alpha: np.ndarray, foreign: np.ndarray
) -> tuple[float, float, float, float, float, float]:
    """Sub-pixel box (cx, cy, w, h), fill ratio and vertical asymmetry of one component.

    pix: (N, 2) of (y, x); alpha: (H, W) coverage of the component's colour; foreign: (H, W) bool, pixels
    that belong to another colour (their partial projection on this colour is not coverage). The window
    is the pixel bbox grown by one pixel, which holds the anti-aliased rim. Column/row extents are sums of the max coverage, exact for shapes whose widest
    row/column is solid (all four shapes), so fill ratios do not suffer from whole-pixel bbox rounding.
    """
    hh, ww = alpha.shape
    y0, x0 = np.maximum(pix.min(0) - 1, 0)
    y1, x1 = np.minimum(pix.max(0) + 1, (hh - 1, ww - 1))
    win = np.where(foreign[y0 : y1 + 1, x0 : x1 + 1], 0.0, alpha[y0 : y1 + 1, x0 : x1 + 1])  # (h, w)
    col, row = win.max(0), win.max(1)  # (w,), (h,)
    bw, bh = float(col.sum()), float(row.sum())
    cx = x0 + float((col * np.arange(len(col))).sum() / col.sum()) + 0.5
    cy = y0 + float((row * np.arange(len(row))).sum() / row.sum()) + 0.5
    mass = win.sum(1)  # (h,) coverage per row
    ys = y0 + np.arange(len(mass)) + 0.5
    # offset of the mass centroid below the box centre, in box heights: an upward triangle's centroid
    # sits 1/6 of its height below the centre, symmetric shapes 0; linear in the pixels, so a half-pixel
    # error in the box centre moves it by little (a sign-based measure flips a cross's whole arm)
    asym = float(((mass * ys).sum() / mass.sum() - cy) / bh)
    return cx, cy, bw, bh, float(win.sum() / (bw * bh)), asym


def classify_shape(fill: float, asym: float) -> str:
    if asym > TRIANGLE_ASYM:
        return "triangle"
    if fill > SQUARE_FILL:
        return "square"
    if fill > CIRCLE_FILL:
        return "circle"
    return "cross"


def detect(image: Image.Image, min_area_frac: float = 0.003, residual_tol: float = 40.0) -> list[Obj]:
    """The objects visible in `image`, as `Obj`s with bbox centres in fractions of the side."""
    img = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    h, w, _ = img.shape
    side = max(h, w)
    labels, alpha = unmix(img, residual_tol)
    objs = []
    for k, name in enumerate(COLOR_NAMES):
        mask = labels == k
        if not mask.any():
            continue
        for pix in _components(mask):
            if len(pix) < min_area_frac * h * w:
                continue  # specks: anti-aliasing leftovers or generator noise
            cx, cy, bw, bh, fill, asym = measure(pix, alpha[..., k], (labels != k) & (labels != -1))
            size = "small" if max(bw, bh) / side < SIZE_THRESHOLD else "large"
            objs.append(Obj(classify_shape(fill, asym), name, size, cx / w, cy / h))
    return objs


def check(image: Image.Image, spec: PromptSpec, **detect_kw) -> dict[str, bool]:
    """Per-dimension alignment of `image` with `spec`, plus `overall`; uses only the pixels."""
    return evaluate(detect(image, **detect_kw), spec)


# ------------------------------------------------------------------------------------------------
# Validation on renders with known answers


def degrade(
    image: Image.Image, rng: np.random.Generator, blur: float = 0.0, noise: float = 0.0
) -> Image.Image:
    """Gaussian blur (radius in px) then additive Gaussian pixel noise (std in 0-255 units): a stand-in
    for the softness and grain of a small generator's samples, to measure the checker off clean renders."""
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    if noise:
        arr = np.asarray(image, dtype=np.float32) + rng.normal(0, noise, (image.height, image.width, 3))
        image = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))
    return image


def validate_checker(
    n: int = 500, seed: int = 0, size: int = 64, jitter: float = 1.0, blur: float = 0.0, noise: float = 0.0
) -> dict:
    """Measure the checker against ground truth.

    - `dims`: on n prompts (half GenEval categories, half mixed 1-5 dimension specs), each with an aligned
      scene and a misaligned one (1-2 dimensions broken), the agreement of `check(render(scene))` with
      `scene_truth(scene)` per dimension and overall.
    - `aligned_accept` / `misaligned_reject`: overall verdicts on the two kinds of scene.
    - `objects`: on n random scenes (1-5 objects), object-count exactness and per-object shape/colour/size
      accuracy, matching detections to truth by nearest centre.

    `blur`/`noise` degrade every render first (see `degrade`); both 0 measures clean renders.
    """
    rng = np.random.default_rng(seed)
    agree = {d: [0, 0] for d in (*DIMENSIONS, "overall")}
    accept, reject = [0, 0], [0, 0]
    for i in range(n):
        cat = CATEGORIES[i % len(CATEGORIES)] if i % 2 == 0 else "mixed"
        spec = sample_spec(rng, category=cat)
        for aligned in (True, False):
            scene = sample_scene(spec, rng, () if aligned else sample_violation(spec, rng))
            truth = scene_truth(scene, spec)
            pred = check(degrade(render(scene, size, rng, jitter), rng, blur, noise), spec)
            for d, t in truth.items():
                agree[d][0] += pred[d] == t
                agree[d][1] += 1
            tally = accept if truth["overall"] else reject
            tally[0] += pred["overall"] == truth["overall"]
            tally[1] += 1
    obj = {"count_exact": [0, 0], "shape": [0, 0], "color": [0, 0], "size": [0, 0]}
    center_err = []
    for _ in range(n):
        scene = random_scene(rng)
        found = detect(degrade(render(scene, size, rng, jitter), rng, blur, noise))
        obj["count_exact"][0] += len(found) == len(scene.objects)
        obj["count_exact"][1] += 1
        for o in scene.objects:
            for key in ("shape", "color", "size"):
                obj[key][1] += 1
            if not found:
                continue
            m = min(found, key=lambda f: (f.cx - o.cx) ** 2 + (f.cy - o.cy) ** 2)
            center_err.append(np.hypot(m.cx - o.cx, m.cy - o.cy) * size)
            for key in ("shape", "color", "size"):
                obj[key][0] += getattr(m, key) == getattr(o, key)

    def rate(v: list[int]) -> float:
        return v[0] / v[1] if v[1] else float("nan")

    return {
        "n_prompts": n,
        "size": size,
        "jitter": jitter,
        "blur": blur,
        "noise": noise,
        "dims": {d: {"accuracy": rate(v), "n": v[1]} for d, v in agree.items() if v[1]},
        "aligned_accept": rate(accept),
        "misaligned_reject": rate(reject),
        "objects": {k: rate(v) for k, v in obj.items()},
        "center_err_px_mean": float(np.mean(center_err)) if center_err else float("nan"),
    }


def format_report(r: dict) -> str:
    lines = [
        f"checker validation: {r['n_prompts']} prompts x (aligned, misaligned), {r['size']} px, jitter {r['jitter']}, "
        f"blur {r['blur']} px, noise {r['noise']}"
    ]
    for d, v in r["dims"].items():
        lines.append(f"  {d:<10} {v['accuracy']:.4f}  (n={v['n']})")
    lines.append(f"  aligned accepted    {r['aligned_accept']:.4f}")
    lines.append(f"  misaligned rejected {r['misaligned_reject']:.4f}")
    lines.append("  objects on random scenes: " + ", ".join(f"{k} {v:.4f}" for k, v in r["objects"].items()))
    lines.append(f"  mean centre error {r['center_err_px_mean']:.2f} px")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description="Validate the synthetic-world checker on renders with known answers."
    )
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--jitter", type=float, default=1.0)
    ap.add_argument("--blur", type=float, default=0.0, help="Gaussian blur radius (px) applied to renders")
    ap.add_argument("--noise", type=float, default=0.0, help="pixel noise std (0-255) added to renders")
    ap.add_argument("--json", action="store_true", help="print the raw dict as JSON")
    a = ap.parse_args(argv)
    r = validate_checker(a.n, a.seed, a.size, a.jitter, a.blur, a.noise)
    print(json.dumps(r, indent=2) if a.json else format_report(r))


if __name__ == "__main__":
    main()
