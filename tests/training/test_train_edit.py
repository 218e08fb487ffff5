"""Refinement via editing: world edit pairs, their coarse instruction, the clean-context training split, and
parity of the trained edit path with the engine's `edit`."""

import numpy as np
import pytest
import torch
from PIL import Image

from engine.checkpoint import load_bagel, read_config
from engine.loading import load_engine
from engine.preprocess import (
    latent_position_ids,
    patchify_latent,
    tensor_to_pil,
    to_tensor,
    unpatchify_latent,
)
from engine.requests import context_image
from engine.tiny import make_checkpoint
from training.checker import check
from training.dataset import build_world_dataset, read_records, read_specs, resolve
from training.editing import EDITABLE_DIMS, build_edit_records, edit_instruction, edited_scene
from training.forward import forward, losses
from training.packing import Sample, TextSplit, VaeSplit, VitSplit, pack
from training.prompts import Group, PromptSpec, sample_scene, scene_truth
from training.samples import ImageEncoder, Mixture, MixtureConfig, edit_sample
from training.trainer import TrainConfig, load_for_training, train
from training.world import Obj, Scene


def test_edit_instruction_names_the_failed_dimensions_and_the_prompt():
    assert edit_instruction("a red circle", ["color"]) == "Fix the colour: a red circle"
    assert edit_instruction("a large red circle", ["object", "color", "size"]) == (
        "Fix the object, colour and size: a large red circle"
    )
    with pytest.raises(ValueError):
        edit_instruction("a red circle", [])


@pytest.mark.parametrize("violate", [("color",), ("size",), ("object",), ("color", "size")])
def test_edited_scene_fixes_attributes_in_place(violate):
    spec = PromptSpec((Group("circle", color="red", size="small"),), category="mixed")
    rng = np.random.default_rng(3)
    for _ in range(20):
        source = sample_scene(spec, rng, violate)
        assert not scene_truth(source, spec)["overall"]
        target = edited_scene(source, spec)
        assert target is not None and scene_truth(target, spec)["overall"]
        # same objects in the same places: only shape, colour and size may change
        assert [(o.cx, o.cy) for o in target.objects] == [(o.cx, o.cy) for o in source.objects]


def test_edited_scene_leaves_counts_positions_and_crowded_growth_alone():
    count = PromptSpec((Group("square", count=3),), category="counting")
    assert edited_scene(Scene((Obj("square", "red", "small", 0.5, 0.5),)), count) is None
    left = PromptSpec((Group("circle", region="left"),), category="position")
    assert edited_scene(Scene((Obj("circle", "red", "small", 0.8, 0.5),)), left) is None
    # growing the small circle would overlap its neighbour
    large = PromptSpec((Group("circle", size="large"),), category="mixed")
    crowded = Scene((Obj("circle", "red", "small", 0.3, 0.5), Obj("square", "blue", "small", 0.52, 0.5)))
    assert edited_scene(crowded, large) is None


def test_edit_records_are_edits_the_checker_agrees_with(tmp_path):
    specs = [
        PromptSpec((Group("triangle", color="blue"),), category="colors"),
        PromptSpec((Group("cross", size="large", color="orange"),), category="mixed"),
        PromptSpec((Group("square"),), category="single_object"),
    ]
    records, stats = build_edit_records(specs, tmp_path, seed=0, per_prompt=3)
    assert stats == {"prompts": 3, "pairs": 9, "no_edit": 0} and len(records) == 9
    for r in records:
        spec = next(s for s in specs if s.text == r["user_prompt"][0])
        src, tgt = (Image.open(resolve(tmp_path, p)).convert("RGB") for p in r["image_list"])
        verdict = check(src, spec)
        failed = [d for d in spec.dims if not verdict[d]]
        assert failed == r["failed"] and set(failed) <= set(EDITABLE_DIMS)
        assert r["instruction"] == edit_instruction(spec.text, failed)
        assert check(tgt, spec)["overall"]
        # one generator state renders both: the background (a corner) is the same pixel
        a, b = np.asarray(src), np.asarray(tgt)
        assert (a[0, 0] == b[0, 0]).all() and (a != b).any()


