"""bench/refine_sampling.py runs end to end on a tiny checkpoint and a tiny world, and its counts add up."""

import json

import pytest

from bench.refine_sampling import SETTINGS, main
from engine.tiny import make_checkpoint
from training.dataset import build_world_dataset


def test_refine_sampling_reports_every_setting(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", "tiny", seed=0)
    build_world_dataset(tmp_path / "world", n_prompts=4, seed=0, heldout_fraction=0.0)
    out = tmp_path / "sweep.json"
    args = ["--model", str(ckpt), "--data", str(tmp_path / "world"), "--limit", "2", "--seeds", "1"]
    main([*args, "--steps", "2", "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["n"] == 2 and set(r["settings"]) == {"t2i", "t2i_reroll", *SETTINGS}
    t2i = r["settings"]["t2i"]["accuracy"]
    for s in r["settings"].values():
        # fixed and broke are counted against the same T2I verdicts the gated retry starts from
        assert s["accuracy"] == pytest.approx(t2i + (s["fixed"] - s["broke"]) / r["n"])
        assert s["gated_retry"] == pytest.approx(t2i + s["fixed"] / r["n"])
