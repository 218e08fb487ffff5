"""A synthetic compositional world: flat coloured shapes on a plain background.

Small enough to train a unified model on CPUs, rich enough for GenEval-like prompts: shape, colour,
size, count, absolute region and pairwise relations. Every shape is drawn inside a square box of
half-extent `h` (circle radius h, square side 2h, upward triangle with base and height 2h, plus-shaped
cross with arm width 2h/3), so the checker can tell them apart from bbox fill and vertical asymmetry.

Coordinates are fractions of the image side (0..1, y down), so a scene renders at any size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "cross": "crosses",
}

# Pure, well-separated colours: the closest pair (orange/yellow) is ~95 apart in RGB, every colour is
# >200 from the background, so nearest-palette segmentation has a wide margin even with jitter.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "orange": (255, 140, 0),
    "yellow": (240, 230, 20),
    "green": (20, 170, 40),
    "blue": (20, 60, 230),
    "purple": (140, 30, 200),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
BACKGROUND: tuple[int, int, int] = (245, 245, 245)

SIZES: tuple[str, ...] = ("small", "large")
# Half-extent as a fraction of the image side; the checker's size threshold sits between the two.
HALF_EXTENT: dict[str, float] = {"small": 0.075, "large": 0.13}

REGIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
RELATIONS: tuple[str, ...] = ("left_of", "right_of", "above", "below")

DEFAULT_SIZE = 64
# Drawing at 4x and box-downsampling gives each pixel its exact area coverage (proper anti-aliasing).
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Obj:
    """One object; (cx, cy) is the box centre in fractions of the image side, y pointing down."""

    shape: str
    color: str
    size: str
    cx: float
    cy: float

    @property
    def half(self) -> float:
        return HALF_EXTENT[self.size]


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects]}

    @staticmethod
    def from_dict(d: dict) -> Scene:
        return Scene(tuple(Obj(**o) for o in d["objects"]))


def in_region(cx: float, cy: float, region: str) -> bool:
    """Regions are thirds of the image; `center` is the middle cell of the 3x3 grid."""
    if region == "left":
        return cx < 1 / 3
    if region == "right":
        return cx > 2 / 3
    if region == "top":
        return cy < 1 / 3
    if region == "bottom":
        return cy > 2 / 3
    if region == "center":
        return 1 / 3 <= cx <= 2 / 3 and 1 / 3 <= cy <= 2 / 3
    raise ValueError(f"unknown region {region!r}")


# Minimum centre offset along the relation's axis for `A left_of B` etc. to count as true; the
# sampler places related objects at least `RELATION_SAMPLE_GAP` apart so truth is never borderline.
RELATION_MARGIN = 0.06
RELATION_SAMPLE_GAP = 0.2


def relation_holds(a: tuple[float, float], b: tuple[float, float], relation: str) -> bool:
    """Whether point a stands in `relation` to point b (GenEval-style: the offset along one axis)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    if relation == "left_of":
        return dx > RELATION_MARGIN
    if relation == "right_of":
        return -dx > RELATION_MARGIN
    if relation == "above":
        return dy > RELATION_MARGIN
    if relation == "below":
        return -dy > RELATION_MARGIN
    raise ValueError(f"unknown relation {relation!r}")


def _polygon(shape: str, cx: float, cy: float, h: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "cross":
        a = h / 3  # arm half-width: arms are a third of the box wide
        return [
            (cx - a, cy - h), (cx + a, cy - h), (cx + a, cy - a), (cx + h, cy - a),
            (cx + h, cy + a), (cx + a, cy + a), (cx + a, cy + h), (cx - a, cy + h),
            (cx - a, cy + a), (cx - h, cy + a), (cx - h, cy - a), (cx - a, cy - a),
        ]  # fmt: skip
    return None


def render(
    scene: Scene, size: int = DEFAULT_SIZE, rng: np.random.Generator | None = None, jitter: float = 0.0
) -> Image.Image:
    """Draw `scene` as an RGB image of side `size`.

    `jitter` in [0, 1] perturbs colours (up to ±12·jitter per channel), the background brightness and
    each object's extent (±8 %·jitter) so that training images are not pixel-identical; the checker is
    validated with jitter on. `rng` is only needed when jitter > 0.
    """
    if not 16 <= size <= 512:
        raise ValueError(f"render size {size} outside 16..512")
    if jitter and rng is None:
        raise ValueError("jitter needs an rng")
    big = size * _SUPERSAMPLE
    bg = np.array(BACKGROUND, dtype=np.float64)
    if jitter:
        bg = bg - rng.uniform(0, 10 * jitter)
    img = Image.new("RGB", (big, big), tuple(round(v) for v in bg))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        col = np.array(PALETTE[o.color], dtype=np.float64)
        h = o.half
        if jitter:
            col = col + rng.uniform(-12 * jitter, 12 * jitter, size=3)
            h = h * (1 + rng.uniform(-0.08 * jitter, 0.08 * jitter))
        fill = tuple(int(v) for v in np.clip(np.round(col), 0, 255))
        cx, cy, hh = o.cx * big, o.cy * big, h * big
        poly = _polygon(o.shape, cx, cy, hh)
        if poly is None:
            draw.ellipse([cx - hh, cy - hh, cx + hh, cy + hh], fill=fill)
        else:
            draw.polygon(poly, fill=fill)
    return img.resize((size, size), Image.Resampling.BOX)


def boxes_overlap(a: Obj, b: Obj, gap: float) -> bool:
    """Whether the boxes of a and b come closer than `gap` (fraction of the side) on both axes."""
    lim = a.half + b.half + gap
    return abs(a.cx - b.cx) < lim and abs(a.cy - b.cy) < lim


# Objects keep this clearance (fraction of the side, ~2.5 px at 64) so same-coloured neighbours never merge
# into one connected component.
OBJECT_GAP = 0.04


def fits(obj: Obj, placed: list[Obj]) -> bool:
    """Inside the canvas and clear of every placed object."""
    h = obj.half
    if not (h + 0.01 <= obj.cx <= 1 - h - 0.01 and h + 0.01 <= obj.cy <= 1 - h - 0.01):
        return False
    return not any(boxes_overlap(obj, p, OBJECT_GAP) for p in placed)


def casts(strength: float) -> np.ndarray:
    """The world's generator white balances: neutral and the six tints that lower one or two channels by
    `strength` (the largest gain stays 1, so a cast tints without darkening). (7, 3) float."""
    corners = np.array([[int(c) for c in f"{k:03b}"] for k in range(7)], dtype=np.float64)  # (7, 3)
    return 1.0 - strength * corners


def random_cast(rng: np.random.Generator, strength: float) -> np.ndarray:
    """One of `casts(strength)`, uniformly: a generator's colour cast. (3,) float."""
    return casts(strength)[int(rng.integers(7))]


def color_cast(img: Image.Image, gains: np.ndarray) -> Image.Image:
    """`img` with every channel scaled by its gain: the background takes a tint, objects keep their hue."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float64) * np.asarray(gains, dtype=np.float64)
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))
