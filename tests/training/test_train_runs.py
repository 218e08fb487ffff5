"""Autoencoder training, the staged run (data -> ae -> init -> t2i -> own -> judge -> rvr -> export -> eval) and
mini-GenEval scoring."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import VAEConfig
from engine.loading import load_engine
from training.autoencoder import AETrainConfig, ae_losses, train_autoencoder, world_batch
from training.dataset import read_records
from training.evaluate import MODES, format_summary, markdown_table, summarize
from training.evaluate import main as eval_main
from training.runs import PROFILES, parse_args, run_all, with_edit
from training.trainer import train

SMALL_VAE = VAEConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=4)


def test_autoencoder_steps_lower_reconstruction_and_standardise_latents():
    torch.manual_seed(0)
    ae, hist = train_autoencoder(
        SMALL_VAE,
        AETrainConfig(steps=4, batch_size=2, image_size=32, lr=2e-3, stats_images=8),
        progress=False,
    )
    assert hist[-1] < hist[0]
    x = world_batch(np.random.default_rng(1), 4, 32)
    with torch.no_grad():
        z = ae.encode(x)  # scaled latents
        assert z.shape == (4, 4, 16, 16)
        assert abs(float(z.mean())) < 0.5 and 0.5 < float(z.std()) < 2.0
        assert torch.isfinite(ae_losses(ae, x, torch.Generator().manual_seed(0), 1e-6)[0])


def test_world_cast_tints_autoencoder_renders_and_reaches_every_stage():
    plain = world_batch(np.random.default_rng(1), 6, 32)
    cast = world_batch(np.random.default_rng(1), 6, 32, cast=0.3)
    corners_plain, corners_cast = plain[:, :, 0, 0], cast[:, :, 0, 0]  # (6, 3) background pixels in [-1, 1]
    assert float((corners_plain.max(1).values - corners_plain.min(1).values).max()) < 0.02  # neutral
    assert float((corners_cast.max(1).values - corners_cast.min(1).values).mean()) > 0.1  # tinted
    _, run, _ = parse_args(["--out", "x", "--profile", "bundled", "--world-cast", "0.3"])
    assert run.world_cast == 0.3 and run.ae.cast == 0.3
    assert all(c.image_cast == c.refine_pair_cast == 0.3 for c in run.stages.values())
    # an explicit RvR-stage option wins over the world's
    argv = ["--out", "x", "--profile", "bundled", "--world-cast", "0.3", "--rvr-pair-cast", "0.1"]
    _, both, _ = parse_args(argv)
    assert both.stages["rvr"].refine_pair_cast == 0.1 and both.stages["t2i"].refine_pair_cast == 0.3
    base = PROFILES["bundled"]()
    assert base.world_cast == 0.0 and base.ae.cast == 0.0
    assert all(c.image_cast == c.refine_pair_cast == 0.0 for c in base.stages.values())


@pytest.mark.slow
def test_staged_run_end_to_end_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    und_sizes = {}

    def recording_train(model_dir, data_root, records, out_dir, cfg, **kw):
        und_sizes[Path(out_dir).name] = len(records["und"])
        return train(model_dir, data_root, records, out_dir, cfg, **kw)

    monkeypatch.setattr("training.runs.train", recording_train)
    # nearest pairing with keep pairs covers pairing.py on the run's own records; the judge stage also
    # learns editing, so the evaluation adds refinement via editing
    run = with_edit(replace(PROFILES["smoke"](), rvr_pairing="nearest", rvr_keep=("own", "world")), 1)
    report = run_all(out, run, progress=False)
    stages = {"data", "edit_data", "ae", "init", "t2i", "own", "judge", "rvr", "export", "eval"}
    assert set(report["stages"]) == stages
    assert report["stages"]["edit_data"]["pairs"] == len(read_records(out / "data/edit/edit.jsonl")) > 0
    own = report["stages"]["own"]
    # one process: the judge and RvR stages see the own samples written after the T2I stage
    assert und_sizes["judge"] == und_sizes["rvr"] == und_sizes["t2i"] + own["samples"]
    assert own["samples"] == 2 * len(read_records(out / "data/train_specs.jsonl"))
    assert len(read_records(out / "data/own/und.jsonl")) == own["samples"]
    model = out / "model"
    assert (model / "ema.safetensors").is_file() and (model / "rvr.safetensors").is_file()
    assert report["stages"]["export"]["bytes"] < 25 * 2**20
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["mean_over_categories"]) == {*MODES, "reroll_rvr_weights", "edit"} and ev["n"] >= 1
    assert set(ev["checker_gated_retry"]) == {"t2i_reroll", "rvr1", "edit"}
    assert ev["image_use"]["n"] == ev["n"] and set(ev["image_use"]["accepted"]) == {
        "aligned",
        "misaligned",
        "blank",
        "cast",
        "fresh",
    }
    engine = load_engine(model, device="cpu", dtype="float32")
    assert engine.cfg.vae_transform.max_size == 64  # serves at the world's size
    assert engine.generate("a red circle", seed=0, steps=2).image.size == (64, 64)
    assert (
        0.0
        <= engine.judge([(engine.generate("a red circle", 64, 64, seed=0, steps=2).image, "a red circle")])[0]
        <= 1
    )
    # the exported model carries its held-out prompts: `rvr eval --model DIR` needs no dataset
    md = tmp_path / "results.md"
    md.write_text("# results\n")
    eval_main(
        [
            "--model",
            str(model),
            "--limit",
            "1",
            "--steps",
            "2",
            "--json",
            str(tmp_path / "ev.json"),
            "--markdown",
            str(md),
            "--image-use",
            "--edit",
        ]
    )
    table = md.read_text()
    assert table.startswith("# results\n") and "`rvr eval --model" in table and "| RvR, 1 round |" in table
    assert (out / "eval.md").read_text().startswith("| mode | overall")
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["n"] == 1 and set(ev["pooled"]) == {*MODES, "edit"} and "object" in ev["per_dimension"]
    assert "| editing, instructed by the checker's verdict" in table
    assert ev["image_use"]["n"] == 1
    # a second invocation finds every stage done and changes nothing
    before = (out / "rvr" / "rvr.safetensors").stat().st_mtime_ns
    run_all(out, PROFILES["smoke"](), stages=("data", "ae", "init", "t2i", "judge", "rvr"), progress=False)
    assert (out / "rvr" / "rvr.safetensors").stat().st_mtime_ns == before


def test_summary_is_mean_over_categories():
    rows = [
        {"category": "colors", "judge_p_yes": 0.9, "rounds_until": 0, "ok_t2i": True, "ok_rvr1": True},
        {"category": "colors", "judge_p_yes": 0.2, "rounds_until": 1, "ok_t2i": False, "ok_rvr1": True},
        {"category": "counting", "judge_p_yes": 0.1, "rounds_until": 3, "ok_t2i": False, "ok_rvr1": False},
    ]
    s = summarize(rows, ("t2i", "rvr1"))
    assert s["per_category"]["colors"] == {"t2i": 0.5, "rvr1": 1.0}
    assert s["mean_over_categories"] == {"t2i": 0.25, "rvr1": 0.5}
    assert s["judge_agreement_with_checker"] == 1.0
    assert s["mean_rounds_until"] == pytest.approx(4 / 3)
    assert s["pooled"] == {"t2i": pytest.approx(1 / 3), "rvr1": pytest.approx(2 / 3)}
    assert s["vs_t2i"] == {"rvr1": {"fixed": 1, "broke": 0}}
    assert s["checker_gated_retry"] == {"rvr1": pytest.approx(2 / 3)}  # no re-roll rows, no re-roll entry
    rows[2]["ok_t2i_reroll"], rows[0]["ok_t2i_reroll"], rows[1]["ok_t2i_reroll"] = True, False, False
    both = summarize(rows, ("t2i", "t2i_reroll", "rvr1"))
    gated = both["checker_gated_retry"]
    assert gated == {"t2i_reroll": pytest.approx(2 / 3), "rvr1": pytest.approx(2 / 3)}
    assert "re-rolling them scores 0.667 and one RvR round 0.667." in markdown_table(both)
    assert "gated by the checker: t2i_reroll 0.667, rvr1 0.667" in format_summary(
        s | {"checker_gated_retry": gated}
    )


def test_demo_simple_profile_is_a_one_group_world_with_honest_heldout():
    run = PROFILES["demo-simple"]()
    assert run.max_groups == 1 and "position" in run.exclude_dims and run.heldout_fraction > 0
    assert run.stages["judge"].ce_weight == 1.0 and len(run.eval_seeds) > 1


def test_refine_figure_grid_draws_prompt_and_both_images():
    from PIL import Image

    from training.figure import draw_grid

    im = Image.new("RGB", (8, 8), "red")
    fig = draw_grid([("a red circle", im, im), ("two squares", im, im)], scale=2)
    assert fig.width > 2 * 16 and fig.height > 2 * 16
    captioned = draw_grid(
        [("a red circle", im, im), ("two squares", im, im)], scale=2, caption="fixed 1 of 2"
    )
    assert captioned.width == fig.width and captioned.height > fig.height


def test_figure_caption_states_fixed_broke_and_the_cast_probe(tmp_path):
    from training.figure import paired_caption

    rows = [{"ok_t2i": False}, {"ok_t2i": True}, {"ok_t2i": True}]
    ev = {"n": 3, "vs_t2i": {"rvr1": {"fixed": 1, "broke": 0}}, "rows": rows}
    (tmp_path / "eval.json").write_text(json.dumps(ev))
    assert paired_caption(tmp_path).endswith("fixed 1 of 1 rejected T2I images, broke 0 of 2 accepted")
    ev["image_use"] = {"cast": {"rvr_from_cast": 8.04, "fresh": 31.2}}
    (tmp_path / "eval.json").write_text(json.dumps(ev))
    assert "RvR 8.0, fresh T2I 31.2" in paired_caption(tmp_path)


def test_bundled_cast_profile_is_the_recipe_of_the_bundled_model():
    """`bundled-cast` (the bundled model, g1 in bench/RESULTS.md): the `bundled` world under casts, a 3,000-step autoencoder, a
    9,000-step T2I stage and an RvR stage of 3,000 steps at lr 1e-3 with refine and T2I samples 3:1;
    everything else as `bundled`."""
    run, base = PROFILES["bundled-cast"](), PROFILES["bundled"]()
    assert run.world_cast == run.ae.cast == 0.25 and run.ae.steps == 3000
    rvr = run.stages["rvr"]
    assert (rvr.lr, rvr.mixture, rvr.steps, rvr.refine_pair_cast) == (
        1e-3,
        {"rvr": 3.0, "t2i": 1.0},
        3000,
        0.25,
    )
    t2i = run.stages["t2i"]
    assert t2i.steps == 9000
    assert replace(t2i, image_cast=0.0, refine_pair_cast=0.0, steps=6000) == base.stages["t2i"]
    assert (run.n_prompts, run.categories, run.eval_seeds) == (
        base.n_prompts,
        base.categories,
        base.eval_seeds,
    )


def test_bundled_cast_edit_profile_adds_edit_pairs_to_the_judge_stage_only():
    run, base = PROFILES["bundled-cast-edit"](), PROFILES["bundled-cast"]()
    assert run.edit_per_prompt == 16 and base.edit_per_prompt == 0
    assert run.stages["judge"].mixture == {**base.stages["judge"].mixture, "edit": 1.0}
    judge = replace(run.stages["judge"], mixture=base.stages["judge"].mixture)
    assert replace(run, edit_per_prompt=0, stages={**run.stages, "judge": judge}) == base
