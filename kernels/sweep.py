"""Launch-config sweep of the Triton kernel on the anchor shapes, with SDPA timed in the same process.

    python -m kernels.sweep [--out sweep.json] [--shapes denoise4,train] [--prev OLD_KERNEL.py]
    TRITON_INTERPRET=1 python -m kernels.sweep --smoke      # tiny shapes, one config, on the CPU

Every (BLOCK_M, BLOCK_N, num_warps, num_stages) below runs through the fixed-config path (no autotuning),
is checked against the float32 reference and timed with do_bench. `--prev` loads another version of
`_triton_attention.py` from a file and times its autotuned choice too, so a kernel change is measured
against its predecessor on the same card in the same run. The autotune lists in `_triton_attention.py`
are chosen from this output.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

import torch

from kernels import attention_with_layout
from kernels.bench import ShapeInputs, _timer, build_shapes, conditions, make_inputs, run_shape

# (BLOCK_M, BLOCK_N, num_warps, num_stages) for D <= 128 on Hopper; configs that exceed shared memory fail
# to launch and are reported as errors.
GPU_CONFIGS = [
    (128, 64, 4, 3),
    (128, 64, 8, 3),
    (128, 64, 8, 4),
    (128, 128, 4, 3),
    (128, 128, 8, 2),
    (128, 128, 8, 3),
    (128, 128, 8, 4),
    (64, 64, 4, 3),
    (64, 64, 4, 4),
    (64, 128, 4, 3),
    (64, 128, 8, 3),
]
SMOKE_CONFIGS = [(32, 32, 4, 1)]


def _load_kernel_module(path: str):
    spec = importlib.util.spec_from_file_location("kernels._triton_attention_prev", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sweep_shape(shape, inputs: ShapeInputs, dtype, smoke: bool, configs, prev=None) -> list[dict]:
    from kernels import _triton_attention as current

    timer = _timer(smoke)
    x = inputs
    layout, q, k, v, kc, vc, ref, flops = x.layout, x.q, x.k, x.v, x.kc, x.vc, x.ref, x.flops
    idx = layout.indices
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    rows = []

    def record(kernel, config, fn):
        row = {"shape": shape.name, "kernel": kernel, "config": config}
        try:
            err = (fn().float() - ref).abs().max().item()
            ms = timer(fn)
            row.update(max_err=err, ok=err < tol, ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
        except Exception as exc:  # out of shared memory and the like: report, go on
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)

    for bm, bn, warps, stages in configs:
        tiles = layout.tile_table(bm)
        record(
            "current",
            {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages},
            lambda bm=bm, bn=bn, warps=warps, stages=stages, tiles=tiles: current.mixed_attention_triton(
                q, k, v, kc, vc, *idx, tiles=tiles, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages
            ),
        )
    record("current", "autotuned", lambda: attention_with_layout(q, k, v, kc, vc, layout))
    if prev is not None:
        bm = prev.default_block_m(shape.d, layout.max_seqlen_q)
        tiles = layout.tile_table(bm)
        record(
            "prev",
            "autotuned",
            lambda: prev.mixed_attention_triton(q, k, v, kc, vc, *idx, tiles=tiles, block_m=bm),
        )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write results as JSON to this path")
    ap.add_argument(
        "--smoke", action="store_true", help="tiny shapes, one config (TRITON_INTERPRET=1 on CPU)"
    )
    ap.add_argument("--shapes", default="denoise4,prefill,train", help="subset of the kernels.bench shapes")
    ap.add_argument("--prev", help="path of another _triton_attention.py to time against (autotuned)")
    args = ap.parse_args(argv)
    if args.smoke:
        device, dtype, configs = torch.device("cpu"), torch.float32, SMOKE_CONFIGS
    elif torch.cuda.is_available():
        device, dtype, configs = torch.device("cuda"), torch.bfloat16, GPU_CONFIGS
    else:
        print("kernels.sweep: no CUDA device (use --smoke under TRITON_INTERPRET=1)", file=sys.stderr)
        return 0
    prev = _load_kernel_module(args.prev) if args.prev else None
    wanted = set(args.shapes.split(","))
    cond = {**conditions(device), "dtype": str(dtype).removeprefix("torch.")}
    print("conditions: " + ", ".join(f"{k}={v}" for k, v in cond.items()))
    results, baselines = [], []
    for shape in build_shapes(args.smoke):
        if shape.name not in wanted:
            continue
        inputs = make_inputs(shape, dtype, device)  # one set of inputs and one reference for both
        rows = sweep_shape(shape, inputs, dtype, args.smoke, configs, prev)
        base, _ = run_shape(shape, dtype, device, args.smoke, {"sdpa_branch", "sdpa_dense"}, inputs)
        sdpa = min((r["ms"] for r in base if "ms" in r), default=None)
        print(f"\n== {shape.name}  (best SDPA: {sdpa:.3f} ms)" if sdpa else f"\n== {shape.name}")
        print(f"{'kernel':<8}{'config':<58}{'ms':>9}{'TFLOP/s':>9}{'x SDPA':>8}  ok")
        for r in sorted(rows, key=lambda r: r.get("ms", float("inf"))):
            cfg = (
                r["config"]
                if isinstance(r["config"], str)
                else " ".join(f"{k}={v}" for k, v in r["config"].items())
            )
            if "error" in r:
                print(f"{r['kernel']:<8}{cfg:<58}  ERROR {r['error'][:80]}")
                continue
            r["speedup_vs_best_sdpa"] = sdpa / r["ms"] if sdpa else None
            x = f"{r['speedup_vs_best_sdpa']:.2f}" if sdpa else "-"
            print(f"{r['kernel']:<8}{cfg:<58}{r['ms']:>9.3f}{r['tflops']:>9.1f}{x:>8}  {r['ok']}")
        results.extend(rows)
        baselines.extend(base)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"conditions": cond, "results": results, "baselines": baselines}, f, indent=2)
    bad = [r for r in results if r.get("ok") is False]
    if bad:
        print("OUTPUT MISMATCH: " + ", ".join(f"{r['shape']}/{r['config']}" for r in bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
