"""Benchmark `mixed_attention` against stock PyTorch attention on the RvR hot shapes.

    python -m kernels.bench [--out results.json] [--shapes denoise1,prefill] [--smoke]

On one CUDA GPU, for each shape (docs: /work/shared/anchors/attention-h200.md; Hq 28, Hkv 4, D 128, bf16):
  ours            kernels.attention_with_layout (Triton, autotuned; layout built once, outside timing)
  sdpa_branch     F.scaled_dot_product_attention, one call per sequence (only for unmasked sequences,
                  i.e. the denoise branches; K/V concatenated per branch outside timing), enable_gqa
  sdpa_dense      SDPA on a padded batch with a dense boolean mask (K/V pre-expanded to Hq heads,
                  outside timing, because the masked fused backends refuse GQA)
  flex            torch.compile(flex_attention) with a compiled create_block_mask; the block-mask build
                  time is reported separately (first call and warm)
  sdpa_causal / sdpa_nomask   single-sequence shapes only: fused SDPA with a *different* (simpler) mask,
                  an upper bound, not a correct answer
Each output is checked against the reference in float32. Effective TFLOP/s count only visible
query-key pairs, 4*Hq*D FLOPs per pair. `--smoke` runs tiny shapes on the CPU (reference path, simple
timer, no FlexAttention) so CI can check that the script runs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import Segment, SequenceSpec, attention_with_layout, build_layout, mixed_attention_reference


@dataclass
class Shape:
    name: str
    specs: list[SequenceSpec]
    cache_rows: int
    hq: int
    hkv: int
    d: int


def _denoise(n_req: int, text: int, vit: int, latents: int) -> tuple[list[SequenceSpec], int]:
    """n_req requests x 3 CFG branches; per request the cache holds cond [text|ViT], text-dropped [ViT']
    and image-dropped [text'] contexts (different K/V per branch, as in BAGEL)."""
    specs, off = [], 0
    block = (Segment(latents, False),)
    for _ in range(n_req):
        for ctx in (text + vit, vit, text):
            specs.append(SequenceSpec(block, off, ctx))
            off += ctx
    return specs, off


def build_shapes(smoke: bool) -> list[Shape]:
    if smoke:
        hq, hkv, d = 7, 1, 64
        text, vit, lat = 5, 30, 24
    else:
        hq, hkv, d = 28, 4, 128
        text, vit, lat = 100, 4900, 4096
    d1, c1 = _denoise(1, text, vit, lat)
    d4, c4 = _denoise(4, text, vit, lat)
    return [
        Shape("denoise1", d1, c1, hq, hkv, d),
        Shape("denoise4", d4, c4, hq, hkv, d),
        Shape("prefill", [SequenceSpec((Segment(text, True), Segment(vit, False)))], 0, hq, hkv, d),
        Shape(
            "train",
            [SequenceSpec((Segment(text, True), Segment(vit, False), Segment(lat, False)))],
            0,
            hq,
            hkv,
            d,
        ),
    ]


def _timer(smoke: bool) -> Callable[[Callable[[], object]], float]:
    if smoke:

        def cpu_time(fn):
            fn()
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(ts)

        return cpu_time
    import triton.testing

    return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def _errs(out: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = (out.float() - ref).abs()
    return {
        "max_err": diff.max().item(),
        "mean_err": diff.mean().item(),
        "nan": bool(torch.isnan(out).any().item()),
    }


def _dense_inputs(shape: Shape, layout, q, k, v, kc, vc) -> list[torch.Tensor]:
    """Padded (B, Hq, L, D) queries, (B, Hq, S, D) keys/values expanded to Hq heads, (B, 1, L, S) mask."""
    device = q.device
    cu = layout.cu_seqlens_q.tolist()
    nseq = len(shape.specs)
    lmax = layout.max_seqlen_q
    smax = max(s.cache_len + s.length for s in shape.specs)
    group = shape.hq // shape.hkv
    qp = q.new_zeros(nseq, shape.hq, lmax, shape.d)
    kp = k.new_zeros(nseq, shape.hq, smax, shape.d)
    vp = v.new_zeros(nseq, shape.hq, smax, shape.d)
    mask = torch.zeros(nseq, 1, lmax, smax, dtype=torch.bool, device=device)
    kv_end = layout.kv_end.long()
    for b, s in enumerate(shape.specs):
        n, p = s.length, s.cache_len
        qp[b, :, :n] = q[cu[b] : cu[b + 1]].transpose(0, 1)
        keys = torch.cat([kc[s.cache_start : s.cache_start + p], k[cu[b] : cu[b + 1]]]).transpose(0, 1)
        vals = torch.cat([vc[s.cache_start : s.cache_start + p], v[cu[b] : cu[b + 1]]]).transpose(0, 1)
        kp[b, :, : p + n] = keys.repeat_interleave(group, 0)
        vp[b, :, : p + n] = vals.repeat_interleave(group, 0)
        hi = kv_end[cu[b] : cu[b + 1]] + p
        mask[b, 0, :n] = torch.arange(smax, device=device)[None, :] < hi[:, None]
        mask[b, 0, n:, 0] = True  # padding rows: keep them finite
    return [qp, kp, vp, mask]


@dataclass
class ShapeInputs:
    """Seeded random inputs of one shape, its layout, the float32 reference output and the FLOP count."""

    layout: object  # kernels.AttentionLayout
    q: torch.Tensor  # (Tq, Hq, D)
    k: torch.Tensor  # (Tq, Hkv, D)
    v: torch.Tensor  # (Tq, Hkv, D)
    kc: torch.Tensor  # (cache_rows, Hkv, D)
    vc: torch.Tensor  # (cache_rows, Hkv, D)
    ref: torch.Tensor  # (Tq, Hq, D) float32
    flops: float  # 4·Hq·D per visible query-key pair


def make_inputs(shape: Shape, dtype, device) -> ShapeInputs:
    g = torch.Generator(device="cpu").manual_seed(0)
    layout = build_layout(shape.specs, device)
    tq, tc = layout.total_q, shape.cache_rows

    def rnd(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

    q, k, v = rnd(tq, shape.hq, shape.d), rnd(tq, shape.hkv, shape.d), rnd(tq, shape.hkv, shape.d)
    kc, vc = rnd(tc, shape.hkv, shape.d), rnd(tc, shape.hkv, shape.d)
    ref = mixed_attention_reference(*(x.float() for x in (q, k, v, kc, vc)), *layout.indices, check=False)
    return ShapeInputs(layout, q, k, v, kc, vc, ref, 4.0 * shape.hq * shape.d * layout.visible_pairs)


def run_shape(
    shape: Shape, dtype, device, smoke: bool, methods: set[str], inputs: ShapeInputs | None = None
) -> tuple[list[dict], dict]:
    """Time `methods` on one shape; `inputs` (make_inputs) can be shared with another benchmark."""
    timer = _timer(smoke)
    x = inputs or make_inputs(shape, dtype, device)
    layout, q, k, v, kc, vc, ref, flops = x.layout, x.q, x.k, x.v, x.kc, x.vc, x.ref, x.flops
    tc = shape.cache_rows
    cu = layout.cu_seqlens_q.tolist()
    rows: list[dict] = []
    extra: dict = {}

    def record(method, fn, check=True, note=""):
        if method not in methods:
            return
        row = {"shape": shape.name, "method": method, "note": note}
        try:
            out = fn()
            if check:
                row.update(_errs(out, ref))
                row["ok"] = (not row["nan"]) and row["max_err"] < (2e-2 if dtype != torch.float32 else 1e-4)
            del out
            ms = timer(fn)
            row.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
        except Exception as exc:  # one failing baseline must not hide the others
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # ours
    record("ours", lambda: attention_with_layout(q, k, v, kc, vc, layout))
    if device.type == "cuda":
        try:
            from kernels import _triton_attention as ta

            best = ta._tuned_small.best_config if shape.d <= 128 else ta._tuned_large.best_config
            extra["ours_config"] = str(best)
        except Exception:
            pass

    # SDPA, one call per sequence: valid only when each sequence is one bidirectional block.
    if all(len(s.segments) == 1 and not s.segments[0].causal for s in shape.specs):
        per = []
        for b, s in enumerate(shape.specs):
            qb = q[cu[b] : cu[b + 1]].transpose(0, 1)[None]
            kb = torch.cat([kc[s.cache_start : s.cache_start + s.cache_len], k[cu[b] : cu[b + 1]]])
            vb = torch.cat([vc[s.cache_start : s.cache_start + s.cache_len], v[cu[b] : cu[b + 1]]])
            per.append((qb, kb.transpose(0, 1)[None], vb.transpose(0, 1)[None]))

        def sdpa_branch():
            outs = [F.scaled_dot_product_attention(a, b_, c, enable_gqa=True) for a, b_, c in per]
            return torch.cat([o[0].transpose(0, 1) for o in outs])

        record("sdpa_branch", sdpa_branch, note="one call per branch, K/V concatenated outside timing")
        per.clear()

    # SDPA with a dense boolean mask on a padded batch.
    nseq = len(shape.specs)
    if "sdpa_dense" in methods:
        dense = _dense_inputs(shape, layout, q, k, v, kc, vc)

        def sdpa_dense():
            o = F.scaled_dot_product_attention(dense[0], dense[1], dense[2], attn_mask=dense[3])
            return torch.cat([o[b, :, : s.length].transpose(0, 1) for b, s in enumerate(shape.specs)])

        record(
            "sdpa_dense", sdpa_dense, note="padded batch, dense bool mask, K/V expanded to Hq outside timing"
        )
        dense.clear()

    # Bounds with simpler masks (single sequence, no cache).
    if nseq == 1 and tc == 0:
        q4, k4, v4 = (x.transpose(0, 1)[None] for x in (q, k, v))
        record(
            "sdpa_causal",
            lambda: F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, enable_gqa=True),
            check=False,
            note="different mask (causal): bound only",
        )
        record(
            "sdpa_nomask",
            lambda: F.scaled_dot_product_attention(q4, k4, v4, enable_gqa=True),
            check=False,
            note="different mask (none): bound only",
        )

    if "flex" in methods and not smoke:
        extra.update(_flex(shape, layout, q, k, v, kc, vc, timer, record))
    return rows, extra


def _flex(shape, layout, q, k, v, kc, vc, timer, record) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    device = q.device
    tq, tc = layout.total_q, shape.cache_rows
    cu = layout.cu_seqlens_q.long()
    seq_of_row = torch.searchsorted(cu[1:], torch.arange(tq, device=device), right=True)
    cs, cl, start = layout.cache_start.long(), layout.cache_len.long(), cu[:-1]
    kv_end = layout.kv_end.long()

    def mask_mod(b, h, q_idx, kv_idx):
        s = seq_of_row[q_idx]
        in_cache = (kv_idx >= cs[s]) & (kv_idx < cs[s] + cl[s])
        own = kv_idx - tc - start[s]
        in_own = (kv_idx >= tc) & (own >= 0) & (own < kv_end[q_idx])
        return in_cache | in_own

    def build():
        return create_block_mask(mask_mod, 1, None, tq, tc + tq, device=device, _compile=True)

    t0 = time.perf_counter()
    bm = build()
    torch.cuda.synchronize()
    first_ms = (time.perf_counter() - t0) * 1e3
    warm = []
    for _ in range(3):
        t0 = time.perf_counter()
        bm = build()
        torch.cuda.synchronize()
        warm.append((time.perf_counter() - t0) * 1e3)
    flex = torch.compile(flex_attention)
    q4 = q.transpose(0, 1)[None]
    k4 = torch.cat([kc, k]).transpose(0, 1)[None]
    v4 = torch.cat([vc, v]).transpose(0, 1)[None]

    def run():
        return flex(q4, k4, v4, block_mask=bm, enable_gqa=True)[0].transpose(0, 1)

    record("flex", run, note="compiled flex_attention, packed, interval mask_mod; block mask prebuilt")
    return {"flex_block_mask_first_ms": first_ms, "flex_block_mask_warm_ms": statistics.median(warm)}


def conditions(device) -> dict:
    c = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    try:
        import triton

        c["triton"] = triton.__version__
    except Exception:
        c["triton"] = None
    if device.type == "cuda":
        c["gpu"] = torch.cuda.get_device_name(device)
        c["cuda"] = torch.version.cuda
    return c


def _ratio(a, b):
    return b / a if a and b and math.isfinite(a) and math.isfinite(b) else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write results as JSON to this path")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (reference path), for CI")
    ap.add_argument("--shapes", default="", help="comma-separated subset of denoise1,denoise4,prefill,train")
    ap.add_argument(
        "--methods",
        default="ours,sdpa_branch,sdpa_dense,sdpa_causal,sdpa_nomask,flex",
        help="comma-separated subset of methods",
    )
    args = ap.parse_args(argv)

    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
    elif not torch.cuda.is_available():
        msg = "kernels.bench: no CUDA device available; nothing measured (use --smoke for a CPU check)."
        print(msg, file=sys.stderr)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"skipped": msg, "conditions": conditions(torch.device("cpu"))}, f, indent=2)
        return 0
    else:
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16

    cond = conditions(device)
    cond["dtype"] = str(dtype).replace("torch.", "")
    cond["mode"] = "smoke (CPU reference path)" if args.smoke else "gpu"
    print("conditions: " + ", ".join(f"{k}={v}" for k, v in cond.items()))
    wanted = {s for s in args.shapes.split(",") if s}
    methods = {m for m in args.methods.split(",") if m}
    shapes = [s for s in build_shapes(args.smoke) if not wanted or s.name in wanted]
    all_rows, extras = [], {}
    for shape in shapes:
        rows, extra = run_shape(shape, dtype, device, args.smoke, methods)
        extras[shape.name] = extra
        by = {r["method"]: r.get("ms") for r in rows}
        for r in rows:
            r["speedup_vs_flex"] = _ratio(by.get("ours"), by.get("flex")) if r["method"] == "ours" else None
        ours = by.get("ours")
        print(
            f"\n== {shape.name}: {len(shape.specs)} seqs, Tq={sum(s.length for s in shape.specs)}, cache={shape.cache_rows}"
        )
        print(f"{'method':<14}{'ms':>10}{'TFLOP/s':>10}{'max_err':>11}  {'ok':<5} ours_x  note")
        for r in rows:
            if "error" in r:
                print(f"{r['method']:<14}  ERROR {r['error']}")
                continue
            rel = _ratio(ours, r["ms"])
            r["ours_speedup"] = rel
            err = f"{r['max_err']:.2e}" if "max_err" in r else "-"
            ok = str(r.get("ok", "-"))
            rel_s = f"{rel:.2f}x" if rel else "-"
            print(
                f"{r['method']:<14}{r['ms']:>10.3f}{r['tflops']:>10.1f}{err:>11}  {ok:<5} {rel_s:>7}  {r['note']}"
            )
        for key, val in extra.items():
            print(f"{key}: {val:.3f}" if isinstance(val, float) else f"{key}: {val}")
        all_rows.extend(rows)
        del rows
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {"conditions": cond, "results": all_rows, "extra": extras}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.out}")
    bad = [r for r in all_rows if r.get("ok") is False]
    if bad:
        print("OUTPUT MISMATCH: " + ", ".join(f"{r['shape']}/{r['method']}" for r in bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
