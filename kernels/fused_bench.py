"""Benchmark the fused elementwise kernels against the PyTorch formulas they replace.

    python -m kernels.fused_bench [--out fused.json] [--rows 12294] [--smoke]

On one CUDA GPU, in bf16 at BAGEL-7B-MoT widths (hidden 3584, 28 + 4 heads of 128, FFN 18944) and the row
count of one 1024^2 denoising step with three CFG branches (3 x 4098): per op, the Triton kernel
(`kernels.fused`), the eager PyTorch reference (`kernels.fused_reference`, what the engine ran before) and
the reference under `torch.compile` (inductor's own fusion). Reported: median ms (triton.testing.do_bench),
effective GB/s (the bytes the op must read and write once), max error against the reference. `--smoke`
runs small shapes on the CPU (reference only, a simple timer) so CI checks the script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from kernels import fused
from kernels.bench import conditions
from kernels.fused_reference import (
    add_rms_norm_reference,
    qk_norm_rope_reference,
    rms_norm_reference,
    silu_mul_reference,
)

EPS = 1e-6


def _cases(rows: int, hidden: int, hq: int, hkv: int, d: int, ffn: int, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*s, scale=1.0, offset=0.0):
        return (torch.randn(*s, generator=g) * scale + offset).to(device=device, dtype=dtype)

    x, r, w = rnd(rows, hidden), rnd(rows, hidden), rnd(hidden, scale=0.1, offset=1.0)
    qkv = rnd(rows, hq + 2 * hkv, d)
    qk = qkv[:, : hq + hkv]
    wq, wk = rnd(d, scale=0.1, offset=1.0), rnd(d, scale=0.1, offset=1.0)
    pos = torch.arange(rows, device=device).float()
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=device).float() / d))
    emb = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)[:, None]
    cos, sin = emb.cos(), emb.sin()
    gu = rnd(rows, 2 * ffn)
    e = torch.finfo(dtype).bits // 8
    return {
        # name: (fused op, reference, args, bytes read + written once)
        "rms_norm": (fused.rms_norm, rms_norm_reference, (x, w, EPS), 2 * rows * hidden * e),
        "add_rms_norm": (fused.add_rms_norm, add_rms_norm_reference, (x, r, w, EPS), 4 * rows * hidden * e),
        "qk_norm_rope": (
            fused.qk_norm_rope,
            qk_norm_rope_reference,
            (qk, wq, wk, hq, cos, sin, EPS, dtype),
            2 * rows * (hq + hkv) * d * e + 2 * rows * d * 4,
        ),
        "silu_mul": (fused.silu_mul, silu_mul_reference, (gu,), 3 * rows * ffn * e),
    }


def _timer(smoke: bool):
    if smoke:

        def cpu(fn):
            fn()
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(ts)

        return cpu
    import triton.testing

    return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _max_err(a, b) -> float:
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    return max(
        (x.float() - y.float()).abs().max().item() if x.numel() else 0.0 for x, y in zip(a, b, strict=True)
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write results as JSON to this path")
    ap.add_argument("--rows", type=int, default=3 * 4098, help="rows (tokens) per op")
    ap.add_argument("--smoke", action="store_true", help="small shapes on the CPU (reference path), for CI")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    args = ap.parse_args(argv)
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        shape = dict(rows=64, hidden=256, hq=4, hkv=2, d=64, ffn=512)
    elif not torch.cuda.is_available():
        msg = "kernels.fused_bench: no CUDA device available; nothing measured (use --smoke for a CPU check)."
        print(msg, file=sys.stderr)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"skipped": msg, "conditions": conditions(torch.device("cpu"))}, f, indent=2)
        return 0
    else:
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
        shape = dict(rows=args.rows, hidden=3584, hq=28, hkv=4, d=128, ffn=18944)
    timer = _timer(args.smoke)
    cond = {**conditions(device), "dtype": str(dtype).removeprefix("torch."), **shape}
    cond["mode"] = "smoke (CPU reference path)" if args.smoke else "gpu"
    results = []
    with torch.inference_mode():
        for name, (op, ref, op_args, nbytes) in _cases(**shape, dtype=dtype, device=device).items():
            row = {"op": name, "bytes": nbytes}
            expected = ref(*op_args)
            methods = {"fused": op, "reference": ref}
            if not args.smoke and not args.no_compile:
                methods["compiled_reference"] = torch.compile(ref, dynamic=False)
            for method, fn in methods.items():
                try:
                    row[f"{method}_max_err"] = _max_err(fn(*op_args), expected)
                    ms = timer(lambda fn=fn, a=op_args: fn(*a))
                    row[f"{method}_ms"] = round(ms, 4)
                    row[f"{method}_gb_s"] = round(nbytes / (ms * 1e-3) / 1e9, 1)
                except Exception as exc:  # one failing column must not hide the others
                    row[f"{method}_error"] = f"{type(exc).__name__}: {exc}"[:300]
            if row.get("fused_ms") and row.get("reference_ms"):
                row["speedup_vs_reference"] = round(row["reference_ms"] / row["fused_ms"], 2)
            results.append(row)
            cols = " ".join(f"{m} {row.get(m + '_ms', 'err')} ms" for m in methods)
            print(f"{name:<14} {cols}  x{row.get('speedup_vs_reference')}")
    doc = {"conditions": cond, "results": results}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
