"""The fused elementwise Triton kernels under TRITON_INTERPRET=1 (fp32/fp16, CPU) against float64 goldens.

One subprocess per group (the variable must be set before triton is imported). Random shapes per seed:
empty and single rows, dims that are not powers of two, row-strided inputs (views of a projection's
output), GQA head splits; tolerance: twice PyTorch's own error in the dtype (fused_testutil.within).
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

# (rows, dim) | (rows, Hq, Hkv, D) | (rows, intermediate): empty, one row, dims off powers of two, GQA 1-7.
SHAPES = {
    "rms": [(0, 64), (1, 100), (5, 257), (33, 384), (17, 16)],
    "qk": [(0, 4, 2, 64), (1, 7, 1, 128), (7, 2, 2, 16), (20, 6, 3, 64), (9, 28, 4, 128)],
    "silu": [(0, 8), (1, 300), (6, 1100), (31, 2048), (3, 7)],
}
GROUPS = {
    op: [
        {"op": op, "dtype": dtype, "seed": seed, "shape": shape, **extra}
        for dtype in ("float32", "float16")
        for seed, shape in enumerate(shapes)
        for extra in ([{}, {"residual": True}] if op == "rms" else [{}])
    ]
    for op, shapes in SHAPES.items()
}


def _run(cases) -> list[dict]:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(HERE / "fused_interp_worker.py"), json.dumps(cases)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=240,
    )
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = [json.loads(x[len("RESULT ") :]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert len(results) == len(cases), proc.stdout[-3000:]
    return results


@pytest.mark.interpret
@pytest.mark.parametrize("op", sorted(GROUPS))
def test_fused_kernel_interpreted(op):
    results = _run(GROUPS[op])
    for res in results:  # visible with -rP: the accuracy actually observed
        print(json.dumps(res))
    fails = [res for res in results if not res["ok"]]
    assert not fails, json.dumps(fails, indent=1)
