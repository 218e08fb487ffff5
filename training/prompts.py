"""Prompts over the synthetic world: structured specs, their text, and scenes that satisfy or violate them.

A `PromptSpec` is one or two object groups (distinct shapes) plus an optional relation between them.
It combines one to five dimensions, like GenEval's tags:

- `object`   every group's shape is present (always part of a spec);
- `color`    every object of a coloured group has that colour (colour attribution with two groups);
- `count`    a counted group has exactly that many objects (2-4);
- `size`     every object of a sized group is that size;
- `position` a group's object lies in a region, or group 0 stands in a relation to group 1.

`evaluate(objects, spec)` is the single definition of truth. The checker applies it to the objects it
detects in pixels; `scene_truth` applies it to a scene's symbolic objects. Checker accuracy is the
agreement of the two.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from training.world import (
    COLORS,
    PLURALS,
    REGIONS,
    RELATION_SAMPLE_GAP,
    RELATIONS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    fits,
    in_region,
    relation_holds,
)

DIMENSIONS: tuple[str, ...] = ("object", "color", "count", "size", "position")
CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
REGION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
RELATION_PHRASES = {
    "left_of": "to the left of",
    "right_of": "to the right of",
    "above": "above",
    "below": "below",
}
OPPOSITE = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}


@dataclass(frozen=True)
class Group:
    """Objects of one shape. None means unconstrained; count None reads as 'a' and means one object."""

    shape: str
    color: str | None = None
    size: str | None = None
    count: int | None = None
    region: str | None = None

    def phrase(self) -> str:
        words = [w for w in (self.size, self.color) if w]
        if self.count is None:
            first = (words[0] if words else self.shape)[0]
            words = ["an" if first in "aeiou" else "a", *words, self.shape]
        else:
            words = [NUMBER_WORDS[self.count], *words, PLURALS[self.shape]]
        if self.region:
            words.append(REGION_PHRASES[self.region])
        return " ".join(words)


@dataclass(frozen=True)
class PromptSpec:
    groups: tuple[Group, ...]
    relation: str | None = None  # groups[0] <relation> groups[1]
    category: str = "mixed"

    def __post_init__(self) -> None:
        if not 1 <= len(self.groups) <= 2:
            raise ValueError("a spec has one or two groups")
        if len({g.shape for g in self.groups}) != len(self.groups):
            raise ValueError("groups must have distinct shapes (checks attribute objects by shape)")
        if self.relation and (len(self.groups) != 2 or any(g.count or g.region for g in self.groups)):
            raise ValueError("a relation links two single, region-free objects")

    @property
    def dims(self) -> tuple[str, ...]:
        has = {
            "object": True,
            "color": any(g.color for g in self.groups),
            "count": any(g.count for g in self.groups),
            "size": any(g.size for g in self.groups),
            "position": bool(self.relation) or any(g.region for g in self.groups),
        }
        return tuple(d for d in DIMENSIONS if has[d])

    @property
    def text(self) -> str:
        a = self.groups[0].phrase()
        if len(self.groups) == 1:
            return a
        b = self.groups[1].phrase()
        if self.relation:
            return f"{a} {RELATION_PHRASES[self.relation]} {b}"
        return f"{a} and {b}"

    def to_json(self) -> str:
        return json.dumps(
            {"groups": [asdict(g) for g in self.groups], "relation": self.relation, "category": self.category}
        )

    @staticmethod
    def from_json(s: str) -> PromptSpec:
        d = json.loads(s)
        return PromptSpec(tuple(Group(**g) for g in d["groups"]), d["relation"], d["category"])


def evaluate(objects: Sequence[Obj], spec: PromptSpec) -> dict[str, bool]:
    """Per-dimension truth of `spec` for a list of objects, plus `overall`. A missing group fails every
    dimension that constrains it, as a detector-based metric would."""
    by_group = [[o for o in objects if o.shape == g.shape] for g in spec.groups]
    out = {"object": all(by_group)}
    if "color" in spec.dims:
        out["color"] = all(
            objs and all(o.color == g.color for o in objs)
            for g, objs in zip(spec.groups, by_group, strict=True)
            if g.color
        )
    if "count" in spec.dims:
        out["count"] = all(
            len(objs) == g.count for g, objs in zip(spec.groups, by_group, strict=True) if g.count
        )
    if "size" in spec.dims:
        out["size"] = all(
            objs and all(o.size == g.size for o in objs)
            for g, objs in zip(spec.groups, by_group, strict=True)
            if g.size
        )
    if "position" in spec.dims:
        ok = all(
            objs and all(in_region(o.cx, o.cy, g.region) for o in objs)
            for g, objs in zip(spec.groups, by_group, strict=True)
            if g.region
        )
        if spec.relation:
            a, b = by_group
            ok = (
                ok
                and bool(a and b)
                and all(relation_holds((p.cx, p.cy), (q.cx, q.cy), spec.relation) for p in a for q in b)
            )
        out["position"] = ok
    out["overall"] = all(out.values())
    return {k: bool(v) for k, v in out.items()}


def scene_truth(scene: Scene, spec: PromptSpec) -> dict[str, bool]:
    return evaluate(scene.objects, spec)


# ------------------------------------------------------------------------------------------------
# Spec sampling


def _choice(rng: np.random.Generator, seq: Sequence, k: int | None = None):
    if k is None:
        return seq[int(rng.integers(len(seq)))]
    return [seq[i] for i in rng.choice(len(seq), size=k, replace=False)]


def _category_spec(rng: np.random.Generator, category: str) -> PromptSpec:
    """GenEval's six tags, translated to this world."""
    if category == "single_object":
        return PromptSpec((Group(_choice(rng, SHAPES)),), category=category)
    if category == "two_object":
        s = _choice(rng, SHAPES, 2)
        return PromptSpec((Group(s[0]), Group(s[1])), category=category)
    if category == "counting":
        return PromptSpec((Group(_choice(rng, SHAPES), count=int(rng.integers(2, 5))),), category=category)
    if category == "colors":
        return PromptSpec((Group(_choice(rng, SHAPES), color=_choice(rng, COLORS)),), category=category)
    if category == "position":
        s = _choice(rng, SHAPES, 2)
        return PromptSpec((Group(s[0]), Group(s[1])), relation=_choice(rng, RELATIONS), category=category)
    if category == "color_attr":
        s, c = _choice(rng, SHAPES, 2), _choice(rng, COLORS, 2)
        return PromptSpec((Group(s[0], color=c[0]), Group(s[1], color=c[1])), category=category)
    raise ValueError(f"unknown category {category!r}")


