"""The Triton kernel under TRITON_INTERPRET=1 (fp16/fp32, CPU) against the float64 dense-mask golden.

Each group of cases runs in one subprocess (kernels_interp_worker.py): the variable must be set before
triton is imported, and an out-of-bounds load segfaults the interpreter. Tolerances: docs/kernel.md §5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _random(seed, dtype, hkv, group, d, cache_rows, block_m=None, block_n=None, api=None, max_rows=200, **kw):
    c = {
        "kind": "random",
        "seed": seed,
        "dtype": dtype,
        "hkv": hkv,
        "group": group,
        "d": d,
        "cache_rows": cache_rows,
        "max_rows": max_rows,
        "block_m": block_m,
        "block_n": block_n,
        **kw,
    }
    if api:
        c["api"] = api
    return c


GROUPS = {
    "fp32_sweep": [
        _random(10, "float32", 1, 1, 64, 0, 16, 16),
        _random(11, "float32", 2, 2, 64, 70, 32, 32),
        _random(12, "float32", 1, 7, 128, 40, 32, 64),
        _random(13, "float32", 2, 1, 72, 97, 64, 32),
        _random(14, "float32", 1, 2, 128, 33, api="mixed_attention"),
        _random(15, "float32", 1, 1, 72, 0, api="layout", max_rows=280),
    ],
    "fp16_sweep": [
        _random(20, "float16", 1, 7, 64, 60, 32, 32),
        _random(21, "float16", 2, 1, 128, 0, 16, 32),
        _random(22, "float16", 1, 2, 72, 97, 32, 16),
        _random(23, "float16", 2, 2, 64, 45, 64, 64, large_logit=True),
        _random(24, "float16", 1, 7, 128, 80, api="layout"),
        _random(25, "float16", 1, 1, 64, 20, api="mixed_attention", max_rows=280),
    ],
    "edge_cases": [
        {"kind": "invariance", "seed": 30, "dtype": "float16", "max_rows": 200},
        {"kind": "invariance", "seed": 31, "dtype": "float32", "max_rows": 160},
        {"kind": "fully_masked", "dtype": "float16"},
        {"kind": "fully_masked", "dtype": "float32"},
        _random(32, "float32", 1, 1, 64, 64, 16, 16, large_logit=True),
        _random(33, "float32", 1, 2, 256, 30, 32, 32, max_rows=90),  # largest head dim
        _random(34, "float16", 2, 1, 40, 30, 16, 32, max_rows=90),  # pads 40 -> 64
    ],
}


def _run_group(cases) -> list[dict]:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(HERE / "kernels_interp_worker.py"), json.dumps(cases)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=240,
    )
    assert proc.returncode == 0, (
        f"worker failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    results = [
        json.loads(line[len("RESULT ") :]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")
    ]
    assert len(results) == len(cases), proc.stdout[-3000:]
    return results


def _check(res: dict) -> list[str]:
    case = res["case"]
    fails = []
    if case["kind"] == "random":
        if not res["ok"]:
            fails.append(f"tolerance: {res['msg']}")
        if res["lse_err"] > 1e-5:
            fails.append(f"lse rel err {res['lse_err']:.3g}")
        if not res["dtype_ok"]:
            fails.append("output dtype")
        if res.get("guards_intact") is False:
            fails.append("wrote outside the output rows/columns (poison guards overwritten)")
    elif case["kind"] == "invariance":
        if not (res["permuted_equal"] and res["alone_equal"]):
            fails.append(f"packing invariance: {res}")
    elif case["kind"] == "fully_masked":
        if not (res["zero_rows"] and res["lse_neginf"]):
            fails.append(f"fully masked rows: {res}")
        atol = 2e-3 if case["dtype"] == "float16" else 1e-5
        if res["err"]["nan"] or res["err"]["max"] > atol or res["lse_err"] > 1e-5:
            fails.append(f"fully masked accuracy: {res}")
    return [f"{case}: {f}" for f in fails]


@pytest.mark.interpret
@pytest.mark.parametrize("group", sorted(GROUPS))
def test_interpreted_kernel(group):
    results = _run_group(GROUPS[group])
    fails = [f for res in results for f in _check(res)]
    for res in results:  # visible with -rP / on failure: the accuracy actually observed
        print(json.dumps({k: res[k] for k in ("err", "lse_err", "rows", "time_s") if k in res}), res["case"])
    assert not fails, "\n".join(fails)
