"""bench/gpu_speed.sh --cpu-smoke: the prepared GPU script runs every step on the CPU at tiny size, inside
its budget, and writes the files a GPU run brings back."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_speed_script_cpu_smoke(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PY": sys.executable, "OUT": str(out), "GPU_SPEED_BUDGET_S": "240"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_speed.sh"), "--cpu-smoke"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "gpu_speed.log").read_text()
    steps = dict(re.findall(r"^== ([\w-]+): rc=(\d+)", log, re.M))
    assert steps == {"speed": "0", "gpu-tests": "0", "serving": "0", "fused-bench": "0"}, log[-3000:]
    names = {p.name for p in out.iterdir()}
    assert names == {
        "conditions.txt",
        "gpu_speed.log",
        "speed.json",
        "gpu_tests.log",
        "serving.json",
        "fused_bench.json",
    }
    speed = json.loads((out / "speed.json").read_text())
    assert {row["mode"] for row in speed["summary"]} == {"stock", "eager", "exact", "fast"}
    assert len(json.loads((out / "serving.json").read_text())["results"]) == 2
    assert "torch" in (out / "conditions.txt").read_text()