def _mixed_spec(rng: np.random.Generator, n_dims: int) -> PromptSpec:
    extra = set(_choice(rng, ("color", "count", "size", "position"), n_dims - 1))
    relation = None
    region_group = None
    if "position" in extra and "count" not in extra and rng.random() < 0.6:
        n_groups, relation = 2, _choice(rng, RELATIONS)
    elif "position" in extra:
        # count and position on different groups: region constraints apply to single objects only
        n_groups = 2 if "count" in extra else int(rng.integers(1, 3))
        region_group = 0
    else:
        n_groups = int(rng.integers(1, 3))
    shapes = _choice(rng, SHAPES, n_groups)
    colors = _choice(rng, COLORS, n_groups)
    groups = [Group(s) for s in shapes]

    def some(k: int) -> list[int]:
        # a non-empty subset of group indices, usually all of them
        if k == 1 or rng.random() < 0.6:
            return list(range(k))
        return [int(rng.integers(k))]

    if "color" in extra:
        for i in some(n_groups):
            groups[i] = replace(groups[i], color=colors[i])
    if "size" in extra:
        for i in some(n_groups):
            groups[i] = replace(groups[i], size=_choice(rng, SIZES))
    if "count" in extra:
        countable = [i for i in range(n_groups) if i != region_group]
        picked = countable if len(countable) == 1 or rng.random() < 0.3 else [_choice(rng, countable)]
        # at most 5 objects in all, so that a 64 px canvas has room even when a violation adds one
        counts = [int(rng.integers(2, 5))] if len(picked) == 1 else _choice(rng, [(2, 2), (2, 3), (3, 2)])
        for i, c in zip(picked, counts, strict=True):
            groups[i] = replace(groups[i], count=c)
    if region_group is not None:
        groups[region_group] = replace(groups[region_group], region=_choice(rng, REGIONS))
    return PromptSpec(tuple(groups), relation=relation, category="mixed")


