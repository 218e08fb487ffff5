"""Does RvR training teach the model to read its input image? A teacher-forced probe on colour casts.

    python bench/cast_readout.py --model runs/d3/judge --data runs/d3/data --steps 2000 --lr 1e-3

Starting from `--model` (e.g. a run's judge stage), trains RvR on refine pairs that share a world cast
(world.random_cast, strength 0.25; rvr samples only, 10 % prompt and image dropout, no EMA) and, every
quarter of the run, reports the velocity MSE on 24 held-out pairs at fixed noise and t = 0.9 with the
pair's own cast on the input image (`own`) and with another cast (`other`); the target always keeps its
own. A model that reads its input has own < other; one that ignores it has own == other.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from training.dataset import first_prompt, open_rgb, parse_image_list, read_records, resolve
from training.forward import forward
from training.packing import pack
from training.samples import ImageEncoder, Mixture, MixtureConfig, refine_sample
from training.trainer import TrainConfig, Trainer, load_for_training
from training.world import color_cast, random_cast

HELD_OUT = 24
CAST = 0.25
T_FIXED = 0.9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="engine checkpoint to start from")
    ap.add_argument("--data", required=True, help="a run's data root (rvr/json/parquet_info.json)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    model, vae, tok, cfg = load_for_training(args.model)
    records = read_records(data / "rvr/json/parquet_info.json")
    enc = ImageEncoder(cfg, vae)
    rng = np.random.default_rng(0)
    cases = []  # (prompt, input under its own cast, input under another, target under its own)
    for rec in records[:HELD_OUT]:
        mis, ali = (open_rgb(resolve(data, p)) for p in parse_image_list(rec["image_list"]))
        own, other = random_cast(rng, CAST), random_cast(rng, CAST)
        cases.append(
            (
                first_prompt(rec["user_prompt"]),
                color_cast(mis, own),
                color_cast(mis, other),
                color_cast(ali, own),
            )
        )

    @torch.no_grad()
    def readout() -> dict[str, float]:
        model.eval()
        mse = {}
        for name, which in (("own", 1), ("other", 2)):
            total = 0.0
            for i, case in enumerate(cases):
                sample = refine_sample(tok, enc.vit(case[which]), enc.latents(case[3]), case[0])
                batch = pack(
                    [sample], tok.vision_start_id, tok.vision_end_id, torch.Generator().manual_seed(i), 1.0
                )
                batch.lat_t = torch.full_like(batch.lat_t, T_FIXED)
                out = forward(model, batch)
                total += float(((out.velocity - out.target) ** 2).mean())
            mse[name] = round(total / len(cases), 4)
        model.train()
        return mse

    weights = {"rvr": 1.0}
    tcfg = TrainConfig(
        steps=args.steps, lr=args.lr, warmup_steps=20, max_rows=800, timestep_shift=1.0, mixture=weights
    )
    trainer = Trainer(model, tcfg)
    mix_cfg = MixtureConfig(
        weights, refine_pair_cast=CAST, refine_prompt_dropout=0.1, refine_image_dropout=0.1
    )
    mix = Mixture(tok, enc, data, {"rvr": records[HELD_OUT:]}, mix_cfg)
    print(json.dumps({"step": 0, **readout()}), flush=True)
    t0 = time.time()
    for step in range(args.steps):
        samples = mix.batch(0, step, tcfg.max_rows)
        trainer.train_step(
            pack(samples, tok.vision_start_id, tok.vision_end_id, torch.Generator().manual_seed(step), 1.0)
        )
        if (step + 1) % max(args.steps // 4, 1) == 0:
            print(json.dumps({"step": step + 1, **readout(), "seconds": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    main()
