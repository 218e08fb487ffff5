"""Subprocess worker: the fused Triton kernels under TRITON_INTERPRET=1 against float64 goldens.

Usage: python fused_interp_worker.py '<json list of cases>'. Prints one 'RESULT {json}' line per case.
Each case names its shape; values come from its seed; inputs include strided views (the projections'
outputs).
"""

from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch

from kernels import _triton_fused as tf
from kernels.fused_reference import (
    add_rms_norm_reference,
    qk_norm_rope_reference,
    rms_norm_reference,
    silu_mul_reference,
)
from tests.kernels.fused_testutil import (
    add_rms_golden,
    qk_norm_rope_golden,
    rms_golden,
    rng_tensor,
    silu_mul_golden,
    within,
)

DTYPES = {"float16": torch.float16, "float32": torch.float32}
EPS = 1e-6


def run_rms(c, g, dtype):
    n, d = c["shape"]
    wide = rng_tensor(g, n, d + 7, dtype=dtype, scale=3.0)
    x = wide[:, 3 : 3 + d]  # a row-strided view
    w = rng_tensor(g, d, dtype=dtype, scale=0.2, offset=1.0)
    if c.get("residual"):
        r = rng_tensor(g, n, d, dtype=dtype)
        h, y = tf.rms_norm_triton(x, w, EPS, residual=r)
        h_ref, y_ref = add_rms_norm_reference(x, r, w, EPS)
        h_gold, y_gold = add_rms_golden(x, r, w, EPS)
        ok_h, s_h = within(h, h_ref, h_gold, dtype)
        ok_y, s_y = within(y, y_ref, y_gold, dtype)
        return ok_h and ok_y, {"shape": [n, d], "sum": s_h, "norm": s_y}
    y = tf.rms_norm_triton(x, w, EPS)
    ok, s = within(y, rms_norm_reference(x, w, EPS), rms_golden(x, w, EPS), dtype)
    return ok, {"shape": [n, d], **s}


def run_qk(c, g, dtype):
    n, hq, hkv, d = c["shape"]
    qkv = rng_tensor(g, n, hq + 2 * hkv, d, dtype=dtype, scale=2.0)  # the projection output
    x = qkv[:, : hq + hkv]  # q and k heads: a strided view, like the engine passes
    wq = rng_tensor(g, d, dtype=dtype, scale=0.3, offset=1.0)
    wk = rng_tensor(g, d, dtype=dtype, scale=0.3, offset=1.0)
    pos = torch.randint(0, 5000, (n,), generator=g).float()
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2).float() / d))
    f = pos[:, None] * inv[None]
    emb = torch.cat([f, f], -1)[:, None]
    cos, sin = emb.cos(), emb.sin()  # (n, 1, D) float32, as RotaryEmbedding returns
    out = tf.qk_norm_rope_triton(x, wq, wk, hq, cos, sin, EPS, dtype)
    ref = qk_norm_rope_reference(x, wq, wk, hq, cos, sin, EPS, dtype)
    ok, s = within(out, ref, qk_norm_rope_golden(x, wq, wk, hq, cos, sin, EPS), dtype)
    return ok and out.is_contiguous(), {"shape": [n, hq, hkv, d], **s}


def run_silu(c, g, dtype):
    n, i = c["shape"]
    gu = rng_tensor(g, n, 2 * i, dtype=dtype, scale=3.0)
    out = tf.silu_mul_triton(gu)
    ok, s = within(out, silu_mul_reference(gu), silu_mul_golden(gu), dtype)
    return ok, {"shape": [n, i], **s}


def main():
    for c in json.loads(sys.argv[1]):
        g = torch.Generator().manual_seed(c["seed"])
        fn = {"rms": run_rms, "qk": run_qk, "silu": run_silu}[c["op"]]
        ok, stats = fn(c, g, DTYPES[c["dtype"]])
        print("RESULT " + json.dumps({"case": c, "ok": ok, **stats}), flush=True)


if __name__ == "__main__":
    main()
