"""Mini-GenEval on held-out prompts of the synthetic world, scored by the pixel-only checker.

Modes, per prompt and seed (all images at the world's size):
- `t2i`          the model's text-to-image sample (seed s);
- `t2i_reroll`   a fresh sample with a new seed (s + 1_000_003): the no-refinement control that costs one
                 more generation, like one RvR round;
- `rvr1`/`rvr2`  RvR regeneration of the `t2i` image, one and two rounds (each output fed back);
- `rvr_until`    the judge looks at the `t2i` image; if it rejects it (p(yes) < threshold), RvR rounds run
                 until the judge accepts, at most `max_rounds`;
- `reroll_rvr_weights` (with `rvr_weights_engine`) the re-roll drawn from the RvR weights: RvR fine-tuning
                 also trains text-to-image, so this separates "more training" from "refinement".
- `edit`         (opt-in, for a model trained on edit pairs) refinement via editing: a `t2i` image the checker
                 rejects is edited once with a coarse instruction built from the checker's verdict
                 (editing.edit_instruction); an accepted one is kept. Compare it with the checker-gated
                 retries, which get the same oracle.
Scores follow GenEval: the fraction of prompts whose image the checker accepts, per category, and the
mean over categories. The judge's agreement with the checker on the `t2i` images is reported too.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.preprocess import tensor_to_pil, to_tensor
from engine.types import GenerationRequest, SamplingParams
from training.checker import check
from training.dataset import read_specs
from training.editing import edit_instruction, failed_dims
from training.prompts import PromptSpec, random_scene, sample_scene
from training.world import DEFAULT_SIZE, render

MODES = ("t2i", "t2i_reroll", "rvr1", "rvr2", "rvr_until")
EDIT_MODE = "edit"
REROLL_OFFSET = 1_000_003


def load_heldout(data_root: str | Path) -> list[PromptSpec]:
    return read_specs(Path(data_root) / "eval/heldout.jsonl")


def mini_geneval(
    engine,
    specs: Sequence[PromptSpec],
    seeds: Sequence[int] = (0,),
    size: int = DEFAULT_SIZE,
    modes: Sequence[str] = MODES,
    judge_threshold: float = 0.5,
    max_rounds: int = 3,
    generate_params: dict | None = None,
    refine_params: dict | None = None,
    save_dir: str | Path | None = None,
    rvr_weights_engine=None,
    edit_params: dict | None = None,
) -> dict:
    """Run every mode on every (prompt, seed); returns scores and per-sample records."""
    gp, rp, ep = generate_params or {}, refine_params or {}, edit_params or {}
    if rvr_weights_engine is not None:
        modes = (*modes, "reroll_rvr_weights")
    rows = []
    for i, spec in enumerate(specs):
        for seed in seeds:
            prompt = spec.text
            imgs: dict[str, Image.Image] = {}
            t2i = engine.generate(prompt, size, size, seed=seed, **gp).image
            imgs["t2i"] = t2i
            if "t2i_reroll" in modes:
                imgs["t2i_reroll"] = engine.generate(
                    prompt, size, size, seed=seed + REROLL_OFFSET, **gp
                ).image
            if rvr_weights_engine is not None:
                imgs["reroll_rvr_weights"] = rvr_weights_engine.generate(
                    prompt, size, size, seed=seed + REROLL_OFFSET, **gp
                ).image
            if "rvr1" in modes or "rvr2" in modes:
                req = GenerationRequest(
                    "refine", prompt, t2i, SamplingParams.for_task("refine", **rp), seed, size, size, rounds=2
                )
                outs = engine.run(req)
                imgs["rvr1"], imgs["rvr2"] = outs[0].image, outs[-1].image
            p_yes = engine.judge([(t2i, prompt)])[0]
            rounds_used = 0
            if "rvr_until" in modes:
                if p_yes >= judge_threshold:
                    imgs["rvr_until"] = t2i
                else:
                    outs = engine.refine(
                        t2i, prompt, rounds=max_rounds, until_score=judge_threshold, seed=seed, **rp
                    )
                    imgs["rvr_until"] = outs.image
                    rounds_used = outs.round_index
            labels = {"t2i": check(t2i, spec)}  # the edit mode reads this verdict, so check t2i once
            if EDIT_MODE in modes:
                failed = failed_dims(labels["t2i"], spec)
                if failed:
                    imgs[EDIT_MODE] = engine.edit(
                        t2i, edit_instruction(prompt, failed), seed=seed, **ep
                    ).image
                else:  # an accepted image is kept, and so is its verdict
                    imgs[EDIT_MODE], labels[EDIT_MODE] = t2i, labels["t2i"]
            labels |= {m: check(imgs[m], spec) for m in modes if m in imgs and m not in labels}
            rows.append(
                {
                    "prompt": prompt,
                    "category": spec.category,
                    "seed": seed,
                    "judge_p_yes": p_yes,
                    "rounds_until": rounds_used,
                    **{f"ok_{m}": lab["overall"] for m, lab in labels.items()},
                    **{f"dims_{m}": {d: lab[d] for d in spec.dims} for m, lab in labels.items()},
                }
            )
            if save_dir is not None:
                d = Path(save_dir) / f"{i:04d}_{seed}"
                d.mkdir(parents=True, exist_ok=True)
                for m, im in imgs.items():
                    im.save(d / f"{m}.png")
    return summarize(rows, modes, judge_threshold)


@torch.no_grad()
def autoencoder_ceiling(vae, specs: Sequence[PromptSpec], seed: int = 0, size: int = DEFAULT_SIZE) -> dict:
    """Checker score of autoencoder round trips of aligned renders of `specs`: the best any generator that
    decodes through this autoencoder can score, per category and averaged over categories."""
    rng = np.random.default_rng(seed)
    rows = []
    for spec in specs:
        img = render(sample_scene(spec, rng), size, rng, jitter=1.0)
        w = next(vae.parameters())
        rec = tensor_to_pil(
            vae.decode(vae.encode(to_tensor(img)[None].to(w.device, w.dtype)))[0].float().cpu()
        )
        rows.append(
            {
                "category": spec.category,
                "judge_p_yes": 1.0,
                "rounds_until": 0,
                "ok_ae": check(rec, spec)["overall"],
            }
        )
    s = summarize(rows, ("ae",))
    return {
        "mean_over_categories": s["mean_over_categories"]["ae"],
        "per_category": {c: v["ae"] for c, v in s["per_category"].items()},
    }


def prompt_blind(
    specs: Sequence[PromptSpec], seed: int = 0, size: int = DEFAULT_SIZE, per_spec: int = 8
) -> dict:
    """Chance level: checker scores of random scenes that ignore the prompt (1-5 objects of random shape,
    colour and size), pooled and per prompt dimension, on the same prompts."""
    rng = np.random.default_rng(seed)
    rows = []
    for spec in specs:
        for _ in range(per_spec):
            lab = check(render(random_scene(rng), size, rng, jitter=1.0), spec)
            rows.append(
                {
                    "category": spec.category,
                    "judge_p_yes": 0.0,
                    "rounds_until": 0,
                    "ok_blind": lab["overall"],
                    "dims_blind": {d: lab[d] for d in spec.dims},
                }
            )
    s = summarize(rows, ("blind",))
    return {
        "pooled": s["pooled"]["blind"],
        "per_dimension": {d: v["blind"] for d, v in s["per_dimension"].items()},
    }


def summarize(rows: list[dict], modes: Sequence[str], judge_threshold: float = 0.5) -> dict:
    by_cat: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    by_dim: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        for m in modes:
            if f"ok_{m}" in r:
                by_cat[r["category"]][m].append(r[f"ok_{m}"])
            for d, ok in r.get(f"dims_{m}", {}).items():
                by_dim[d][m].append(ok)
    per_cat = {c: {m: sum(v) / len(v) for m, v in ms.items()} for c, ms in sorted(by_cat.items())}
    mean = {m: sum(per_cat[c][m] for c in per_cat if m in per_cat[c]) / max(1, len(per_cat)) for m in modes}
    pooled = {m: _rate([r[f"ok_{m}"] for r in rows if f"ok_{m}" in r]) for m in modes}
    # per prompt dimension: the fraction of (prompt, seed) pairs constraining it whose image satisfies it
    per_dim = {d: {m: sum(v) / len(v) for m, v in ms.items()} for d, ms in sorted(by_dim.items())}
    judge_agree = [(r["judge_p_yes"] >= judge_threshold) == r["ok_t2i"] for r in rows if "ok_t2i" in r]
    # paired with the t2i image of the same (prompt, seed): what a mode fixed and what it broke
    paired = {
        m: {
            "fixed": sum(1 for r in rows if not r.get("ok_t2i", True) and r.get(f"ok_{m}", False)),
            "broke": sum(1 for r in rows if r.get("ok_t2i", False) and not r.get(f"ok_{m}", True)),
        }
        for m in modes
        if m != "t2i"
    }
    # one retry of a rejected t2i image, gated by the checker itself (an oracle verifier): re-rolling and
    # refining get the same second chance, so this compares them apart from the judge's quality
    gated = {
        m: _rate([r["ok_t2i"] or r[f"ok_{m}"] for r in rows if "ok_t2i" in r and f"ok_{m}" in r])
        for m in ("t2i_reroll", "rvr1", EDIT_MODE)
        if m in modes
    }
    return {
        "n": len(rows),
        "mean_over_categories": mean,
        "pooled": pooled,
        "per_category": per_cat,
        "per_dimension": per_dim,
        "vs_t2i": paired,
        "judge_agreement_with_checker": sum(judge_agree) / len(judge_agree) if judge_agree else None,
        "mean_rounds_until": sum(r["rounds_until"] for r in rows) / max(1, len(rows)),
        "checker_gated_retry": gated,
        "rows": rows,
    }


def _rate(v: list[bool]) -> float | None:
    return sum(v) / len(v) if v else None


def _cell(v: float | None) -> str:
    return f"{v:>12.3f}" if v is not None else f"{'-':>12}"


def format_summary(s: dict) -> str:
    lines = [f"mini-GenEval: {s['n']} (prompt, seed) pairs; score = checker accepts"]
    modes = list(s["mean_over_categories"])
    lines.append("  " + f"{'category':<14}" + "".join(f"{m:>12}" for m in modes))
    for c, ms in s["per_category"].items():
        lines.append("  " + f"{c:<14}" + "".join(f"{ms.get(m, float('nan')):>12.3f}" for m in modes))
    lines.append("  " + f"{'mean':<14}" + "".join(f"{s['mean_over_categories'][m]:>12.3f}" for m in modes))
    if s.get("pooled"):
        lines.append("  " + f"{'pooled':<14}" + "".join(_cell(s["pooled"][m]) for m in modes))
    for d, ms in s.get("per_dimension", {}).items():
        lines.append("  " + f"{'dim ' + d:<14}" + "".join(_cell(ms.get(m)) for m in modes))
    if s.get("vs_t2i"):
        lines.append(
            "  vs t2i (fixed/broke): "
            + ", ".join(f"{m} {v['fixed']}/{v['broke']}" for m, v in s["vs_t2i"].items())
        )
    if s["judge_agreement_with_checker"] is not None:
        lines.append(f"  judge agrees with checker on t2i images: {s['judge_agreement_with_checker']:.3f}")
    lines.append(f"  mean RvR rounds in rvr_until: {s['mean_rounds_until']:.2f}")
    if s.get("checker_gated_retry"):
        lines.append(
            "  one retry of rejected t2i images, gated by the checker: "
            + ", ".join(f"{m} {v:.3f}" for m, v in s["checker_gated_retry"].items())
        )
    if "prompt_blind" in s:
        b = s["prompt_blind"]
        dims = ", ".join(f"{d} {v:.3f}" for d, v in b["per_dimension"].items())
        lines.append(f"  chance (prompt-blind random scenes): pooled {b['pooled']:.3f}; {dims}")
    if "autoencoder_ceiling" in s:
        lines.append(
            f"  autoencoder round-trip ceiling: {s['autoencoder_ceiling']['mean_over_categories']:.3f}"
        )
    return "\n".join(lines)


MODE_LABELS = {
    "t2i": "text-to-image",
    "t2i_reroll": "text-to-image re-rolled (new seed)",
    "reroll_rvr_weights": "re-roll from the RvR weights (control)",
    "rvr1": "RvR, 1 round",
    "rvr2": "RvR, 2 rounds",
    "rvr_until": "RvR until the judge accepts (<= 3)",
    EDIT_MODE: "editing, instructed by the checker's verdict (rejected T2I images)",
}


def markdown_table(s: dict) -> str:
    """The paper-style table: one row per mode; pooled, per prompt dimension, and fixed/broke vs t2i."""
    modes = list(s["pooled"])
    dims = list(s.get("per_dimension", {}))
    head = ["mode", f"overall ({s['n']})", *dims, "fixed / broke vs T2I"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    for m in modes:
        vs = s.get("vs_t2i", {}).get(m)
        cells = [
            MODE_LABELS.get(m, m),
            fmt(s["pooled"][m]),
            *(fmt(s["per_dimension"][d].get(m)) for d in dims),
            f"{vs['fixed']} / {vs['broke']}" if vs else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if "prompt_blind" in s:
        b = s["prompt_blind"]
        cells = [
            "chance (prompt-blind random scenes)",
            fmt(b["pooled"]),
            *(fmt(b["per_dimension"].get(d)) for d in dims),
            "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if s.get("judge_agreement_with_checker") is not None:
        lines.append("")
        lines.append(
            f"Judge agrees with the checker on {s['judge_agreement_with_checker']:.3f} of the T2I images; "
            f"RvR-until used {s['mean_rounds_until']:.2f} rounds on average."
        )
    gated = s.get("checker_gated_retry", {})
    if {"t2i_reroll", "rvr1"} <= set(gated):
        lines.append(
            "With the checker itself deciding which T2I images get one retry, re-rolling them scores "
            f"{gated['t2i_reroll']:.3f} and one RvR round {gated['rvr1']:.3f}"
            + (f"; editing them scores {gated[EDIT_MODE]:.3f}." if EDIT_MODE in gated else ".")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from engine.loading import default_model_dir, load_engine
    from training.image_use import format_image_use, image_use

    ap = argparse.ArgumentParser(description="Mini-GenEval on the held-out prompts of a world dataset.")
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    ap.add_argument(
        "--data",
        default=None,
        help="world dataset root holding eval/heldout.jsonl (default: the model directory, where the "
        "bundled model ships the held-out prompts it was never trained on)",
    )
    ap.add_argument("--limit", type=int, default=None, help="first N held-out prompts")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the engine's)")
    ap.add_argument("--save-dir", default=None)
    ap.add_argument("--json", default=None, help="write the full summary here")
    ap.add_argument("--markdown", default=None, help="append the table (with this command) to this file")
    ap.add_argument(
        "--edit",
        action="store_true",
        help="also refine via editing: rejected T2I images are edited with an instruction from the checker's "
        "verdict (for models trained on edit pairs, e.g. --profile bundled-cast-edit)",
    )
    ap.add_argument(
        "--image-use",
        action="store_true",
        help="also probe whether RvR reads its input image (image_use.py: RvR from known renders)",
    )
    a = ap.parse_args(argv)
    model = Path(a.model) if a.model else default_model_dir()
    data = Path(a.data) if a.data else model
    if not (data / "eval/heldout.jsonl").is_file():
        ap.error(f"{data} has no eval/heldout.jsonl; pass --data with a world dataset root")
    engine = load_engine(model, device="cpu", dtype="float32")
    specs = load_heldout(data)[: a.limit]
    params = {"steps": a.steps} if a.steps else {}
    s = mini_geneval(
        engine,
        specs,
        range(a.seeds),
        modes=(*MODES, EDIT_MODE) if a.edit else MODES,
        generate_params=params,
        refine_params=params,
        edit_params=params,
        save_dir=a.save_dir,
    )
    s["prompt_blind"] = prompt_blind(specs)
    print(format_summary(s))
    if a.image_use:
        s["image_use"] = image_use(
            engine,
            specs,
            range(a.seeds),
            refine_params=params,
            generate_params=params,
            rvr_weights_engine=load_engine(model, device="cpu", dtype="float32", weights="rvr")
            if "rvr" in engine.info()["weights"]
            else None,
        )
        print(format_image_use(s["image_use"]))
    if a.json:
        Path(a.json).write_text(json.dumps(s, indent=2))
    if a.markdown:
        command = "rvr eval " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(a.markdown, "a") as f:
            f.write(f"\n`{command}` (model {model}):\n\n{markdown_table(s)}\n")


if __name__ == "__main__":
    main()
