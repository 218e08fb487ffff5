"""Loader: round trips, key/shape validation, missing files, dtype conversion, tokenizer fallbacks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.errors import CheckpointError
from engine.loading import load_engine
from engine.tiny import make_checkpoint
from tests.engine.conftest import SYSTEM_PROMPT, max_pixel_diff, random_image, vae_rule


def _stored(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _assert_state_equals_file(module, path, allow_extra=()):
    stored = _stored(path)
    state = module.state_dict()
    assert set(state) == set(stored) - set(allow_extra)
    for key, value in state.items():
        ref = stored[key]
        assert value.dtype == torch.float32, key
        assert value.shape == ref.shape, key
        assert torch.equal(value, ref.float()), key


def test_round_trip_both_weight_sets(tiny_engine, tiny_ckpt):
    assert sorted(tiny_engine.weight_sets) == ["ema", "rvr"]
    for name in ("ema", "rvr"):
        _assert_state_equals_file(tiny_engine.weight_sets[name].model, tiny_ckpt / f"{name}.safetensors")
    _assert_state_equals_file(tiny_engine.vae, tiny_ckpt / "ae.safetensors")
    # The two files hold different random weights, so the routing below is observable.
    ema, rvr = _stored(tiny_ckpt / "ema.safetensors"), _stored(tiny_ckpt / "rvr.safetensors")
    assert not torch.equal(ema["llm2vae.weight"], rvr["llm2vae.weight"])
    assert tiny_engine.weights_for("refine").name == "rvr"
    for task in ("generate", "edit", "judge"):
        assert tiny_engine.weights_for(task).name == "ema"


@pytest.mark.parametrize("mode", ["rvr", "ema"])
def test_single_weight_set(tiny_ckpt, mode):
    eng = load_engine(tiny_ckpt, device="cpu", weights=mode)
    assert list(eng.weight_sets) == [mode]
    _assert_state_equals_file(eng.weight_sets[mode].model, tiny_ckpt / f"{mode}.safetensors")
    for task in ("refine", "generate", "edit", "judge"):
        assert eng.weights_for(task).name == mode


def test_both_mode_and_bad_mode(tiny_ckpt):
    eng = load_engine(tiny_ckpt, device="cpu", weights="both")
    assert sorted(eng.weight_sets) == ["ema", "rvr"]
    with pytest.raises(CheckpointError, match="weights"):
        load_engine(tiny_ckpt, device="cpu", weights="all")


def test_requested_weight_file_missing(ckpt_copy):
    (ckpt_copy / "rvr.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"rvr\.safetensors"):
        load_engine(ckpt_copy, device="cpu", weights="rvr")
    eng = load_engine(ckpt_copy, device="cpu")  # auto: whatever is there, used for every task
    assert list(eng.weight_sets) == ["ema"]
    assert eng.weights_for("refine").name == "ema"


def _edit_weights(path, fn):
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_key_is_named(ckpt_copy):
    key = "language_model.model.layers.1.mlp_moe_gen.up_proj.weight"
    _edit_weights(ckpt_copy / "rvr.safetensors", lambda t: t.pop(key))
    with pytest.raises(CheckpointError) as exc:
        load_engine(ckpt_copy, device="cpu")
    assert key in str(exc.value)
    assert "missing" in str(exc.value)
    assert "rvr.safetensors" in str(exc.value)


def test_missing_autoencoder_key_is_named(ckpt_copy):
    key = "decoder.conv_out.bias"
    _edit_weights(ckpt_copy / "ae.safetensors", lambda t: t.pop(key))
    with pytest.raises(CheckpointError) as exc:
        load_engine(ckpt_copy, device="cpu")
    assert key in str(exc.value)
    assert "ae.safetensors" in str(exc.value)


def test_unexpected_key_is_named(ckpt_copy):
    key = "language_model.model.layers.0.self_attn.extra_proj.weight"
    _edit_weights(ckpt_copy / "ema.safetensors", lambda t: t.__setitem__(key, torch.zeros(3)))
    with pytest.raises(CheckpointError) as exc:
        load_engine(ckpt_copy, device="cpu")
    assert key in str(exc.value)
    assert "unexpected" in str(exc.value)


def test_shape_mismatch_is_named(ckpt_copy):
    key = "vae2llm.weight"

    def change(t):
        t[key] = torch.zeros(t[key].shape[0], t[key].shape[1] + 1)

    _edit_weights(ckpt_copy / "rvr.safetensors", change)
    with pytest.raises(CheckpointError) as exc:
        load_engine(ckpt_copy, device="cpu")
    assert key in str(exc.value)
    assert "shape" in str(exc.value)


def test_unused_vit_layer_is_tolerated_but_other_vit_keys_are_not(ckpt_copy):
    vit_cfg = json.loads((ckpt_copy / "vit_config.json").read_text())
    layers_run = vit_cfg["num_hidden_layers"] - 1
    prefix = f"vit_model.vision_model.encoder.layers.{layers_run}."
    first = "vit_model.vision_model.encoder.layers.0."
    path = ckpt_copy / "ema.safetensors"

    def add_layer(t):
        for k in [k for k in t if k.startswith(first)]:
            t[prefix + k[len(first) :]] = t[k].clone() + 1

    _edit_weights(path, add_layer)
    eng = load_engine(ckpt_copy, device="cpu")
    extra = [k for k in _stored(path) if k.startswith(prefix)]
    assert extra
    _assert_state_equals_file(eng.weight_sets["ema"].model, path, allow_extra=extra)

    # An extra key inside a layer that *is* run is still an error.
    bad = "vit_model.vision_model.encoder.layers.0.self_attn.extra.weight"
    _edit_weights(path, lambda t: t.__setitem__(bad, torch.zeros(2)))
    with pytest.raises(CheckpointError, match=bad.replace(".", r"\.")):
        load_engine(ckpt_copy, device="cpu")


def test_max_latent_size_comes_from_stored_table(ckpt_copy, tiny_ckpt):
    with safe_open(str(tiny_ckpt / "ema.safetensors"), framework="pt") as f:
        rows = f.get_slice("latent_pos_embed.pos_embed").get_shape()[0]
    side = math.isqrt(rows)
    assert side * side == rows
    cfg_path = ckpt_copy / "config.json"
    doc = json.loads(cfg_path.read_text())
    doc["max_latent_size"] = 64  # stale value, as some published configs carry
    cfg_path.write_text(json.dumps(doc))
    eng = load_engine(ckpt_copy, device="cpu")
    assert eng.cfg.max_latent_size == side
    assert eng.info()["max_image_side"] == side * eng.cfg.latent_downsample
    assert eng.weight_sets["ema"].model.latent_pos_embed.pos_embed.shape[0] == rows


@pytest.mark.parametrize(
    "delete",
    [
        ("config.json",),
        ("llm_config.json",),
        ("vit_config.json",),
        ("ae.safetensors",),
        ("tokenizer.json", "vocab.json"),
        ("tokenizer.json", "merges.txt"),
        ("tokenizer.json", "tokenizer_config.json"),  # the added special tokens live there
    ],
    ids="-".join,
)
def test_missing_file_is_named(ckpt_copy, delete):
    for name in delete:
        (ckpt_copy / name).unlink()
    with pytest.raises(CheckpointError) as exc:
        load_engine(ckpt_copy, device="cpu")
    assert delete[-1] in str(exc.value)


def test_no_weight_files_and_no_directory(ckpt_copy, tmp_path):
    for name in ("ema.safetensors", "rvr.safetensors"):
        (ckpt_copy / name).unlink()
    with pytest.raises(CheckpointError, match=r"ema\.safetensors"):
        load_engine(ckpt_copy, device="cpu")
    with pytest.raises(CheckpointError, match="not found"):
        load_engine(tmp_path / "nowhere", device="cpu")


def test_corrupt_weight_file(ckpt_copy):
    (ckpt_copy / "rvr.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"rvr\.safetensors"):
        load_engine(ckpt_copy, device="cpu")


def test_bf16_checkpoint_loads_into_fp32(tmp_path):
    path = make_checkpoint(tmp_path / "bf16", "tiny", seed=3, weights=("rvr",), dtype=torch.bfloat16)
    stored = _stored(path / "rvr.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in stored.values())
    eng = load_engine(path, device="cpu", dtype="float32")
    assert eng.dtype == torch.float32
    _assert_state_equals_file(eng.weight_sets["rvr"].model, path / "rvr.safetensors")
    out = eng.refine(random_image(40, 40, 1), "a cat", seed=0, steps=3)
    t = eng.cfg.vae_transform
    assert out.image.size == vae_rule(40, 40, t.max_size, t.min_size, t.stride, t.max_pixels)


def test_tokenizer_from_vocab_and_merges_only(tiny_engine, ckpt_copy):
    (ckpt_copy / "tokenizer.json").unlink()
    eng = load_engine(ckpt_copy, device="cpu")
    for text in (SYSTEM_PROMPT, "Here is the user's prompt: two red apples on a table. ", "yes no Yes"):
        assert eng.tokenizer.encode(text) == tiny_engine.tokenizer.encode(text)
    for attr in ("bos_id", "eos_id", "vision_start_id", "vision_end_id"):
        assert getattr(eng.tokenizer, attr) == getattr(tiny_engine.tokenizer, attr)
    img = random_image(64, 48, 5)
    a = eng.refine(img, "two red apples", seed=7, steps=3)
    b = tiny_engine.refine(img, "two red apples", seed=7, steps=3)
    assert max_pixel_diff(a.image, b.image) == 0
    assert eng.judge([(img, "apples")]) == pytest.approx(tiny_engine.judge([(img, "apples")]), abs=1e-6)


def test_single_weight_mode_does_not_read_the_other_file(ckpt_copy):
    (ckpt_copy / "ema.safetensors").write_bytes(b"partial download")  # unused when weights="rvr"
    eng = load_engine(ckpt_copy, device="cpu", weights="rvr")
    assert list(eng.weight_sets) == ["rvr"]
    _assert_state_equals_file(eng.weight_sets["rvr"].model, ckpt_copy / "rvr.safetensors")


def test_default_model_dir_is_the_bundled_model_when_shipped(tmp_path, monkeypatch):
    import engine.loading
    from engine.loading import default_model_dir

    shipped = make_checkpoint(tmp_path / "assets" / "demo", "tiny")
    monkeypatch.setattr(engine.loading, "BUNDLED_MODEL", shipped)
    assert default_model_dir(tmp_path / "cache") == shipped and not (tmp_path / "cache").exists()


def test_default_model_dir_builds_a_tiny_model_once_without_one(tmp_path, monkeypatch):
    import engine.loading
    from engine.loading import default_model_dir

    monkeypatch.setattr(engine.loading, "BUNDLED_MODEL", tmp_path / "not-shipped")
    path = default_model_dir(tmp_path)
    assert path.parent == tmp_path and (path / "ae.safetensors").is_file()
    stamp = (path / "ema.safetensors").stat().st_mtime_ns
    assert default_model_dir(tmp_path) == path
    assert (path / "ema.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary directory left behind
    eng = load_engine(None, device="cpu", cache_dir=tmp_path)
    assert eng.info()["model_dir"] == str(path)
