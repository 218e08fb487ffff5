"""Dataset construction as in the RvR paper, on the synthetic world, plus the record readers/writers.

For each prompt, several candidates are generated independently (renders of scenes sampled with and
without the prompt's constraints, and optionally samples of a model's own T2I stage through a hook),
every candidate is labelled by the pixel-only checker, and exactly one misaligned and one aligned
candidate are kept. The aligned image is an independent sample, never an edit of the misaligned one.

Records use the release's columns (docs/training.md §3): `image_list` = [misaligned, aligned] and
`user_prompt` = [prompt], paths relative to the data root. Extra columns (`spec`, `labels`, `sources`) are
ignored by the official reader. T2I records are `image_list` = [image], `user_prompt` = [prompt];
understanding records are LLaVA-style (`image`, `conversations`) as read by BAGEL's SFT reader, plus flat
`question`/`answer` columns.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from training.checker import check
from training.prompts import (
    CATEGORIES,
    PlacementError,
    PromptSpec,
    is_heldout,
    random_scene,
    sample_scene,
    sample_spec,
    sample_violation,
)
from training.world import DEFAULT_SIZE, SHAPES, render

# (spec, rng) -> image. A source is one independent way to draw a candidate for a prompt.
CandidateSource = Callable[[PromptSpec, np.random.Generator], Image.Image]
# (prompt text, seed) -> image: the model's own text-to-image stage.
T2IHook = Callable[[str, int], Image.Image]


def understanding_question(prompt: str) -> str:
    return f"Does this image show: {prompt}? Answer yes or no."


def prompt_key(text: str) -> str:
    """Stable file-name key for a prompt."""
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def prompt_rng(seed: int, text: str) -> np.random.Generator:
    """Per-prompt generator: a prompt's candidates do not depend on which other prompts are built."""
    return np.random.default_rng([seed, int(prompt_key(text), 16)])


# ------------------------------------------------------------------------------------------------
# Candidate sources


def simulated_t2i(size: int = DEFAULT_SIZE, jitter: float = 1.0, p_fail: float = 0.5) -> CandidateSource:
    """A stand-in T2I model: with probability `p_fail` it breaks one or two of the prompt's dimensions,
    otherwise it draws a faithful scene; both kinds are fresh, independent layouts."""

    def draw(spec: PromptSpec, rng: np.random.Generator) -> Image.Image:
        violate = sample_violation(spec, rng) if rng.random() < p_fail else ()
        return render(sample_scene(spec, rng, violate), size, rng, jitter)

    return draw


def free_render(size: int = DEFAULT_SIZE, jitter: float = 1.0) -> CandidateSource:
    """An unconstrained scene that reuses the prompt's shapes half of the time (a weak generator)."""

    def draw(spec: PromptSpec, rng: np.random.Generator) -> Image.Image:
        shapes = [g.shape for g in spec.groups] if rng.random() < 0.5 else list(SHAPES)
        return render(random_scene(rng, shapes), size, rng, jitter)

    return draw


def hook_source(hook: T2IHook) -> CandidateSource:
    """Wrap a model's T2I call as a candidate source; each candidate gets a fresh seed."""

    def draw(spec: PromptSpec, rng: np.random.Generator) -> Image.Image:
        return hook(spec.text, int(rng.integers(2**31)))

    return draw


def default_sources(size: int = DEFAULT_SIZE, jitter: float = 1.0) -> dict[str, CandidateSource]:
    return {"sim_t2i": simulated_t2i(size, jitter), "free": free_render(size, jitter)}


# ------------------------------------------------------------------------------------------------
# Refine pairs


@dataclass
class Candidate:
    image: Image.Image
    source: str
    labels: dict[str, bool]


def draw_candidates(
    spec: PromptSpec, rng: np.random.Generator, sources: dict[str, CandidateSource], n: int
) -> list[Candidate]:
    """n independent candidates, sources taken round-robin, each labelled by the checker."""
    names = list(sources)
    out = []
    for i in range(n):
        name = names[i % len(names)]
        try:
            img = sources[name](spec, rng)
        except PlacementError:
            continue  # a crowded violation that did not fit: the candidate is simply not drawn
        out.append(Candidate(img, name, check(img, spec)))
    return out