def sample_spec(
    rng: np.random.Generator, n_dims: int | None = None, category: str | None = None, max_tries: int = 50
) -> PromptSpec:
    """A random spec: a GenEval `category`, or a mixed spec with `n_dims` (1-5, random if None)
    dimensions. Only specs for which a satisfying scene can be placed are returned."""
    for _ in range(max_tries):
        if category and category != "mixed":
            spec = _category_spec(rng, category)
        else:
            spec = _mixed_spec(rng, n_dims or int(rng.integers(1, 6)))
        if n_dims is not None and len(spec.dims) != n_dims:
            continue
        try:
            # feasible both aligned and with any single dimension broken, so dataset building never stalls
            for violate in [(), *((d,) for d in spec.dims)]:
                sample_scene(spec, rng, violate)
        except PlacementError:
            continue
        return spec
    raise PlacementError(f"could not sample a feasible spec (n_dims={n_dims}, category={category})")


# ------------------------------------------------------------------------------------------------
# Scene sampling


class PlacementError(RuntimeError):
    pass


_REGION_MARGIN = 0.05  # centres stay this far inside (or outside) a region, so truth is never borderline


def _in_region_clear(cx: float, cy: float, region: str, inside: bool) -> bool:
    m = _REGION_MARGIN
    probes = [(cx + dx, cy + dy) for dx in (-m, 0, m) for dy in (-m, 0, m)]
    return all(in_region(x, y, region) == inside for x, y in probes)


@dataclass
class _Plan:
    shape: str
    color: str
    size: str
    n: int
    region: str | None = None
    region_inside: bool = True


def _plans(
    spec: PromptSpec, rng: np.random.Generator, violate: Sequence[str]
) -> tuple[list[_Plan], str | None]:
    """Concrete attributes per group, with the chosen dimensions broken."""
    plans = [
        _Plan(
            shape=g.shape,
            color=g.color or _choice(rng, COLORS),
            size=g.size or _choice(rng, SIZES),
            n=g.count or 1,
            region=g.region,
        )
        for g in spec.groups
    ]
    relation = spec.relation
    spec_shapes = {g.shape for g in spec.groups}
    for dim in violate:
        if dim == "object":
            p = _choice(rng, plans)
            p.shape = _choice(rng, [s for s in SHAPES if s not in spec_shapes])
        elif dim == "color":
            idx = [i for i, g in enumerate(spec.groups) if g.color]
            a, b = spec.groups[0].color, spec.groups[-1].color
            if len(idx) == 2 and a != b and rng.random() < 0.5:
                plans[0].color, plans[1].color = b, a  # attribute binding error: colours swapped
            else:
                i = _choice(rng, idx)
                plans[i].color = _choice(rng, [c for c in COLORS if c != spec.groups[i].color])
        elif dim == "count":
            i = _choice(rng, [i for i, g in enumerate(spec.groups) if g.count])
            plans[i].n = _choice(rng, [n for n in (1, 2, 3, 4) if n != spec.groups[i].count])
        elif dim == "size":
            i = _choice(rng, [i for i, g in enumerate(spec.groups) if g.size])
            plans[i].size = "small" if spec.groups[i].size == "large" else "large"
        elif dim == "position":
            if relation:
                relation = OPPOSITE[relation]
            else:
                i = _choice(rng, [i for i, g in enumerate(spec.groups) if g.region])
                plans[i].region_inside = False
        else:
            raise ValueError(f"cannot violate {dim!r}; spec has {spec.dims}")
    return plans, relation


_SHIFT = {"left_of": (-1, 0), "right_of": (1, 0), "above": (0, -1), "below": (0, 1)}


