"""The engine gives the same outputs through the Triton kernel (interpreted, fp32 on CPU) as through the
PyTorch reference path: prefill of all contexts, packed denoising steps and the judge forward."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from engine import make_checkpoint

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from PIL import Image
    import kernels._triton_attention as kt
    from engine import GenerationRequest, SamplingParams, load_engine

    calls = []
    real = kt.mixed_attention_triton
    def counted(*a, **k):
        calls.append(a[0].shape[0])
        return real(*a, **k)
    kt.mixed_attention_triton = counted

    path = sys.argv[1]
    img = Image.fromarray((np.random.RandomState(0).rand(70, 90, 3) * 255).astype("uint8"))
    reqs = [
        GenerationRequest("refine", "two red circles", img, SamplingParams.for_task("refine", steps=3), 1),
        GenerationRequest("edit", "make it blue", img, SamplingParams.for_task("edit", steps=3), 2),
        GenerationRequest("generate", "a blue square", None,
                          SamplingParams.for_task("generate", steps=3, cfg_interval=(0.0, 1.0)), 3, 32, 48),
    ]
    result = {}
    for impl in ("reference", "kernel"):
        eng = load_engine(path, device="cpu", attention=impl)
        before = len(calls)
        states = eng.prepare(reqs)
        while not all(s.done for s in states):
            eng.step(states)
        latents = [s.x.clone() for s in states]
        score = eng.judge([(img, "two red circles")])[0]
        result[impl] = {"latents": [x.tolist() for x in latents], "score": score, "kernel_calls": len(calls) - before}
    print(json.dumps(result))
    """
)


@pytest.mark.interpret
@pytest.mark.slow
def test_engine_kernel_path_matches_reference_path(tmp_path):
    path = make_checkpoint(tmp_path / "m", "tiny", seed=5)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ref, ker = result["reference"], result["kernel"]
    assert ref["kernel_calls"] == 0
    # Every LLM attention went through the kernel: 2 layers x (1 prefill + 2 steps + 1 judge forward).
    assert ker["kernel_calls"] >= 2 * (1 + 2 + 1)
    for a, b in zip(ker["latents"], ref["latents"], strict=True):
        a, b = torch.tensor(a), torch.tensor(b)
        assert float((a - b).norm() / b.norm()) < 1e-4
    assert abs(ker["score"] - ref["score"]) < 1e-4