def select_pair(cands: Sequence[Candidate]) -> tuple[Candidate, Candidate] | None:
    """(misaligned, aligned): the first candidate the checker rejects and the first it accepts."""
    mis = next((c for c in cands if not c.labels["overall"]), None)
    ali = next((c for c in cands if c.labels["overall"]), None)
    return (mis, ali) if mis and ali else None


def save_image(img: Image.Image, root: Path, rel: str) -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return rel


def build_refine_records(
    specs: Iterable[PromptSpec],
    root: str | Path,
    seed: int = 0,
    n_candidates: int = 4,
    max_candidates: int = 16,
    sources: dict[str, CandidateSource] | None = None,
    image_dir: str = "images/rvr",
    pairs_per_prompt: int = 1,
) -> tuple[list[dict], dict[str, int]]:
    """Refine triplets <misaligned, aligned, prompt>; images are written under root/image_dir.

    Draws `n_candidates` per prompt, and more (up to `max_candidates`) while either kind is missing;
    prompts that still lack a kind are skipped and counted in the returned stats. With
    `pairs_per_prompt` > 1 further pairs are drawn from the same per-prompt generator."""
    root = Path(root)
    sources = sources or default_sources()
    records, stats = [], {"prompts": 0, "kept": 0, "skipped": 0, "candidates": 0}
    for spec, j in ((s, j) for s in specs for j in range(pairs_per_prompt)):
        stats["prompts"] += j == 0
        if j == 0:
            rng = prompt_rng(seed, spec.text)
        cands = draw_candidates(spec, rng, sources, n_candidates)
        while select_pair(cands) is None and len(cands) < max_candidates:
            cands += draw_candidates(spec, rng, sources, 2)
        stats["candidates"] += len(cands)
        pair = select_pair(cands)
        if pair is None:
            stats["skipped"] += 1
            continue
        mis, ali = pair
        key = prompt_key(spec.text) + (f"_{j}" if j else "")
        records.append(
            {
                "image_list": [
                    save_image(mis.image, root, f"{image_dir}/{key}_mis.png"),
                    save_image(ali.image, root, f"{image_dir}/{key}_ali.png"),
                ],
                "user_prompt": [spec.text],
                "spec": spec.to_json(),
                "labels": json.dumps([mis.labels, ali.labels]),
                "sources": [mis.source, ali.source],
            }
        )
        stats["kept"] += 1
    return records, stats


def build_t2i_records(
    specs: Iterable[PromptSpec],
    root: str | Path,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    jitter: float = 1.0,
    per_prompt: int = 1,
    image_dir: str = "images/t2i",
    caption_noise: float = 0.0,
) -> list[dict]:
    """T2I targets: `image_list` = [image], `user_prompt`, `noisy`.

    Faithful renders, checker-verified. With `caption_noise` > 0 that fraction of images instead breaks one
    of the caption's dimensions and is kept unfiltered (`noisy` True): pretraining captions scraped with
    their images describe them imperfectly, which is what the paper's checked refine data corrects."""
    root = Path(root)
    records = []
    for spec in specs:
        rng = prompt_rng(seed + 1, spec.text)
        key = prompt_key(spec.text)
        for j in range(per_prompt):
            noisy = caption_noise > 0 and rng.random() < caption_noise
            violate = sample_violation(spec, rng, max_dims=1) if noisy else ()
            try:
                img = render(sample_scene(spec, rng, violate), size, rng, jitter)
            except PlacementError:
                continue
            if not noisy and not check(img, spec)["overall"]:
                continue  # the checker is the filter, as in the paper's pipeline
            records.append(
                {
                    "image_list": [save_image(img, root, f"{image_dir}/{key}_{j}.png")],
                    "user_prompt": [spec.text],
                    "noisy": noisy,
                }
            )
    return records


