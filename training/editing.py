"""Refinement via editing, the baseline RvR is measured against: edit pairs of the world and their instruction.

An edit pair is a misaligned render and the *same* scene with only the broken attributes fixed (shape,
colour, size): unlike a refine pair, the target is an edit of the source. The instruction is coarse, built
from the checker's verdict alone (which prompt dimensions failed) plus the prompt, so the same function
drives editing at evaluation time, where the checker reads a model's T2I image.

Counts and positions are not edited (an edit would have to add, remove or move objects); prompts whose
source breaks them get no edit pair.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from training.checker import check
from training.dataset import prompt_key, prompt_rng, save_image
from training.prompts import PlacementError, PromptSpec, sample_scene, scene_truth
from training.world import DEFAULT_SIZE, Scene, fits, render

EDITABLE_DIMS: tuple[str, ...] = ("object", "color", "size")
DIM_WORDS = {"object": "object", "color": "colour", "count": "count", "size": "size", "position": "position"}


def failed_dims(verdict: dict[str, bool], spec: PromptSpec) -> list[str]:
    """The spec's dimensions a checker verdict rejects, in the spec's order."""
    return [d for d in spec.dims if not verdict[d]]


def edit_instruction(prompt: str, failed: Sequence[str]) -> str:
    """'Fix the colour and size: a large red circle' from the failed dimensions of `prompt`."""
    if not failed:
        raise ValueError("nothing to fix: the verdict accepts every dimension")
    words = [DIM_WORDS[d] for d in failed]
    listed = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    return f"Fix the {listed}: {prompt}"


def edited_scene(scene: Scene, spec: PromptSpec) -> Scene | None:
    """`scene` with only shapes, colours and sizes changed so that it satisfies `spec`, or None.

    Every object of a group's shape takes the group's colour and size; a group with no object takes over
    one object whose shape no group names. Positions never change, so None where that is not enough
    (counts, positions, no object to take over) or a grown object would overlap another."""
    objs = list(scene.objects)
    spec_shapes = {g.shape for g in spec.groups}
    for g in spec.groups:
        idx = [i for i, o in enumerate(objs) if o.shape == g.shape]
        if not idx:
            spare = [i for i, o in enumerate(objs) if o.shape not in spec_shapes]
            if not spare:
                return None
            idx = spare[:1]
        for i in idx:
            o = objs[i]
            objs[i] = replace(o, shape=g.shape, color=g.color or o.color, size=g.size or o.size)
    if not all(fits(o, objs[:i] + objs[i + 1 :]) for i, o in enumerate(objs)):
        return None
    out = Scene(tuple(objs))
    return out if scene_truth(out, spec)["overall"] else None


def build_edit_records(
    specs: Iterable[PromptSpec],
    root: str | Path,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    jitter: float = 1.0,
    per_prompt: int = 1,
    image_dir: str = "images/edit",
    max_tries: int = 8,
) -> tuple[list[dict], dict[str, int]]:
    """Edit pairs: `image_list` = [source, edited], `user_prompt`, `instruction` (from the checker).

    The source breaks one or two editable dimensions of the prompt; the target is its edit. Both render
    from one generator state (same background and jitter). A pair is kept when the checker rejects the
    source on editable dimensions only and accepts the target."""
    root = Path(root)
    records, stats = [], {"prompts": 0, "pairs": 0, "no_edit": 0}
    for spec in specs:
        dims = [d for d in EDITABLE_DIMS if d in spec.dims]
        stats["prompts"] += 1
        rng = prompt_rng(seed + 2, spec.text)
        kept = 0
        for _ in range(max_tries * per_prompt):
            if kept == per_prompt:
                break
            k = 1 if len(dims) == 1 or rng.random() < 0.7 else 2
            violate = tuple(rng.choice(dims, size=k, replace=False))
            try:
                source = sample_scene(spec, rng, violate)
            except PlacementError:
                continue
            target = edited_scene(source, spec)
            if target is None:
                continue
            render_seed = int(rng.integers(2**31))
            src_img = render(source, size, np.random.default_rng(render_seed), jitter)
            tgt_img = render(target, size, np.random.default_rng(render_seed), jitter)
            verdict = check(src_img, spec)
            failed = failed_dims(verdict, spec)
            if not failed or not set(failed) <= set(EDITABLE_DIMS) or not check(tgt_img, spec)["overall"]:
                continue
            key = f"{prompt_key(spec.text)}_{kept}"
            records.append(
                {
                    "image_list": [
                        save_image(src_img, root, f"{image_dir}/{key}_src.png"),
                        save_image(tgt_img, root, f"{image_dir}/{key}_tgt.png"),
                    ],
                    "user_prompt": [spec.text],
                    "instruction": edit_instruction(spec.text, failed),
                    "failed": failed,
                }
            )
            kept += 1
        stats["pairs"] += kept
        stats["no_edit"] += kept == 0
    return records, stats
