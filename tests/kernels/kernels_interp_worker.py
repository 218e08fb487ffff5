"""Subprocess worker: runs the Triton kernel under TRITON_INTERPRET=1 and reports JSON metrics.

Usage: python kernels_interp_worker.py '<json list of cases>'. The variable must be set before triton is
imported, and an out-of-bounds load would kill the process, hence the subprocess. Prints one JSON line
per case prefixed with 'RESULT '.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"

import torch

from kernels import attention_with_layout, build_layout, mixed_attention
from kernels._triton_attention import mixed_attention_triton
from tests.kernels.kernels_testutil import (
    dense_mask,
    error_stats,
    golden,
    lowp_reference,
    make_inputs,
    mask_from_index,
    random_specs,
    within_tolerance,
)

DTYPES = {"float16": torch.float16, "float32": torch.float32}


def _poisoned_out(tq, hq, d, dtype):
    """A NaN buffer with a guard row on each side and 8 guard columns per head; `out` is a view into it."""
    buf = torch.full((tq + 2, hq, d + 8), float("nan"), dtype=dtype)
    return buf, buf[1 : tq + 1, :, :d]


def _guards_intact(buf, tq, d) -> bool:
    return bool(
        torch.isnan(buf[0]).all()
        and torch.isnan(buf[tq + 1]).all()
        and torch.isnan(buf[1 : tq + 1, :, d:]).all()
    )


def _lse_err(lse, gold_lse) -> float:
    fin = torch.isfinite(gold_lse)
    if not torch.equal(fin, torch.isfinite(lse)):
        return float("inf")
    if not fin.any():
        return 0.0
    return ((lse.double() - gold_lse)[fin].abs() / gold_lse[fin].abs().clamp(min=1)).max().item()


def run_random(c):
    dtype = DTYPES[c["dtype"]]
    rng = random.Random(c["seed"])
    cache_rows = c["cache_rows"]
    specs = random_specs(rng, max_rows=c["max_rows"], cache_rows=cache_rows, min_rows=c["max_rows"] // 3)
    layout = build_layout(specs)
    hq = c["hkv"] * c["group"]
    d = c["d"]
    inputs = make_inputs(layout.total_q, cache_rows, hq, c["hkv"], d, dtype, c["seed"])
    if c.get("large_logit"):
        q = inputs[0]
        q[layout.total_q // 2, 0, :] = 300.0  # scores in the thousands: needs the running max
        q[0, hq - 1, 0] = 1000.0
    index = layout.indices
    t0 = time.perf_counter()
    buf = None
    if c.get("api") == "mixed_attention":
        out, lse = mixed_attention(*inputs, *index, return_lse=True)
    elif c.get("api") == "layout":
        out, lse = attention_with_layout(*inputs, layout, return_lse=True)
    else:
        buf, out = _poisoned_out(layout.total_q, hq, d, dtype)
        out, lse = mixed_attention_triton(
            *inputs, *index, None, True, block_m=c["block_m"], block_n=c["block_n"], out=out
        )
    elapsed = time.perf_counter() - t0
    mask = dense_mask(specs, cache_rows)
    gold, gold_lse = golden(*inputs, mask)
    ok, msg = within_tolerance(out, gold, lowp_reference(*inputs, mask), dtype)
    res = {
        "ok": ok,
        "msg": msg,
        "err": error_stats(out, gold),
        "lse_err": _lse_err(lse, gold_lse),
        "rows": layout.total_q,
        "time_s": elapsed,
        "dtype_ok": out.dtype == dtype and lse.dtype == torch.float32,
    }
    if buf is not None:
        res["guards_intact"] = _guards_intact(buf, layout.total_q, d)
    return res


def run_invariance(c):
    """Packing order and batch membership do not change any output bit."""
    dtype = DTYPES[c["dtype"]]
    rng = random.Random(c["seed"])
    specs = []
    while len(specs) < 3:
        specs = random_specs(rng, max_rows=c["max_rows"], cache_rows=48)
    layout = build_layout(specs)
    q, k, v, kc, vc = make_inputs(layout.total_q, 48, 4, 2, 64, dtype, c["seed"])
    out = attention_with_layout(q, k, v, kc, vc, layout)
    cu = layout.cu_seqlens_q.tolist()
    perm = [*list(range(1, len(specs))), 0][::-1]
    rows = torch.cat([torch.arange(cu[i], cu[i + 1]) for i in perm])
    out2 = attention_with_layout(q[rows], k[rows], v[rows], kc, vc, build_layout([specs[i] for i in perm]))
    s, e = cu[1], cu[2]
    out3 = attention_with_layout(q[s:e], k[s:e], v[s:e], kc, vc, build_layout([specs[1]]))
    return {
        "permuted_equal": bool(torch.equal(out2, out[rows])),
        "alone_equal": bool(torch.equal(out3, out[s:e])),
    }


def run_fully_masked(c):
    """check=False rows with kv_end = 0 and no cache see no key: output exactly 0, LSE -inf; rows after
    them in the same tile start with fully masked tiles (the safe-max path)."""
    dtype = DTYPES[c["dtype"]]
    n = 40
    q, k, v, kc, vc = make_inputs(n + 5, 16, 2, 1, 64, dtype, 11)
    cu = torch.tensor([0, n, n + 5], dtype=torch.int32)
    cs = torch.tensor([0, 3], dtype=torch.int32)
    cl = torch.tensor([0, 10], dtype=torch.int32)
    ke = torch.tensor([0] * 5 + [20] * 15 + [40] * 20 + [0, 0, 3, 5, 5], dtype=torch.int32)
    out, lse = mixed_attention(q, k, v, kc, vc, cu, cs, cl, ke, return_lse=True, check=False)
    gold, gold_lse = golden(q, k, v, kc, vc, mask_from_index(cu, cs, cl, ke, 16))
    zero_rows = torch.equal(out[:5], torch.zeros_like(out[:5]))
    return {
        "zero_rows": zero_rows,
        "lse_neginf": bool(torch.isneginf(lse[:5]).all()),
        "err": error_stats(out, gold),
        "lse_err": _lse_err(lse, gold_lse),
    }


def main():
    cases = json.loads(sys.argv[1])
    for c in cases:
        fn = {"random": run_random, "invariance": run_invariance, "fully_masked": run_fully_masked}[c["kind"]]
        res = fn(c)
        res["case"] = c
        print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
