"""Which aligned image a refine pair keeps: the one that looks most like its misaligned image.

The paper keeps one misaligned and one aligned image per prompt out of independent candidates. Which
aligned candidate it keeps decides what RvR can learn from the misaligned image: with an arbitrary one the
target is independent of the condition given the prompt, so the MSE-optimal model ignores the image and
RvR is text-to-image again. Keeping the aligned candidate nearest to the misaligned one (still an
independent sample, never an edit) makes the condition informative where the two agree (layout, the
dimensions the misaligned image got right) and the prompt decisive where they disagree: refinement that
keeps what was right and changes what was wrong.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from training.dataset import first_prompt, open_rgb, parse_image_list, resolve

THUMB = 16  # thumbnails compare layout and colour, not render jitter


def thumbnail(img: Image.Image) -> np.ndarray:
    """[THUMB * THUMB * 3] float32 in [0, 1], box-downsampled."""
    small = img.convert("RGB").resize((THUMB, THUMB), resample=Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32).reshape(-1) / 255.0


def thumbnail_distance(a: Image.Image, b: Image.Image) -> float:
    """Squared L2 between thumbnails: layout and colour, not render jitter."""
    return float(((thumbnail(a) - thumbnail(b)) ** 2).sum())


def aligned_pools(t2i_records: Sequence[dict]) -> dict[str, list[str]]:
    """Prompt -> its checker-verified T2I renders (captions with injected noise are not aligned images)."""
    pools: dict[str, list[str]] = defaultdict(list)
    for r in t2i_records:
        if not r.get("noisy", False):
            pools[first_prompt(r["user_prompt"])].append(parse_image_list(r["image_list"])[0])
    return pools


def pair_nearest(refine_records: Sequence[dict], pools: dict[str, list[str]], root: str | Path) -> list[dict]:
    """Copies of the refine records whose aligned image is the candidate (the record's own aligned image or
    one of the prompt's pool, never the misaligned image itself) with the smallest thumbnail distance to the
    misaligned image."""
    cache: dict[str, np.ndarray] = {}

    def thumb(rel: str) -> np.ndarray:
        if rel not in cache:
            cache[rel] = thumbnail(open_rgb(resolve(root, rel)))
        return cache[rel]

    out = []
    for r in refine_records:
        mis, ali = parse_image_list(r["image_list"])
        pool = pools.get(first_prompt(r["user_prompt"]), [])
        candidates = [c for c in dict.fromkeys([ali, *pool]) if c != mis]
        stack = np.stack([thumb(c) for c in candidates])  # [n, THUMB*THUMB*3]
        best = candidates[int(np.argmin(((stack - thumb(mis)) ** 2).sum(axis=1)))]
        if best == ali:
            out.append(r)
            continue
        paired = {**r, "image_list": [mis, best]}
        if isinstance(r.get("labels"), str):
            paired["labels"] = json.dumps([json.loads(r["labels"])[0], {"overall": True}])
        if r.get("sources"):
            paired["sources"] = [parse_image_list(r["sources"])[0], "render"]
        out.append(paired)
    return out


def keep_pairs(
    aligned: Sequence[tuple[str, str]], pools: dict[str, list[str]], root: str | Path
) -> list[dict]:
    """Refine records <aligned image, nearest other aligned image of its prompt> from (image, prompt) pairs.

    The paper's pairs always start from a misaligned image, yet one RvR round refines every T2I output,
    aligned ones included. These pairs show the model that an image which already satisfies its prompt
    stays as it is, up to an independent sample's differences."""
    seeds = [
        {
            "image_list": [rel, rel],
            "user_prompt": [prompt],
            "labels": json.dumps([{"overall": True}, {"overall": True}]),
            "sources": ["aligned", "render"],
        }
        for rel, prompt in aligned
        if any(p != rel for p in pools.get(prompt, []))
    ]
    return pair_nearest(seeds, pools, root)