def test_clean_context_split_is_seen_at_t0_and_takes_no_loss():
    ctx = VaeSplit(torch.randn(4, 3), torch.arange(4), clean=True)
    vit = VitSplit(torch.randn(2, 12), torch.arange(2))
    text = TextSplit([0, 5, 6, 7, 1])
    target = VaeSplit(torch.randn(4, 3), torch.arange(4))
    b = pack([Sample([ctx, vit, text, target], "edit")], 1, 2, torch.Generator().manual_seed(0))
    # rows: ctx 0-5 (markers + 4), vit 6-9, text 10-14, target 15-20
    assert b.lat_rows.tolist() == [1, 2, 3, 4, 16, 17, 18, 19]
    assert b.lat_loss.tolist() == [False] * 4 + [True] * 4
    assert torch.equal(b.lat_t[:4], torch.zeros(4)) and (b.lat_t[4:] > 0).all()
    assert torch.equal(b.lat_noise[:4], torch.zeros(4, 3))
    assert b.is_gen[1:5].all() and not b.is_gen[0] and not b.is_gen[5]
    # RoPE: ctx at 0, vit at 1, text 2..6, target at 7 (the clean block advances like any context image)
    assert b.positions[:6].tolist() == [0] * 6 and b.positions[6:10].tolist() == [1] * 4
    assert b.positions[10:15].tolist() == [2, 3, 4, 5, 6] and b.positions[15:].tolist() == [7] * 6
    m = b.mask
    assert m[0:6, 0:6].all()  # the context image is bidirectional within itself
    assert m[10:15, 0:10].all() and m[15:, 0:15].all()  # later splits see it
    assert not m[0:6, 6:].any()  # it sees nothing later


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    build_world_dataset(root, n_prompts=12, seed=0, heldout_fraction=0.0)
    edits, _ = build_edit_records(read_specs(root / "train_specs.jsonl"), root, per_prompt=1)
    return root, {"t2i": read_records(root / "t2i/data/t2i.parquet"), "edit": edits}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "tiny", seed=0)


def test_mixture_builds_edit_samples_with_both_cfg_dropouts(ckpt, world):
    root, records = world
    _, vae, tok, mcfg = load_for_training(ckpt, "ema")
    enc = ImageEncoder(mcfg, vae)
    kept = MixtureConfig({"edit": 1.0}, edit_text_dropout=0.0, edit_image_dropout=0.0)
    full = Mixture(tok, enc, root, {"edit": records["edit"]}, kept)
    s = full.make("edit", records["edit"][0], np.random.default_rng(0))
    assert s.kind == "edit" and [type(x).__name__ for x in s.splits] == [
        "VaeSplit",
        "VitSplit",
        "TextSplit",
        "VaeSplit",
    ]
    assert s.splits[0].clean and not s.splits[-1].clean
    dropped = MixtureConfig({"edit": 1.0}, edit_text_dropout=1.0, edit_image_dropout=1.0)
    none = Mixture(tok, enc, root, {"edit": records["edit"]}, dropped)
    s = none.make("edit", records["edit"][0], np.random.default_rng(0))
    assert [type(x).__name__ for x in s.splits] == ["VaeSplit"] and not s.splits[0].clean


def test_trained_edit_weights_give_the_engine_s_edit(ckpt, world, tmp_path):
    """The engine's `edit` on weights trained on edit samples equals the training forward's velocity on
    the same clean context (one Euler step from pure noise, no CFG)."""
    root, records = world
    out = tmp_path / "run"
    cfg = TrainConfig(
        steps=3, lr=1e-3, warmup_steps=1, ema_decay=0.5, max_rows=400, save_every=3, mixture={"edit": 1.0}
    )
    _, hist = train(ckpt, root, records, out, cfg, progress=False)
    assert all(np.isfinite(h["mse"]) for h in hist)

    mcfg = read_config(out)
    model = load_bagel(out / "rvr.safetensors", mcfg, torch.device("cpu"), torch.float32)
    engine = load_engine(out, device="cpu", dtype="float32", weights="rvr", attention="reference")
    _, vae, tok, _ = load_for_training(out, "rvr")
    enc = ImageEncoder(mcfg, vae)
    rec = records["edit"][0]
    src = Image.open(resolve(root, rec["image_list"][0])).convert("RGB")
    seed = 11
    got = engine.edit(src, rec["instruction"], seed=seed, steps=2, cfg_text=1.0, cfg_img=1.0)

    # the engine draws the context's posterior noise first, then the initial noise, from one generator
    g = torch.Generator().manual_seed(seed)
    d, z_c = mcfg.vae.downsample, mcfg.vae.z_channels
    x_img = to_tensor(context_image(src, mcfg).vae_image)[None]  # (1, 3, H, W): the engine's VAE input
    post = torch.randn(1, z_c, x_img.shape[2] // d, x_img.shape[3] // d, generator=g)
    z = vae.encode(x_img, post)[0]
    p = mcfg.latent_patch_size
    h, w = z.shape[1] // p, z.shape[2] // p
    ctx = VaeSplit(patchify_latent(z, p), latent_position_ids(h, w, mcfg.max_latent_size), clean=True)
    x = torch.randn(h * w, mcfg.latent_channels, generator=g)
    target = VaeSplit(torch.zeros_like(x), latent_position_ids(h, w, mcfg.max_latent_size))
    b = pack(
        [edit_sample(tok, ctx, enc.vit(src), rec["instruction"], target)],
        tok.vision_start_id,
        tok.vision_end_id,
        torch.Generator(),
    )
    b.lat_noise[-h * w :], b.lat_t[-h * w :] = x, torch.ones(h * w)  # x_t = x at t = 1
    with torch.no_grad():
        out_fwd = forward(model, b)
        assert losses(out_fwd).mse > 0
        zz = unpatchify_latent(x - out_fwd.velocity, h, w, p, z_c)
        img = tensor_to_pil(vae.decode(zz[None])[0])
    diff = np.abs(np.asarray(img, dtype=int) - np.asarray(got.image, dtype=int))
    assert diff.max() <= 1
