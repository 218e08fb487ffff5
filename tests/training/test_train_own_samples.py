"""The model's own T2I samples as judge samples and refine pairs, labelled by the checker."""

from dataclasses import replace

import numpy as np
import pytest

from engine.types import RoundOutput
from training.checker import check
from training.dataset import build_t2i_records, open_rgb, parse_image_list, prompt_rng, read_records
from training.own_samples import own_t2i_records, write_own_dataset
from training.prompts import PromptSpec, sample_scene, sample_spec
from training.world import render


class RenderingT2I:
    """A T2I model that renders the prompt faithfully on odd seeds and breaks its colour on even ones,
    so both branches (aligned sample, misaligned sample) are exercised with known answers."""

    def __init__(self, specs):
        self.specs = {s.text: s for s in specs}
        self.calls = []

    def run_batch(self, requests, batch_size):
        self.calls.append(len(requests))
        out = []
        for r in requests:
            rng = np.random.default_rng(r.seed)
            violate = () if r.seed % 2 else ("color",)
            img = render(sample_scene(self.specs[r.prompt], rng, violate), r.width, rng, 1.0)
            out.append([RoundOutput(r.request_id, img, 1, r.seed, None, True, None, {})])
        return out


def _specs():
    rng = np.random.default_rng(0)
    return [sample_spec(rng, category="colors") for _ in range(3)]


@pytest.mark.parametrize("caption_noise", [0.0, 0.5])
def test_own_samples_label_judge_and_pair_misaligned_with_a_render(tmp_path, caption_noise):
    specs = _specs()
    # mis-captioned pretraining images are never taken as the aligned image (checked below)
    t2i = build_t2i_records(specs, tmp_path, seed=0, per_prompt=4, caption_noise=caption_noise)
    model = RenderingT2I(specs)
    refine, judge, stats = own_t2i_records(model, specs, t2i, tmp_path, seed=0, per_prompt=4)
    assert model.calls == [12] and stats["samples"] == len(judge) == 12
    by_text = {s.text: s for s in specs}
    for rec in judge:
        spec = PromptSpec.from_json(next(s.to_json() for s in specs if s.text in rec["question"]))
        assert rec["answer"] == ("Yes" if check(open_rgb(tmp_path / rec["image"]), spec)["overall"] else "No")
    assert 0 < stats["aligned"] < 12 and stats["pairs"] + stats["no_render"] == 12 - stats["aligned"]
    assert stats["pairs"] == len(refine) > 0
    renders = {parse_image_list(r["image_list"])[0] for r in t2i}
    for rec in refine:
        spec = by_text[rec["user_prompt"][0]]
        mis, ali = parse_image_list(rec["image_list"])
        assert rec["sources"] == ["own_t2i", "render"] and ali in renders
        assert not check(open_rgb(tmp_path / mis), spec)["overall"]
        assert check(open_rgb(tmp_path / ali), spec)["overall"]
    write_own_dataset(tmp_path, refine, judge)
    assert read_records(tmp_path / "own/rvr.parquet") == refine
    assert read_records(tmp_path / "own/und.jsonl") == judge


def test_own_sample_seeds_are_per_prompt(tmp_path):
    specs = _specs()
    t2i = build_t2i_records(specs, tmp_path, seed=0)
    _, all_judge, _ = own_t2i_records(RenderingT2I(specs), specs, t2i, tmp_path / "a", per_prompt=2)
    _, one_judge, _ = own_t2i_records(RenderingT2I(specs), specs[1:2], t2i, tmp_path / "b", per_prompt=2)
    # the second prompt's samples are the same whether or not the other prompts are sampled
    for a, b in zip(all_judge[2:4], one_judge, strict=True):
        assert (
            np.asarray(open_rgb(tmp_path / "a" / a["image"]))
            == np.asarray(open_rgb(tmp_path / "b" / b["image"]))
        ).all()


@pytest.mark.slow
def test_own_samples_from_the_real_engine_are_its_generations(tiny_engine, tmp_path):
    specs = _specs()[:1]
    t2i = build_t2i_records(specs, tmp_path, seed=0)
    _, judge, _ = own_t2i_records(tiny_engine, specs, t2i, tmp_path, per_prompt=2, params={"steps": 2})
    seed = int(prompt_rng(2, specs[0].text).integers(2**31))
    alone = tiny_engine.generate(specs[0].text, 64, 64, seed=seed, steps=2).image
    assert (np.asarray(open_rgb(tmp_path / judge[0]["image"])) == np.asarray(alone)).all()


def test_white_balanced_own_samples_are_stored_neutral(tmp_path):
    """A model trained under colour casts samples tinted images; with white_balance_samples they are stored
    with a neutral background (so a refine pair can get one shared cast) and labelled as before."""
    from training.checker import background
    from training.world import color_cast

    specs = _specs()

    class TintedT2I(RenderingT2I):
        def run_batch(self, requests, batch_size):
            out = super().run_batch(requests, batch_size)
            for rounds in out:
                rounds[-1] = replace(
                    rounds[-1], image=color_cast(rounds[-1].image, np.array([0.8, 1.0, 0.9]))
                )
            return out

    t2i = build_t2i_records(specs, tmp_path, seed=0, per_prompt=4)
    plain = own_t2i_records(RenderingT2I(specs), specs, t2i, tmp_path / "a", seed=0, per_prompt=4)
    balanced = own_t2i_records(
        TintedT2I(specs), specs, t2i, tmp_path / "b", seed=0, per_prompt=4, white_balance_samples=True
    )
    assert [r["answer"] for r in plain[1]] == [r["answer"] for r in balanced[1]]
    for rec in balanced[1]:
        bg = background(np.asarray(open_rgb(tmp_path / "b" / rec["image"]), dtype=np.float64))
        assert bg.max() - bg.min() <= 2, bg
