"""Every engine mode side by side on one device: one RvR refine per size, random weights.

    python -m bench.speed --out speed.json       # GPU: bagel-7b, 1024^2 x 50 and 512^2 x 20 steps
    python -m bench.speed --preset tiny --device cpu --sizes 64:4 --out s.json   # CPU smoke run

Modes (one process, the same weights; all three CFG branches on every step, interval [0, 1]):
  stock   our model code run the released inferencer's way (bench/stock.py): contexts prefilled one by one,
          segment by segment; every CFG branch its own forward; SDPA with default dispatch; eager, unfused
  eager   the engine's reference backend: packed prefill with shared prefixes, all branches in one forward,
          the attention kernel on CUDA
  exact   the default backend: eager's computation with concatenated projections, fused elementwise
          kernels, kernel-vs-SDPA attention measured per shape class, CUDA-graph replay of the step
  fast    exact plus the request field speed="fast", when the engine has it (else "not available")

Per mode and size: prefill, median and mean step, VAE decode, total, peak GPU memory, ratio to stock, the
CUDA time split (attention / GEMM / other, torch.profiler over `--profile-steps` steps) and the drift of
the final latents against eager on the same seed (max and mean abs difference). Modes run in the order
above; exact concatenates the weights in place, so it comes after the modes that use them unfused.
Weights are random N(0, 0.02): only time, memory and drift are meaningful, not the images.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

import numpy as np
import torch
from PIL import Image

from bench.stock import StockBackend, stock_prepare
from engine.backends.eager import EagerBackend
from engine.backends.exact import ExactBackend
from engine.core import Engine
from engine.loading import resolve_device, resolve_dtype
from engine.tiny import RandomWeights, random_weights
from engine.types import GenerationRequest, SamplingParams

MODES = ("stock", "eager", "exact", "fast")
PROMPT = "three red apples and a blue cup on a wooden table"


def classify(name: str) -> str:
    """A CUDA kernel (or CPU op) name -> attention / gemm / other."""
    n = name.lower()
    if any(s in n for s in ("attn", "attention", "flash", "fmha", "sdpa", "softmax")):
        return "attention"
    if any(
        s in n for s in ("gemm", "matmul", "cutlass", "xmma", "cublas", "nvjet", "addmm", "aten::mm", "bmm")
    ):
        return "gemm"
    return "other"


def time_split(prof, cuda: bool) -> dict[str, float]:
    """Self time per class from a finished torch.profiler run: device kernels on CUDA, CPU ops elsewhere."""
    totals = {"attention": 0.0, "gemm": 0.0, "other": 0.0}
    for ev in prof.key_averages():
        if cuda:
            if ev.device_type is not None and "CUDA" not in str(ev.device_type):
                continue
            t_us = getattr(ev, "self_device_time_total", 0) or getattr(ev, "self_cuda_time_total", 0)
        else:
            t_us = ev.self_cpu_time_total
        totals[classify(ev.key)] += t_us
    whole = sum(totals.values()) or 1.0
    return {**{k: round(v / whole, 4) for k, v in totals.items()}, "total_ms": round(whole / 1e3, 3)}


def fast_supported() -> bool:
    """The fast mode is a request field `speed` (built separately); present once it lands."""
    return "speed" in {f.name for f in dataclasses.fields(GenerationRequest)}


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object]) -> tuple[object, float]:
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - t0


@dataclasses.dataclass
class Mode:
    name: str
    engine: Engine
    prepare: Callable[[GenerationRequest], object]
    request_fields: dict


def build_mode(name: str, w: RandomWeights, device, dtype, sizes, latent_rows) -> Mode:
    weights = {"rvr": w.model}
    args = (w.cfg, w.tokenizer, weights, w.vae, device, dtype)
    if name == "stock":
        engine = Engine(*args, backend=StockBackend())
        return Mode(name, engine, lambda r: stock_prepare(engine, r), {})
    if name == "eager":
        engine = Engine(*args, backend=EagerBackend())
    else:
        buckets = [f"3x{latent_rows(s)}" for s, _ in sizes]
        engine = Engine(*args, backend=ExactBackend(buckets))
    fields = {"speed": "fast"} if name == "fast" else {}
    return Mode(name, engine, lambda r: engine.prepare([r])[0], fields)


def image_of(size: int) -> Image.Image:
    rng = np.random.RandomState(0)
    return Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8"))


def request(size: int, steps: int, seed: int, fields: dict) -> GenerationRequest:
    params = SamplingParams.for_task("refine", steps=steps)
    return GenerationRequest("refine", PROMPT, image_of(size), params, seed=seed, **fields)


def run_refine(mode: Mode, req: GenerationRequest, timer: Timer) -> dict:
    """One timed refine through the step API: prefill, every step, decode."""
    t_start = time.perf_counter()
    state, prefill_s = timer(lambda: mode.prepare(req))
    steps = []
    while not state.done:
        _, dt = timer(lambda: mode.engine.step([state]))
        steps.append(dt)
    final = state.x.float().cpu()
    out, decode_s = timer(lambda: mode.engine.finish(state))
    return {
        "prefill_s": prefill_s,
        "steps": steps,
        "decode_s": decode_s,
        "total_s": time.perf_counter() - t_start,
        "final": final,
        "output_size": list(out.image.size),
    }


def profile_steps(mode: Mode, req: GenerationRequest, n: int, device) -> dict | None:
    if n <= 0:
        return None
    from torch.profiler import ProfilerActivity, profile

    state = mode.prepare(req)
    try:
        mode.engine.step([state])  # not profiled: the first step of a batch builds its layouts
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(n):
                mode.engine.step([state])
            Timer(device).sync()
    finally:
        mode.engine.release(state)
    split = time_split(prof, device.type == "cuda")
    split["total_ms_per_step"] = round(split.pop("total_ms") / n, 3)
    return split


def drift(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    d = (a - b).abs()
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "ref_mean_abs": float(b.abs().mean())}


def measure_mode(mode: Mode, sizes, args, device, timer) -> dict[str, dict]:
    results = {}
    warm = mode.engine.warm_up()  # CUDA-graph captures (exact, fast); measured apart from the refines
    for size, steps in sizes:
        # Warm-up refine (autotuning, allocator growth, first-use measurements); not timed.
        w = run_refine(mode, request(size, min(steps, 3), 0, mode.request_fields), timer)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        r = run_refine(mode, request(size, steps, args.seed, mode.request_fields), timer)
        st = np.array(r["steps"])
        row = {
            "size": size,
            "num_timesteps": steps,
            "steps": len(st),
            "prefill_s": round(r["prefill_s"], 4),
            "step_s_median": round(float(np.median(st)), 4),
            "step_s_mean": round(float(st.mean()), 4),
            "vae_decode_s": round(r["decode_s"], 4),
            "total_s": round(r["total_s"], 3),
            "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if device.type == "cuda"
            else None,
            "warmup_refine_s": round(w["total_s"], 3),
            "output_size": r["output_size"],
            "time_share": profile_steps(
                mode, request(size, steps, args.seed, mode.request_fields), args.profile_steps, device
            ),
        }
        fallback = getattr(mode.engine.denoiser, "fallback", None)
        if fallback is not None and args.profile_steps > 0:
            # The same kernels without graph replay: the split stays readable should the profiler not see
            # kernels launched inside CUDA graphs (compare total_ms_per_step with the step time).
            graphs, mode.engine._denoiser = mode.engine._denoiser, fallback
            try:
                row["time_share_without_graphs"] = profile_steps(
                    mode, request(size, steps, args.seed, mode.request_fields), args.profile_steps, device
                )
            finally:
                mode.engine._denoiser = graphs
        row["final"] = r["final"]
        results[str(size)] = row
    results["_warm_up"] = warm
    denoiser = mode.engine.denoiser
    if hasattr(denoiser, "replays"):
        results["_graphs"] = {"replays": denoiser.replays, "fallbacks": denoiser.fallbacks}
    attention = getattr(mode.engine.backend, "attention", None)
    if attention is not None:
        results["_attention_choice"] = attention.report()
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bagel-7b", choices=("tiny", "small", "bagel-7b"))
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--sizes", default="1024:50,512:20", help="SIZE:NUM_TIMESTEPS pairs (square images)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--profile-steps", type=int, default=2, help="steps profiled per mode and size (0: none)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default=None, help="write the JSON result here")
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    sizes = [tuple(int(v) for v in s.split(":")) for s in args.sizes.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        ap.error(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    order = [m for m in MODES if m in modes]  # exact fuses the weights in place: after stock and eager
    timer = Timer(device)
    t0 = time.perf_counter()
    w = random_weights(args.preset, device, dtype)
    build_s = time.perf_counter() - t0
    down = w.cfg.latent_downsample

    def latent_rows(size: int) -> int:
        return (size // down) ** 2

    per_mode: dict[str, dict] = {}
    for name in order:
        if name == "fast" and not fast_supported():
            per_mode[name] = {"status": "not available (no `speed` request field in this engine)"}
            continue
        mode = build_mode(name, w, device, dtype, sizes, latent_rows)
        try:
            per_mode[name] = measure_mode(mode, sizes, args, device, timer)
        except Exception as exc:  # e.g. fast mode refusing this device; the other modes still report
            per_mode[name] = {"status": f"failed: {type(exc).__name__}: {exc}"[:500]}
        del mode
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    summary = summarize(per_mode, sizes)
    result = {
        "what": "one RvR refine per size, all three CFG branches on every step, random weights",
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model_build_s": round(build_s, 3),
        "modes": per_mode,
        "summary": summary,
    }
    print_table(summary)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def summarize(per_mode: dict[str, dict], sizes) -> list[dict]:
    """Rows of the side-by-side table; strips the final latents from `per_mode` after using them."""
    rows = []
    for size, _ in sizes:
        key = str(size)
        stock = per_mode.get("stock", {}).get(key)
        eager = per_mode.get("eager", {}).get(key)
        for name, res in per_mode.items():
            if key not in res:
                rows.append({"mode": name, "size": size, "status": res.get("status", "not run")})
                continue
            r = res[key]
            row = {"mode": name, "size": size}
            row.update(
                {
                    k: r[k]
                    for k in ("prefill_s", "step_s_median", "vae_decode_s", "total_s", "peak_gpu_mem_gb")
                }
            )
            if stock:
                row["total_vs_stock"] = round(r["total_s"] / stock["total_s"], 3)
                row["step_vs_stock"] = round(r["step_s_median"] / stock["step_s_median"], 3)
            if eager and name != "eager":
                row["drift_vs_eager"] = drift(r["final"], eager["final"])
            row["time_share"] = r["time_share"]
            rows.append(row)
    for res in per_mode.values():
        for r in res.values():
            if isinstance(r, dict):
                r.pop("final", None)
    return rows


def print_table(rows: list[dict]) -> None:
    head = f"{'mode':<7}{'size':>6}{'prefill s':>11}{'step s':>9}{'decode s':>10}{'total s':>9}{'x stock':>9}"
    print(head + f"{'GiB':>7}  attn/gemm/other   drift max/mean vs eager")
    for r in rows:
        if "status" in r:
            print(f"{r['mode']:<7}{r['size']:>6}  {r['status']}")
            continue
        share = r.get("time_share") or {}
        split = "/".join(f"{share.get(k, 0):.2f}" for k in ("attention", "gemm", "other")) if share else "-"
        d = r.get("drift_vs_eager")
        dr = f"{d['max_abs']:.2e}/{d['mean_abs']:.2e}" if d else "-"
        ratio = r.get("total_vs_stock")
        ratio_s = f"{ratio:.3f}" if ratio else "-"
        mem = f"{r['peak_gpu_mem_gb']:.1f}" if r["peak_gpu_mem_gb"] else "-"
        times = (
            f"{r['prefill_s']:>11.3f}{r['step_s_median']:>9.4f}{r['vae_decode_s']:>10.3f}{r['total_s']:>9.2f}"
        )
        print(f"{r['mode']:<7}{r['size']:>6}{times}{ratio_s:>9}{mem:>7}  {split:<17} {dr}")


if __name__ == "__main__":
    sys.exit(main())
