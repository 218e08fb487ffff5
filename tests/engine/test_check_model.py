"""`rvr check-model DIR`: a checkpoint written by the real writer passes, and every defect the loader would
refuse fails with one clear `rvr: error:` line per problem, without loading weights. Each broken case is
also checked against `load_engine`, so the command and the loader agree on what a valid checkpoint is."""

from __future__ import annotations

import hashlib
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.cli import main
from engine.errors import CheckpointError
from engine.loading import load_engine


def _run(capsys, *args) -> tuple[int, str, str]:
    rc = main(["check-model", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _error_lines(err: str) -> list[str]:
    lines = err.strip().splitlines()
    assert lines, "a failing check must say why"
    assert all(line.startswith("rvr: error: ") for line in lines), err
    assert "Traceback" not in err
    return lines


def _edit(path, fn) -> None:
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_good_checkpoint_passes_and_prints_every_digest(tiny_ckpt, capsys):
    rc, out, err = _run(capsys, tiny_ckpt)
    assert rc == 0, err
    assert err == ""
    assert f"ok: {tiny_ckpt} loads with weights ema, rvr" in out
    names = [
        "llm_config.json",
        "vit_config.json",
        "config.json",
        "tokenizer.json",
        "ema.safetensors",
        "rvr.safetensors",
        "ae.safetensors",
    ]
    for name in names:
        digest = hashlib.sha256((tiny_ckpt / name).read_bytes()).hexdigest()
        [line] = [line for line in out.splitlines() if line.startswith(name + " ")]
        assert line.endswith(f"sha256 {digest}"), line
    # The tensor summary comes from the header: the writer stored float32, one count per file.
    [ema] = [line for line in out.splitlines() if line.startswith("ema.safetensors")]
    n_tensors = len(load_file(str(tiny_ckpt / "ema.safetensors")))
    assert re.search(rf"{n_tensors} tensors, [\d,]+ params \(F32 x{n_tensors}\)", ema), ema


def test_no_hash_skips_the_digests(tiny_ckpt, capsys):
    rc, out, _ = _run(capsys, tiny_ckpt, "--no-hash")
    assert rc == 0
    assert "sha256" not in out


def test_bf16_release_dtype_passes(tmp_path, capsys):
    from engine.tiny import make_checkpoint

    path = make_checkpoint(tmp_path / "bf16", "tiny", seed=1, dtype=torch.bfloat16)
    rc, out, err = _run(capsys, path, "--no-hash")
    assert rc == 0, err
    [line] = [line for line in out.splitlines() if line.startswith("rvr.safetensors")]
    assert "BF16 x" in line and "F32" not in line


def _drop(name):
    return lambda d: (d / name).unlink()


def _pop_key(file, key):
    return lambda d: _edit(d / file, lambda t: t.pop(key))


def _reshape(file, key):
    def change(t):
        t[key] = torch.zeros(t[key].shape[0], t[key].shape[1] + 1)

    return lambda d: _edit(d / file, change)


def _retype(file, key, dtype):
    return lambda d: _edit(d / file, lambda t: t.__setitem__(key, t[key].to(dtype)))


def _truncate(file):
    def cut(d):
        data = (d / file).read_bytes()
        (d / file).write_bytes(data[: len(data) // 2])  # an interrupted download

    return cut


KEY = "language_model.model.layers.1.mlp_moe_gen.up_proj.weight"

BROKEN = {
    "missing-ae": (_drop("ae.safetensors"), [], r"missing file: .*ae\.safetensors"),
    "missing-llm-config": (_drop("llm_config.json"), [], r"missing file: .*llm_config\.json"),
    "missing-config": (_drop("config.json"), [], r"missing file: .*config\.json"),
    "missing-tokenizer": (
        lambda d: [(d / n).unlink() for n in ("tokenizer.json", "vocab.json")],
        [],
        r"vocab\.json",
    ),
    "missing-rvr-when-asked": (
        _drop("rvr.safetensors"),
        ["--weights", "rvr"],
        r"missing file: .*rvr\.safetensors",
    ),
    "missing-both-weight-files": (
        lambda d: [(d / n).unlink() for n in ("ema.safetensors", "rvr.safetensors")],
        [],
        r"neither ema\.safetensors nor rvr\.safetensors",
    ),
    "missing-key": (
        _pop_key("rvr.safetensors", KEY),
        [],
        rf"rvr\.safetensors: missing keys \(1\): {re.escape(KEY)}",
    ),
    "missing-ae-key": (
        _pop_key("ae.safetensors", "decoder.conv_out.bias"),
        [],
        r"ae\.safetensors: missing keys \(1\): decoder\.conv_out\.bias",
    ),
    "wrong-shape": (
        _reshape("ema.safetensors", "vae2llm.weight"),
        [],
        r"ema\.safetensors: shape mismatch for vae2llm\.weight: file \(\d+, \d+\), model \(\d+, \d+\)",
    ),
    "wrong-dtype": (
        _retype("rvr.safetensors", KEY, torch.int8),
        [],
        rf"rvr\.safetensors: dtype I8 for {re.escape(KEY)}: the model needs a float dtype",
    ),
    "truncated": (_truncate("ema.safetensors"), [], r"cannot read .*ema\.safetensors"),
}


@pytest.mark.parametrize("name", BROKEN)
def test_broken_checkpoint_fails_with_a_clear_line(ckpt_copy, capsys, name):
    damage, flags, pattern = BROKEN[name]
    damage(ckpt_copy)
    rc, out, err = _run(capsys, ckpt_copy, "--no-hash", *flags)
    assert rc == 1
    assert "ok:" not in out
    lines = _error_lines(err)
    assert any(re.search(pattern, line) for line in lines), lines
    weights = flags[1] if flags else "auto"
    with pytest.raises(CheckpointError):  # the loader refuses the same directory
        load_engine(ckpt_copy, device="cpu", weights=weights)


def test_every_problem_is_reported_at_once(ckpt_copy, capsys):
    _pop_key("rvr.safetensors", KEY)(ckpt_copy)
    _retype("ema.safetensors", "llm2vae.bias", torch.int32)(ckpt_copy)
    rc, _, err = _run(capsys, ckpt_copy, "--no-hash")
    assert rc == 1
    lines = _error_lines(err)
    assert any("rvr.safetensors: missing keys" in line for line in lines)
    assert any("ema.safetensors: dtype I32 for llm2vae.bias" in line for line in lines)


def test_only_ema_passes_with_a_note_about_refine(ckpt_copy, capsys):
    (ckpt_copy / "rvr.safetensors").unlink()
    rc, out, err = _run(capsys, ckpt_copy, "--no-hash")
    assert rc == 0, err
    assert "note: no rvr.safetensors: refine requests would run on the BAGEL (ema) weights" in out
    assert "loads with weights ema" in out
    rc, _, err = _run(capsys, ckpt_copy, "--no-hash", "--weights", "both")
    assert rc == 1
    assert any("rvr.safetensors" in line for line in _error_lines(err))


def test_unused_vit_layer_and_stale_latent_size_are_notes(ckpt_copy, capsys):
    import json

    vit = json.loads((ckpt_copy / "vit_config.json").read_text())
    prefix = f"vit_model.vision_model.encoder.layers.{vit['num_hidden_layers'] - 1}."
    first = "vit_model.vision_model.encoder.layers.0."

    def add_layer(t):
        for k in [k for k in t if k.startswith(first)]:
            t[prefix + k[len(first) :]] = t[k].clone()

    _edit(ckpt_copy / "ema.safetensors", add_layer)
    doc = json.loads((ckpt_copy / "config.json").read_text())
    doc["max_latent_size"] = 64
    (ckpt_copy / "config.json").write_text(json.dumps(doc))
    rc, out, err = _run(capsys, ckpt_copy, "--no-hash")
    assert rc == 0, err
    assert "ema.safetensors:" in out and "ViT layers that never run are ignored" in out
    assert "config.json says max_latent_size 64; the stored table says" in out
    load_engine(ckpt_copy, device="cpu")  # and the loader takes it


def test_no_directory(tmp_path, capsys):
    rc, _, err = _run(capsys, tmp_path / "nowhere")
    assert rc == 1
    assert _error_lines(err) == [f"rvr: error: model directory not found: {tmp_path / 'nowhere'}"]