def understanding_record(image_rel: str, prompt: str, answer: bool) -> dict:
    q = understanding_question(prompt)
    a = "Yes" if answer else "No"
    return {
        "image": image_rel,
        "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}],
        "question": q,
        "answer": a,
    }


def build_understanding_records(refine_records: Iterable[dict]) -> list[dict]:
    """Yes/no judge samples from the refine pairs: the misaligned image answers No, the aligned Yes;
    answers come from the checker labels stored with the pair."""
    out = []
    for r in refine_records:
        labels = json.loads(r["labels"]) if "labels" in r else [{"overall": False}, {"overall": True}]
        prompt = first_prompt(r["user_prompt"])
        for path, lab in zip(parse_image_list(r["image_list"]), labels, strict=True):
            out.append(understanding_record(path, prompt, lab["overall"]))
    return out


# ------------------------------------------------------------------------------------------------
# Reading and writing records


def parse_image_list(v) -> list[str]:
    """A list, or the string repr of a Python list (as the official reader accepts)."""
    if isinstance(v, str):
        v = ast.literal_eval(v)
    return [str(p) for p in v]


def first_prompt(v) -> str:
    """`user_prompt` is list-like; element [0] is the prompt. A bare string is taken as is."""
    if isinstance(v, str):
        return v
    return str(next(iter(v)))


def resolve(root: str | Path, path: str) -> Path:
    """Paths in records are relative to the data root; absolute paths pass through."""
    p = Path(path)
    return p if p.is_absolute() else Path(root) / p


def write_records(records: Sequence[dict], path: str | Path, row_group_size: int = 1000) -> Path:
    """Write records to `.parquet` (pyarrow) or `.jsonl`, chosen by the suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(list(records)), path, row_group_size=row_group_size)
    elif path.suffix == ".jsonl":
        with path.open("w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    else:
        raise ValueError(f"unsupported record file {path} (use .parquet or .jsonl)")
    return path


def write_parquet_info(parquet_files: Iterable[str | Path], info_path: str | Path) -> Path:
    """`parquet_info.json`: each parquet path mapped to its `num_row_groups`, as the release's index."""
    info = {str(p): {"num_row_groups": pq.ParquetFile(p).num_row_groups} for p in parquet_files}
    info_path = Path(info_path)
    info_path.parent.mkdir(parents=True, exist_ok=True)
    info_path.write_text(json.dumps(info, indent=2))
    return info_path


def read_records(path: str | Path) -> list[dict]:
    """Read a `.parquet` or `.jsonl` file, a `parquet_info.json` index, or a directory of such files
    (sorted by name)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".parquet", ".jsonl"))
        return [r for f in files for r in read_records(f)]
    if path.name.endswith(".json"):
        return [r for f in json.loads(path.read_text()) for r in read_records(f)]
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        with path.open() as f:
            return [json.loads(line) for line in f if line.strip()]
    raise ValueError(f"unsupported record file {path}")


def load_refine_sample(record: dict, root: str | Path) -> tuple[Image.Image, Image.Image, str]:
    """(misaligned, aligned, prompt) from one refine record, images as RGB."""
    paths = parse_image_list(record["image_list"])
    if len(paths) != 2:
        raise ValueError(f"a refine record needs exactly 2 images, got {len(paths)}")
    mis, ali = (open_rgb(resolve(root, p)) for p in paths)
    return mis, ali, first_prompt(record["user_prompt"])


def open_rgb(path: str | Path) -> Image.Image:
    """Load an image as RGB, compositing transparency on white (the release's `pil_img2rgb`)."""
    with Image.open(path) as im:
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, im).convert("RGB")
        return im.convert("RGB")


# ------------------------------------------------------------------------------------------------
# The whole world dataset