def _place(plans: list[_Plan], relation: str | None, rng: np.random.Generator, tries: int = 50) -> list[Obj]:
    """Place every planned object; large ones first (random sequential placement jams when big objects
    come last). Random proposals first, then an exhaustive scan of a 0.02 grid, so a free spot is found
    whenever one exists."""
    order = [0, 1] if relation else sorted(range(len(plans)), key=lambda i: plans[i].size != "large")
    placed: list[Obj] = []
    for gi in order:
        p = plans[gi]

        def ok(o: Obj, p: _Plan = p, gi: int = gi) -> bool:
            if not fits(o, placed):
                return False
            if p.region and not _in_region_clear(o.cx, o.cy, p.region, p.region_inside):
                return False
            if relation and gi == 1:
                # group 0 is one object placed first; `placed[0] relation o` must hold with a clear gap
                a, (sx, sy) = placed[0], _SHIFT[relation]
                return (a.cx - o.cx) * sx + (a.cy - o.cy) * sy >= RELATION_SAMPLE_GAP
            return True

        for _ in range(p.n):
            cands = (
                Obj(p.shape, p.color, p.size, *rng.uniform(0.05, 0.95, 2).tolist()) for _ in range(tries)
            )
            o = next((c for c in cands if ok(c)), None)
            if o is None:
                grid = np.arange(0.05, 0.951, 0.02)
                free = [
                    c
                    for x in grid
                    for y in grid
                    if ok(c := Obj(p.shape, p.color, p.size, float(x), float(y)))
                ]
                if not free:
                    raise PlacementError("no room for an object")
                o = _choice(rng, free)
            placed.append(o)
    return placed


def sample_scene(
    spec: PromptSpec, rng: np.random.Generator, violate: Sequence[str] = (), restarts: int = 20
) -> Scene:
    """A scene that satisfies `spec` (violate empty) or breaks each dimension in `violate`.

    Breaking one dimension can break others too (a replaced shape also loses its colour), so callers
    label scenes with `scene_truth` or the checker rather than trusting `violate`."""
    bad = [d for d in violate if d not in spec.dims]
    if bad:
        raise ValueError(f"spec {spec.text!r} has no dimension {bad}")
    for _ in range(restarts):
        plans, relation = _plans(spec, rng, violate)
        try:
            objs = _place(plans, relation, rng)
        except PlacementError:
            continue
        return Scene(tuple(objs))
    raise PlacementError(f"could not place a scene for {spec.text!r} violating {list(violate)}")


def sample_violation(spec: PromptSpec, rng: np.random.Generator, max_dims: int = 2) -> tuple[str, ...]:
    """One or more of the spec's dimensions to break (mostly one)."""
    k = 1 if rng.random() < 0.7 else int(rng.integers(1, min(max_dims, len(spec.dims)) + 1))
    return tuple(_choice(rng, spec.dims, k))


def random_scene(rng: np.random.Generator, shapes: Sequence[str] = SHAPES, max_objects: int = 5) -> Scene:
    """An unconstrained scene: 1..max_objects objects with random attributes (used as free candidates
    and to measure the detector on arbitrary layouts)."""
    n = int(rng.integers(1, max_objects + 1))
    for _ in range(20):
        try:
            plans = [
                _Plan(_choice(rng, shapes), _choice(rng, COLORS), _choice(rng, SIZES), 1) for _ in range(n)
            ]
            return Scene(tuple(_place(plans, None, rng)))
        except PlacementError:
            continue
    raise PlacementError("could not place a random scene")


# ------------------------------------------------------------------------------------------------
# Held-out split


def is_heldout(text: str, fraction: float = 0.1) -> bool:
    """Deterministic, order-free split: a prompt is held out iff the hash of its normalised text falls
    in the lowest `fraction` of the range. The same text is always on the same side."""
    key = " ".join(text.lower().split()).encode()
    h = int.from_bytes(hashlib.sha256(key).digest()[:8], "big")
    return h < fraction * 2**64


def split_specs(
    specs: Sequence[PromptSpec], fraction: float = 0.1
) -> tuple[list[PromptSpec], list[PromptSpec]]:
    """(train, heldout), deduplicated by text."""
    seen: set[str] = set()
    train, held = [], []
    for s in specs:
        if s.text in seen:
            continue
        seen.add(s.text)
        (held if is_heldout(s.text, fraction) else train).append(s)
    return train, held
