"""How much of RvR's deficit is the refine sampler? One RvR round of the T2I images under several sampling
settings, scored by the checker, on a world's *training* prompts (held-out prompts stay for the final number).

    python bench/refine_sampling.py --model engine/assets/demo --data runs/bundled/data --limit 40 --seeds 3

For each (prompt, seed) the T2I image is drawn once with the released T2I defaults; every setting refines
that same image with the same seed. Reports, per setting: RvR-1 accuracy, fixed / broke against T2I, and the
checker-gated retry (rejected T2I images refined once), beside T2I and a re-roll.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from engine.loading import load_engine
from training.checker import check
from training.dataset import read_specs
from training.evaluate import REROLL_OFFSET

# name -> overrides of the released refine defaults (cfg_text 4, cfg_img 2, cfg_interval (0, 1), text_channel)
SETTINGS: dict[str, dict] = {
    "released": {},
    "cfg_img 1": {"cfg_img": 1.0},
    "cfg_img 1.5": {"cfg_img": 1.5},
    "cfg_text 2": {"cfg_text": 2.0},
    "interval 0.4-1": {"cfg_interval": (0.4, 1.0)},
    "renorm global": {"renorm": "global"},
}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="world dataset root holding train_specs.jsonl")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    engine = load_engine(a.model, device="cpu", dtype="float32")
    specs = read_specs(f"{a.data}/train_specs.jsonl")[: a.limit]
    t0 = time.time()
    ok: dict[str, list[bool]] = {"t2i": [], "t2i_reroll": [], **{name: [] for name in SETTINGS}}
    for spec in specs:
        for seed in range(a.seeds):
            t2i = engine.generate(spec.text, a.size, a.size, seed=seed, steps=a.steps).image
            reroll = engine.generate(
                spec.text, a.size, a.size, seed=seed + REROLL_OFFSET, steps=a.steps
            ).image
            ok["t2i"].append(check(t2i, spec)["overall"])
            ok["t2i_reroll"].append(check(reroll, spec)["overall"])
            for name, over in SETTINGS.items():
                out = engine.refine(t2i, spec.text, seed=seed, steps=a.steps, **over).image
                ok[name].append(check(out, spec)["overall"])
    n = len(ok["t2i"])
    base = ok["t2i"]
    result = {"n": n, "seconds": time.time() - t0, "settings": {}}
    print(f"{n} (prompt, seed) pairs of {a.data}/train_specs.jsonl, {a.steps} steps")
    print(f"  {'setting':<16}{'accuracy':>10}{'fixed':>7}{'broke':>7}{'gated retry':>13}")
    for name, v in ok.items():
        fixed = sum(1 for b, x in zip(base, v, strict=True) if not b and x)
        broke = sum(1 for b, x in zip(base, v, strict=True) if b and not x)
        gated = sum(b or x for b, x in zip(base, v, strict=True)) / n
        result["settings"][name] = {
            "accuracy": sum(v) / n,
            "fixed": fixed,
            "broke": broke,
            "gated_retry": gated,
        }
        print(f"  {name:<16}{sum(v) / n:>10.3f}{fixed:>7}{broke:>7}{gated:>13.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