def sample_prompt_pool(
    n: int,
    seed: int,
    categories: Sequence[str] = CATEGORIES,
    mixed_max_dims: int = 5,
    exclude_dims: Sequence[str] = (),
    max_groups: int = 2,
) -> list[PromptSpec]:
    """n distinct specs: half GenEval `categories` (cycled), half mixed specs of 1-`mixed_max_dims`
    dimensions; specs using a dimension in `exclude_dims` or with more than `max_groups` object groups
    are dropped (a simpler world)."""
    rng = np.random.default_rng(seed)
    seen, out = set(), []
    i = 0
    while len(out) < n and i < 50 * n:
        cat = categories[(i // 2) % len(categories)] if i % 2 == 0 else "mixed"
        if cat == "mixed" and mixed_max_dims < 5:
            spec = sample_spec(rng, n_dims=int(rng.integers(1, mixed_max_dims + 1)), category=cat)
        else:
            spec = sample_spec(rng, category=cat)
        i += 1
        if set(spec.dims) & set(exclude_dims) or len(spec.groups) > max_groups:
            continue
        if spec.text not in seen:
            seen.add(spec.text)
            out.append(spec)
    return out


def spec_records(specs: Iterable[PromptSpec]) -> list[dict]:
    return [{"user_prompt": [s.text], "spec": s.to_json(), "category": s.category} for s in specs]


def read_specs(path: str | Path) -> list[PromptSpec]:
    """Specs from a file written with `spec_records` (`train_specs.jsonl`, `eval/heldout.jsonl`)."""
    return [PromptSpec.from_json(r["spec"]) for r in read_records(path)]


def build_world_dataset(
    out: str | Path,
    n_prompts: int = 2000,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    heldout_fraction: float = 0.1,
    n_candidates: int = 4,
    categories: Sequence[str] = CATEGORIES,
    mixed_max_dims: int = 5,
    exclude_dims: Sequence[str] = (),
    max_groups: int = 2,
    pairs_per_prompt: int = 1,
    t2i_per_prompt: int = 1,
    caption_noise: float = 0.0,
) -> dict:
    """Build every training set of the world under `out`:

    - `rvr/data/rvr.parquet` (+ `rvr/json/parquet_info.json`): refine pairs from training prompts;
    - `t2i/data/t2i.parquet`: renders of training prompts (`caption_noise` of them mis-captioned);
    - `und/und.jsonl`: yes/no judge samples from the refine pairs;
    - `train_specs.jsonl`: the training specs (for stages that sample the model on them);
    - `eval/heldout.jsonl`: the held-out specs (never used above), for mini-GenEval.
    """
    out = Path(out)
    pool = sample_prompt_pool(n_prompts, seed, categories, mixed_max_dims, exclude_dims, max_groups)
    train = [s for s in pool if not is_heldout(s.text, heldout_fraction)]
    held = [s for s in pool if is_heldout(s.text, heldout_fraction)]
    sources = default_sources(size)
    refine, stats = build_refine_records(
        train, out, seed, n_candidates, sources=sources, pairs_per_prompt=pairs_per_prompt
    )
    rvr_file = write_records(refine, out / "rvr/data/rvr.parquet")
    write_parquet_info([rvr_file], out / "rvr/json/parquet_info.json")
    write_records(
        build_t2i_records(train, out, seed, size, per_prompt=t2i_per_prompt, caption_noise=caption_noise),
        out / "t2i/data/t2i.parquet",
    )
    write_records(build_understanding_records(refine), out / "und/und.jsonl")
    write_records(spec_records(train), out / "train_specs.jsonl")
    write_records(spec_records(held), out / "eval/heldout.jsonl")
    stats.update(train_prompts=len(train), heldout_prompts=len(held))
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build the synthetic-world RvR/T2I/judge datasets.")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-prompts", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=DEFAULT_SIZE)
    ap.add_argument("--heldout-fraction", type=float, default=0.1)
    a = ap.parse_args(argv)
    print(json.dumps(build_world_dataset(a.out, a.n_prompts, a.seed, a.size, a.heldout_fraction), indent=2))


if __name__ == "__main__":
    main()
