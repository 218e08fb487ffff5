"""The engine CLI (`python -m engine.cli`): commands write images; bad input is one `rvr: error:` line.

Most cases call `engine.cli.main(argv)` in-process (what `python -m engine.cli` runs, minus `sys.exit`), so an
uncaught exception fails the test exactly as a traceback would; a few run the real module in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.cli import main
from engine.loading import load_engine
from tests.engine.conftest import max_pixel_diff, random_image, vae_rule

REPO = Path(__file__).resolve().parents[2]


def _subprocess(*args, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _load(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("rvr: error:"), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def cli_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "model"
    assert main(["make-checkpoint", str(path), "--preset", "tiny", "--seed", "4", "--dtype", "bfloat16"]) == 0
    return path


@pytest.fixture(scope="module")
def cli_engine(cli_ckpt):
    return load_engine(cli_ckpt, device="cpu")


@pytest.fixture(scope="module")
def input_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli-in") / "in.png"
    random_image(90, 60, 3).save(path)
    return path


def test_make_checkpoint_layout(cli_ckpt, capsys):
    names = {p.name for p in cli_ckpt.iterdir()}
    assert {"config.json", "llm_config.json", "vit_config.json", "ae.safetensors"} <= names
    assert {"ema.safetensors", "rvr.safetensors"} <= names
    assert "tokenizer.json" in names or {"vocab.json", "merges.txt"} <= names
    out = cli_ckpt.parent / "only-rvr"
    assert main(["make-checkpoint", str(out), "--weights", "rvr"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert (out / "rvr.safetensors").is_file() and not (out / "ema.safetensors").exists()


def test_refine_subprocess_matches_engine(cli_ckpt, cli_engine, input_png, tmp_path):
    out = tmp_path / "refined.png"
    r = _subprocess(
        "refine", "--model", cli_ckpt, "--image", input_png, "--prompt", "a blue car",
        "-o", out, "--steps", "3", "--seed", "17", "--device", "cpu",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    img = _load(out)
    t = cli_engine.cfg.vae_transform
    assert img.size == vae_rule(90, 60, t.max_size, t.min_size, t.stride, t.max_pixels)
    assert (
        r.stdout.split()[0] == str(out) and "seed=17" in r.stdout and f"{img.width}x{img.height}" in r.stdout
    )
    ref = cli_engine.refine(_load(input_png), "a blue car", seed=17, steps=3).image
    assert max_pixel_diff(img, ref) == 0


def test_generate_edit_judge(cli_ckpt, cli_engine, input_png, tmp_path, capsys):
    common = ["--model", str(cli_ckpt), "--steps", "3", "--seed", "5", "--no-progress"]
    gen = tmp_path / "g.png"
    assert (
        main(
            ["generate", "--prompt", "a red kite", "-o", str(gen), "--height", "32", "--width", "48", *common]
        )
        == 0
    )
    assert _load(gen).size == (48, 32)
    ref = cli_engine.generate("a red kite", 32, 48, seed=5, steps=3).image
    assert max_pixel_diff(_load(gen), ref) == 0

    ed = tmp_path / "e.png"
    assert main(["edit", "--image", str(input_png), "--prompt", "make it night", "-o", str(ed), *common]) == 0
    ref = cli_engine.edit(_load(input_png), "make it night", seed=5, steps=3).image
    assert max_pixel_diff(_load(ed), ref) == 0

    capsys.readouterr()
    assert main(["judge", "--image", str(input_png), "--prompt", "a blue car", "--model", str(cli_ckpt)]) == 0
    score = float(capsys.readouterr().out.strip())
    assert score == pytest.approx(cli_engine.judge([(_load(input_png), "a blue car")])[0], abs=2e-6)

    rf = tmp_path / "r.png"
    args = ["refine", "--image", str(input_png), "--prompt", "a car", "-o", str(rf), "--rounds", "2", *common]
    assert main(args) == 0
    assert "rounds=2" in capsys.readouterr().out


def test_progress_bar_goes_to_stderr(cli_ckpt, tmp_path, capsys):
    out = tmp_path / "p.png"
    args = ["generate", "--model", str(cli_ckpt), "--prompt", "a cat", "-o", str(out), "--steps", "3"]
    assert main([*args, "--height", "16", "--width", "16", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"{out} 16x16 seed=1"
    assert "Traceback" not in captured.err


def _bad_inputs(ckpt: Path, png: Path, tmp: Path) -> dict[str, list[str]]:
    """argv per case; `_make_inputs(tmp)` creates the files these refer to."""
    junk, empty_dir, blocker = tmp / "junk.png", tmp / "empty-model", tmp / "a-file"
    m = ["--model", str(ckpt), "--no-progress", "--steps", "3"]
    o = ["-o", str(tmp / "out.png")]
    return {
        "unreadable image": ["refine", "--image", str(junk), "--prompt", "a cat", *o, *m],
        "missing image": ["edit", "--image", str(tmp / "nope.png"), "--prompt", "a cat", *o, *m],
        "judge unreadable image": ["judge", "--image", str(junk), "--prompt", "a cat", "--model", str(ckpt)],
        "missing model dir": ["generate", "--prompt", "a cat", *o, "--model", str(tmp / "nowhere")],
        "model dir without files": ["generate", "--prompt", "a cat", *o, "--model", str(empty_dir)],
        "height not multiple of 16": ["generate", "--prompt", "a cat", *o, *m, "--height", "100"],
        "height too large": ["generate", "--prompt", "a cat", *o, *m, "--height", "4096", "--width", "16"],
        "refine size not multiple": ["refine", "--image", str(png), "--prompt", "a", *o, *m, "--width", "33"],
        "steps 1": ["generate", "--prompt", "a cat", *o, *m, "--steps", "1"],
        "empty prompt": ["refine", "--image", str(png), "--prompt", "", *o, *m],
        "rounds 0": ["refine", "--image", str(png), "--prompt", "a", *o, *m, "--rounds", "0"],
        "until score 2": ["refine", "--image", str(png), "--prompt", "a", *o, *m, "--until-score", "2"],
        "bad dtype": ["generate", "--prompt", "a cat", *o, *m, "--dtype", "float7"],
        "bad device": ["generate", "--prompt", "a cat", *o, *m, "--device", "nonsense"],
        "output under a file": [
            "generate",
            "--prompt",
            "a",
            "-o",
            str(blocker / "x.png"),
            *m,
            "--height",
            "16",
        ],
        "output directory missing": ["generate", "--prompt", "a", "-o", str(tmp / "missing" / "x.png"), *m],
        "output extension": ["generate", "--prompt", "a", "-o", str(tmp / "x.nope"), *m, "--height", "16"],
        "make-checkpoint weights": ["make-checkpoint", str(tmp / "ck"), "--weights", "emma"],
    }


def _make_inputs(tmp: Path) -> None:
    (tmp / "junk.png").write_text("this is not an image")
    (tmp / "empty-model").mkdir()
    (tmp / "a-file").write_text("x")


@pytest.mark.parametrize("name", sorted(_bad_inputs(Path("m"), Path("i.png"), Path("t"))))
def test_bad_input_is_one_error_line(name, cli_ckpt, input_png, tmp_path, capsys):
    _make_inputs(tmp_path)
    argv = _bad_inputs(cli_ckpt, input_png, tmp_path)[name]
    code = main(argv)
    captured = capsys.readouterr()
    assert code != 0
    _one_error_line(captured.err)
    assert captured.out == ""


def test_bad_input_subprocess(cli_ckpt, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(np.random.default_rng(0).bytes(64))
    r = _subprocess(
        "refine", "--image", junk, "--prompt", "a cat", "-o", tmp_path / "o.png", "--model", cli_ckpt
    )
    assert r.returncode == 1
    assert "junk.png" in _one_error_line(r.stderr)
    assert r.stdout == ""
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("command", ["eval", "train"])
def test_passthrough_commands(command, capsys):
    from server.cli import main as rvr_main

    assert rvr_main([command, "--help"]) == 0
    assert f"usage: rvr {command}" in capsys.readouterr().out
    assert rvr_main([command, "--no-such-flag"]) == 2
