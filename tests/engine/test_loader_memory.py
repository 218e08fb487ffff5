"""Loading copies each tensor once from the memory-mapped file into the model: anonymous memory peaks at
about the model size, never at twice it (a 29 GB checkpoint must load on a 64 GB host)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from pathlib import Path
    import engine.checkpoint as ck
    from engine.config import BagelConfig, LLMConfig, ViTConfig, VAEConfig

    def rss_anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no RssAnon")

    path = Path(sys.argv[1])
    cfg = ck.read_config(path)
    peak = [0]
    real = ck._assign
    def tracking(model, key, value):
        real(model, key, value)
        peak[0] = max(peak[0], rss_anon())
    ck._assign = tracking
    base = rss_anon()
    model = ck.load_bagel(path / "ema.safetensors", cfg, torch.device("cpu"), torch.float32)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"base": base, "peak": peak[0], "model_bytes": model_bytes, "largest": largest}))
    """
)


@pytest.mark.slow
def test_load_peak_memory_is_about_one_model(tmp_path):
    from dataclasses import replace

    import torch

    from engine.checkpoint import save_checkpoint
    from engine.model.bagel import Bagel
    from engine.model.vae import AutoEncoder
    from engine.tiny import preset
    from engine.tokenizer import write_tiny_tokenizer

    # ~90 MB of float32 weights: big enough that a second copy would dwarf allocator noise.
    base = preset("tiny", vocab_size=4096)
    cfg = replace(base, llm=replace(base.llm, hidden_size=512, intermediate_size=1536, num_hidden_layers=4))
    model, vae = Bagel(cfg), AutoEncoder(cfg.vae)
    save_checkpoint(tmp_path, cfg, {"ema": model.state_dict()}, vae.state_dict(), dtype=torch.float32)
    write_tiny_tokenizer(tmp_path)
    del model
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["model_bytes"] > 80e6
    growth = r["peak"] - r["base"]
    # One model plus one in-flight tensor plus slack; a full second host copy would be >= 2x model_bytes.
    assert growth < r["model_bytes"] + 2 * r["largest"] + 32e6, r
