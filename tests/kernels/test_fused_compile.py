"""The fused elementwise kernels compile for sm_90 (H100/H200) ahead of time, without a GPU, at the BAGEL-7B
shapes, in bf16: no register spills (local memory), vectorised 128-bit global loads. Subprocess for the
same reasons as test_kernels_compile.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json
from kernels._triton_fused import compile_for_target
res = {}
for name in ("rms_norm", "qk_norm_rope", "silu_mul"):
    ptx = compile_for_target(name, "bf16").asm["ptx"]
    res[name] = {"local": ptx.count("ld.local") + ptx.count("st.local"), "v4": ptx.count("ld.global.v4"),
                 "v2": ptx.count("ld.global.v2")}
print("RESULT " + json.dumps(res))
"""


@pytest.mark.slow
def test_fused_kernels_compile_for_sm90(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT ") :])
    print(res)
    for name, r in res.items():
        assert r["local"] == 0, f"{name} spills registers: {r}"
        assert r["v4"] + r["v2"] > 0, f"{name} has no vectorised global loads: {r}"
