"""GPU check for the engine: one RvR refine at the real BAGEL-7B-MoT shapes with random weights.

    python bench/engine_refine.py --out engine.json                       # 1024^2, 50 steps, bf16, kernel
    python bench/engine_refine.py --attention reference --out ref.json    # same, attention without our kernel
    python bench/engine_refine.py --preset tiny --device cpu --size 64 --steps 4   # CPU smoke run
    python bench/engine_refine.py --jobs 4 --weight-sets 2 --out b4.json  # 4 refines, ema + rvr resident

Reports total / prefill / per-step / VAE-decode time, peak GPU memory, jobs per minute and (with --profile)
the share of CUDA time in attention vs GEMMs. `--jobs N` runs N refines (seeds 42..) as one batch, as the
worker packs them; `--weight-sets 2` also keeps a second (unused) weight set resident, as serving both does.
All three CFG branches run on every step (interval [0, 1]). Weights are random (N(0, 0.02)), so only
timings and memory are meaningful, not the image.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone

import numpy as np
import torch
from PIL import Image

from engine.core import Engine
from engine.loading import resolve_device, resolve_dtype
from engine.tiny import random_weights
from engine.types import GenerationRequest, SamplingParams


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def classify(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("attn", "attention", "flash", "fmha", "sdpa", "softmax")):
        return "attention"
    if any(
        s in n for s in ("gemm", "matmul", "cutlass", "xmma", "cublas", "nvjet", "addmm", "aten::mm", "bmm")
    ):
        return "gemm"
    return "other"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bagel-7b", choices=("tiny", "small", "bagel-7b"))
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--size", type=int, default=1024, help="input and output side in pixels")
    ap.add_argument("--steps", type=int, default=50, help="num_timesteps T (T-1 steps)")
    ap.add_argument("--attention", default="auto", choices=("auto", "kernel", "reference"))
    ap.add_argument("--profile", action="store_true", help="profile 2 steps for the attention/GEMM split")
    ap.add_argument("--jobs", type=int, default=1, help="refines packed in one batch")
    ap.add_argument("--weight-sets", type=int, default=1, choices=(1, 2), help="resident weight sets")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.perf_counter()
    w = random_weights(args.preset, device, dtype)
    models = {"rvr": w.model}
    if args.weight_sets == 2:  # a second resident set of the same shapes (sizing: memory with both)
        models["ema"] = random_weights(args.preset, device, dtype, seed=1).model
    build_s = time.perf_counter() - t0
    engine = Engine(w.cfg, w.tokenizer, models, w.vae, device, dtype, attention=args.attention)

    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(args.size, args.size, 3) * 255).astype("uint8"))
    params = SamplingParams.for_task("refine", steps=args.steps)
    prompt = "three red apples and a blue cup on a wooden table"
    reqs = [GenerationRequest("refine", prompt, image, params, seed=42 + i) for i in range(args.jobs)]

    # Warm-up: kernel autotuning and allocator / KV-pool growth happen here, not in the timed run.
    warm = SamplingParams.for_task("refine", steps=3)
    engine.run_batch([GenerationRequest("refine", prompt, image, warm, seed=i) for i in range(args.jobs)])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    sync(device)
    t_start = time.perf_counter()
    states = engine.prepare(reqs)
    sync(device)
    prefill_s = time.perf_counter() - t_start
    step_times, rows = [], []
    while not all(s.done for s in states):
        t = time.perf_counter()
        stats = engine.step(states).stats
        sync(device)
        step_times.append(time.perf_counter() - t)
        rows.append(stats.rows)
    t = time.perf_counter()
    outs = [engine.finish(s) for s in states]
    sync(device)
    decode_s = (time.perf_counter() - t) / len(states)
    total_s = time.perf_counter() - t_start
    out = outs[0]
    req = reqs[0]

    split = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        [state] = engine.prepare([req])
        engine.step([state])
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            engine.step([state])
            engine.step([state])
            sync(device)
        engine.release(state)
        totals: dict[str, float] = {"attention": 0.0, "gemm": 0.0, "other": 0.0}
        for ev in prof.key_averages():
            if device.type == "cuda":
                t_us = getattr(ev, "self_device_time_total", 0) or getattr(ev, "self_cuda_time_total", 0)
                if ev.device_type is not None and "CUDA" not in str(ev.device_type):
                    continue
            else:
                t_us = ev.self_cpu_time_total
            totals[classify(ev.key)] += t_us
        whole = sum(totals.values()) or 1.0
        split = {k: round(v / whole, 4) for k, v in totals.items()}

    steps = np.array(step_times)
    result = {
        "what": f"{args.jobs} RvR refine(s) in one batch, all 3 CFG branches on every step, random weights",
        "preset": args.preset,
        "size": args.size,
        "num_timesteps": args.steps,
        "attention": args.attention,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "jobs": args.jobs,
        "weight_sets": args.weight_sets,
        "jobs_per_min": round(args.jobs * 60 / total_s, 2),
        "packed_rows_per_step": int(np.median(rows)),
        "model_build_s": round(build_s, 3),
        "total_s": round(total_s, 3),
        "prefill_s": round(prefill_s, 4),
        "step_s_median": round(float(np.median(steps)), 4),
        "step_s_mean": round(float(steps.mean()), 4),
        "steps": len(step_times),
        "vae_decode_s": round(decode_s, 4),
        "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
        "time_share": split,
        "output_size": list(out.image.size),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
