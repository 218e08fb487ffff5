"""`python -m kernels.bench` runs: --smoke on the CPU, and a clean exit without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _run(*args, tmp_path, module="kernels.bench", interpret=False, timeout=180):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=timeout,
    )


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run("--smoke", "--out", str(out), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["conditions"]["mode"].startswith("smoke")
    shapes = {r["shape"] for r in data["results"]}
    assert shapes == {"denoise1", "denoise4", "prefill", "train"}
    ours = [r for r in data["results"] if r["method"] == "ours"]
    assert len(ours) == 4 and all(r["ok"] and r["ms"] > 0 and r["tflops"] > 0 for r in ours)
    checked = [r for r in data["results"] if "max_err" in r]
    assert checked and all(r["ok"] for r in checked), checked
    assert "denoise1" in proc.stdout and "TFLOP/s" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_bench_without_cuda(tmp_path):
    out = tmp_path / "skip.json"
    proc = _run("--out", str(out), tmp_path=tmp_path)
    assert proc.returncode == 0
    assert "no CUDA device" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "skipped" in json.loads(out.read_text())


def test_sweep_smoke(tmp_path):
    """`python -m kernels.sweep --smoke` under the interpreter: every config and the predecessor kernel
    (here the same file) are checked against the reference and timed, SDPA timed beside them."""
    out = tmp_path / "sweep.json"
    prev = ROOT / "kernels" / "_triton_attention.py"
    args = ["--smoke", "--shapes", "prefill", "--prev", str(prev), "--out", str(out)]
    proc = _run(*args, tmp_path=tmp_path, module="kernels.sweep", interpret=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    kernels = {(r["kernel"], str(r["config"])) for r in data["results"]}
    assert ("prev", "autotuned") in kernels and ("current", "autotuned") in kernels
    assert all(r["ok"] and r["ms"] > 0 for r in data["results"]), data["results"]
    assert {b["method"] for b in data["baselines"]} == {"sdpa_dense"}


def test_fused_bench_smoke(tmp_path):
    """`python -m kernels.fused_bench --smoke`: every op timed and checked against its reference."""
    out = tmp_path / "fused.json"
    proc = _run("--smoke", "--out", str(out), tmp_path=tmp_path, module="kernels.fused_bench")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert {r["op"] for r in data["results"]} == {"rms_norm", "add_rms_norm", "qk_norm_rope", "silu_mul"}
    for r in data["results"]:
        assert r["fused_ms"] > 0 and r["reference_ms"] > 0 and r["fused_max_err"] == 0.0, r
