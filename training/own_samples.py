"""The model's own text-to-image samples as training data (the paper's misaligned images come from T2I models).

After the T2I stage, every training prompt gets `per_prompt` independent samples of the model itself,
each labelled by the pixel-only checker. They become:

- judge samples (the sample, the prompt, the checker's verdict): the judge then learns on the images it
  will judge at refine time, not only on renders;
- refine pairs <own misaligned sample, aligned image>: the aligned image is a checker-verified render of
  the same prompt from the T2I set (independent of the sample, never an edit of it), so RvR learns on the
  failure modes of the model it refines.

Records use the same columns as `dataset.py`, with `sources` = ["own_t2i", "render"].
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.types import GenerationRequest, SamplingParams
from training.checker import check, white_balance
from training.dataset import (
    first_prompt,
    parse_image_list,
    prompt_key,
    prompt_rng,
    save_image,
    understanding_record,
    write_records,
)
from training.prompts import PromptSpec


def own_t2i_records(
    engine,
    specs: Sequence[PromptSpec],
    t2i_records: Sequence[dict],
    root: str | Path,
    seed: int = 0,
    per_prompt: int = 8,
    size: int = 64,
    params: dict | None = None,
    batch_size: int = 64,
    image_dir: str = "images/own",
    white_balance_samples: bool = False,
) -> tuple[list[dict], list[dict], dict]:
    """(refine records, judge records, stats) from `per_prompt` own samples of every spec.

    Seeds come from the per-prompt generator, so the samples of a prompt do not depend on the others. With
    `white_balance_samples` (a model trained under colour casts) each sample is stored neutral, like the
    world's renders, so that training can give both images of a pair one shared cast."""
    root = Path(root)
    renders: dict[str, list[str]] = defaultdict(list)
    for r in t2i_records:
        if not r.get("noisy", False):  # aligned images are checker-verified renders only
            renders[first_prompt(r["user_prompt"])].append(parse_image_list(r["image_list"])[0])
    sampling = SamplingParams.for_task("generate", **(params or {}))
    requests, owners = [], []
    for spec in specs:
        rng = prompt_rng(seed + 2, spec.text)
        for j in range(per_prompt):
            requests.append(
                GenerationRequest("generate", spec.text, None, sampling, int(rng.integers(2**31)), size, size)
            )
            owners.append((spec, j))
    outputs = engine.run_batch(requests, batch_size)
    refine, judge = [], []
    stats = {"samples": len(requests), "aligned": 0, "pairs": 0, "no_render": 0}
    for (spec, j), rounds in zip(owners, outputs, strict=True):
        image = rounds[-1].image
        if white_balance_samples:
            image = white_balance(image)
        labels = check(image, spec)
        rel = save_image(image, root, f"{image_dir}/{prompt_key(spec.text)}_{j}.png")
        judge.append(understanding_record(rel, spec.text, labels["overall"]))
        if labels["overall"]:
            stats["aligned"] += 1
            continue
        pool = renders.get(spec.text)
        if not pool:
            stats["no_render"] += 1
            continue
        aligned = pool[
            int(np.random.default_rng([seed, j, int(prompt_key(spec.text), 16)]).integers(len(pool)))
        ]
        refine.append(
            {
                "image_list": [rel, aligned],
                "user_prompt": [spec.text],
                "spec": spec.to_json(),
                "labels": json.dumps([labels, {"overall": True}]),
                "sources": ["own_t2i", "render"],
            }
        )
        stats["pairs"] += 1
    return refine, judge, stats


def write_own_dataset(out: str | Path, refine: list[dict], judge: list[dict]) -> None:
    """`own/rvr.parquet` and `own/und.jsonl` under the data root."""
    out = Path(out)
    write_records(refine, out / "own/rvr.parquet")
    write_records(judge, out / "own/und.jsonl")
