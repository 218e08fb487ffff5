"""The image-use probe tells a refiner that reads its input from one that regenerates from the prompt."""

import numpy as np

from engine.loading import load_engine
from engine.types import RoundOutput
from training.checker import check
from training.image_use import format_image_use, image_use, probe_inputs
from training.prompts import sample_scene, sample_spec
from training.world import render


def _specs(n=4):
    rng = np.random.default_rng(3)
    return [sample_spec(rng, category="single_object") for _ in range(n)]


class _World:
    """Refines by returning its input (`copy`) or by rendering the prompt afresh (ignores the input)."""

    def __init__(self, specs, copy: bool):
        self.specs, self.copy = {s.text: s for s in specs}, copy

    def run_batch(self, requests, batch_size):
        out = []
        for r in requests:
            if r.task == "refine" and self.copy:
                img = r.image
            else:
                rng = np.random.default_rng([r.seed, 99])
                img = render(sample_scene(self.specs[r.prompt], rng), r.width, rng, 1.0)
            out.append([RoundOutput(r.request_id, img, 1, r.seed, None, True, None, {})])
        return out


def test_probe_inputs_have_known_answers():
    for spec in _specs():
        inputs, broken = probe_inputs(spec, 5, 64)
        assert check(inputs["aligned"], spec)["overall"]
        assert not check(inputs["misaligned"], spec)[broken]
        assert not check(inputs["blank"], spec)["overall"]
        # the cast keeps the scene (the checker still accepts it) and tints the background
        assert check(inputs["cast"], spec)["overall"]
        assert np.asarray(inputs["cast"])[0, 0].tolist() != np.asarray(inputs["aligned"])[0, 0].tolist()


def test_a_copying_refiner_and_a_regenerating_one_are_told_apart():
    specs = _specs()
    copying = image_use(_World(specs, copy=True), specs, seeds=(0, 1))
    regen = image_use(_World(specs, copy=False), specs, seeds=(0, 1))
    assert copying["n"] == regen["n"] == 8
    assert copying["accepted"]["aligned"] == 1.0 and copying["accepted"]["blank"] == 0.0
    assert copying["kept_error"]["rvr_from_misaligned"] == 1.0
    assert copying["layout"]["rvr_from_aligned"] == 0.0 < copying["layout"]["fresh"]
    assert copying["cast"]["rvr_from_cast"] == 0.0 < copying["cast"]["fresh"]
    # regeneration gives every input the same output: the fresh sample's
    assert regen["accepted"] == {"aligned": 1.0, "misaligned": 1.0, "blank": 1.0, "cast": 1.0, "fresh": 1.0}
    assert regen["kept_error"]["rvr_from_misaligned"] == regen["kept_error"]["fresh"] == 0.0
    assert regen["layout"]["rvr_from_aligned"] == regen["layout"]["fresh"] > 0
    assert regen["cast"]["rvr_from_cast"] == regen["cast"]["fresh"] > 0
    assert "layout distance" in format_image_use(regen) and "cast input" in format_image_use(regen)


def test_image_use_runs_on_the_bundled_model():
    engine = load_engine(None, device="cpu", dtype="float32")
    r = image_use(engine, _specs(2), seeds=(0,), refine_params={"steps": 3}, generate_params={"steps": 3})
    assert r["n"] == 2 and set(r["accepted"]) == {"aligned", "misaligned", "blank", "cast", "fresh"}
    assert all(0.0 <= v <= 1.0 for v in r["accepted"].values())
    assert r["layout"]["fresh"] > 0
