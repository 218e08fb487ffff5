"""The bundled demo model (engine/assets/demo, trained by `rvr train --profile bundled-cast`): it is the default
checkpoint, ships within the size budget with its held-out prompts, serves at its training size, and
`rvr eval` on it scores above the prompt-blind chance level on what it learned."""

import json

import numpy as np
import pytest

from engine.loading import BUNDLED_MODEL, default_model_dir, load_engine
from training.evaluate import main as eval_main
from training.prompts import Group, PromptSpec, sample_scene
from training.world import render


def test_bundled_model_is_the_default_checkpoint():
    assert default_model_dir() == BUNDLED_MODEL
    files = {
        p.relative_to(BUNDLED_MODEL).as_posix(): p.stat().st_size
        for p in BUNDLED_MODEL.rglob("*")
        if p.is_file()
    }
    needed = {"config.json", "ema.safetensors", "rvr.safetensors", "ae.safetensors", "tokenizer.json"}
    assert needed | {"eval/heldout.jsonl"} <= set(files)
    assert sum(files.values()) <= 25 * 2**20
    engine = load_engine(None, device="cpu", dtype="float32")
    assert engine.info()["model_dir"] == str(BUNDLED_MODEL) and engine.info()["weights"] == ["ema", "rvr"]
    spec = PromptSpec((Group("circle", color="red"),), None, "colors")
    rng = np.random.default_rng(0)
    big = render(sample_scene(spec, rng), 256, rng, 1.0)
    out = engine.refine(big, "a blue circle", steps=10, seed=0)
    assert out.image.size == (64, 64)  # any input comes out at the size the model was trained at
    assert engine.generate("a blue circle", steps=10, seed=0).image.size == (64, 64)


@pytest.mark.slow
def test_rvr_eval_on_the_bundled_model_beats_chance(tmp_path, capsys):
    out = tmp_path / "eval.json"
    eval_main(["--limit", "15", "--seeds", "2", "--steps", "20", "--json", str(out)])
    assert "pooled" in capsys.readouterr().out
    ev = json.loads(out.read_text())
    blind = ev["prompt_blind"]
    assert ev["n"] == 30
    assert ev["pooled"]["t2i"] >= blind["pooled"] + 0.25
    for dim in ("color", "size"):
        assert ev["per_dimension"][dim]["t2i"] >= blind["per_dimension"][dim] + 0.2, dim
