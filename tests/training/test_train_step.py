"""Training: packing and mask, a step lowers the loss on a fixed batch, and the saved checkpoint reloads into
the engine with the same outputs as the trained weights (judge and one refine step)."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from engine.checkpoint import load_bagel, read_config
from engine.loading import load_engine
from engine.preprocess import latent_position_ids, tensor_to_pil, unpatchify_latent
from engine.prompts import JUDGE_QUESTION
from engine.tiny import make_checkpoint
from training.dataset import build_world_dataset, load_refine_sample, read_records
from training.forward import forward, losses
from training.packing import Sample, TextSplit, VaeSplit, pack, text_split
from training.samples import ImageEncoder, Mixture, MixtureConfig, refine_sample
from training.trainer import TrainConfig, Trainer, load_for_training, train


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    build_world_dataset(root, n_prompts=12, seed=0, heldout_fraction=0.0)
    records = {
        "rvr": read_records(root / "rvr/data/rvr.parquet"),
        "t2i": read_records(root / "t2i/data/t2i.parquet"),
        "und": read_records(root / "und/und.jsonl"),
    }
    return root, records


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "tiny", seed=0)


def test_mask_follows_split_modes():
    sample = Sample(
        [TextSplit([1, 2, 3]), VaeSplit(torch.zeros(2, 4), torch.arange(2)), TextSplit([4, 5], loss=True)]
    )
    other = Sample([TextSplit([6, 7])])
    b = pack([sample, other], 90, 91, torch.Generator().manual_seed(0))
    m = b.mask
    assert b.num_rows == 3 + 4 + 2 + 2
    assert m[:3, :3].equal(torch.ones(3, 3, dtype=torch.bool).tril())  # causal text
    assert m[3:7, :7].all()  # noise split: full within itself, sees the earlier text
    assert not m[7:9, 3:7].any() and m[7:9, :3].all()  # nobody attends to the noise split
    assert not m[9:, :9].any() and not m[:9, 9:].any()  # samples are isolated
    assert b.positions.tolist() == [0, 1, 2, 3, 3, 3, 3, 3, 4, 0, 1]  # one RoPE position per image block
    assert b.is_gen.tolist() == [False] * 4 + [True] * 2 + [False] * 5  # markers stay in the und expert
    assert b.ce_rows.tolist() == [7] and b.ce_labels.tolist() == [5]


def test_training_step_decreases_loss_on_fixed_batch(ckpt, world):
    root, records = world
    model, vae, tok, cfg = load_for_training(ckpt)
    mix = Mixture(tok, ImageEncoder(cfg, vae), root, records, MixtureConfig({"rvr": 2, "und": 1, "t2i": 1}))
    batch = pack(
        mix.batch(seed=0, step=0, max_rows=250),
        tok.vision_start_id,
        tok.vision_end_id,
        torch.Generator().manual_seed(0),
    )
    assert {"rvr", "und", "t2i"} <= set(batch.kinds) and batch.num_ce_tokens and batch.num_latent_tokens
    trainer = Trainer(model, TrainConfig(lr=2e-3, warmup_steps=1, ema_decay=0.5))
    with torch.no_grad():
        before = losses(forward(model, batch)).total.item()
    for _ in range(3):
        trainer.train_step(batch)
    with torch.no_grad():
        after = losses(forward(model, batch)).total.item()
    assert after < before * 0.9


def _fixed_batch(ckpt, world):
    root, records = world
    model, vae, tok, cfg = load_for_training(ckpt)
    mix = Mixture(tok, ImageEncoder(cfg, vae), root, records, MixtureConfig({"rvr": 2, "und": 1, "t2i": 1}))
    gen = torch.Generator().manual_seed(0)
    return model, pack(mix.batch(seed=0, step=0, max_rows=250), tok.vision_start_id, tok.vision_end_id, gen)


def test_gradient_checkpointing_gives_the_same_gradients(ckpt, world):
    model, batch = _fixed_batch(ckpt, world)
    model.requires_grad_(True)
    calls = []
    layer = model.language_model.model.layers[0]
    run_layer = layer.forward
    layer.forward = lambda *a: calls.append(1) or run_layer(*a)  # counts recomputation too (hooks do not)
    grads, layer_runs = [], []
    for recompute in (False, True):
        model.zero_grad(set_to_none=True)
        model.language_model.model.gradient_checkpointing = recompute
        calls.clear()
        losses(forward(model.train(), batch)).total.backward()
        layer_runs.append(len(calls))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert layer_runs == [1, 2]  # the checkpointed layer ran again in backward
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_bf16_autocast_step_keeps_float32_state_and_lowers_loss(ckpt, world):
    model, batch = _fixed_batch(ckpt, world)
    trainer = Trainer(model, TrainConfig(lr=2e-3, warmup_steps=1, ema_decay=0.5, autocast_bf16=True))
    with torch.no_grad():
        before = losses(forward(model, batch)).total.item()
    m = [trainer.train_step(batch) for _ in range(3)]
    assert all(np.isfinite(x["loss"]) for x in m)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(v.dtype == torch.float32 for v in trainer.ema.values())
    with torch.no_grad():
        after = losses(forward(model, batch)).total.item()
    assert after < before * 0.9


def _judge_with_training_forward(model, tok, enc, image, prompt):
    yes, no = tok.answer_token_ids()
    sample = Sample(
        [
            enc.vit(image),
            text_split(tok, JUDGE_QUESTION.format(prompt=prompt)),
            TextSplit([tok.bos_id, yes[0]], loss=True),
        ]
    )
    b = pack([sample], tok.vision_start_id, tok.vision_end_id, torch.Generator())
    logits = forward(model, b).logits[0]
    pair = torch.stack([logits[yes].logsumexp(-1), logits[no].logsumexp(-1)])
    return pair.softmax(-1)[0].item()


def test_checkpoint_reloads_into_engine_with_identical_outputs(ckpt, world, tmp_path):
    root, records = world
    out = tmp_path / "run"
    cfg = TrainConfig(steps=2, lr=1e-3, warmup_steps=1, ema_decay=0.5, max_rows=300, save_every=2)
    trainer, hist = train(ckpt, root, records, out, cfg, progress=False)
    assert len(hist) == 2 and (out / "rvr.safetensors").is_file() and (out / "ema.safetensors").is_file()

    mcfg = read_config(out)
    ema_model = load_bagel(out / "rvr.safetensors", mcfg, torch.device("cpu"), torch.float32)
    for k, v in trainer.ema_state_dict().items():
        assert torch.equal(ema_model.state_dict()[k], v), k

    engine = load_engine(out, device="cpu", dtype="float32", weights="rvr", attention="reference")
    _, vae, tok, _ = load_for_training(out, "rvr")
    enc = ImageEncoder(mcfg, vae)
    mis, _, prompt = load_refine_sample(records["rvr"][0], root)

    # judge: p(yes) of the engine == the training forward's answer-token logits on the same weights
    p_engine = engine.judge([(mis, prompt)])[0]
    with torch.no_grad():
        p_train = _judge_with_training_forward(ema_model, tok, enc, mis, prompt)
    assert p_engine == pytest.approx(p_train, abs=1e-5)

    # refine: one Euler step from t=1 without CFG equals the training forward's velocity on a pure-noise target
    seed = 7
    got = engine.refine(mis, prompt, seed=seed, steps=2, cfg_text=1.0, cfg_img=1.0)
    d = mcfg.latent_downsample
    h, w = mis.height // d, mis.width // d
    x = torch.randn(h * w, mcfg.latent_channels, generator=torch.Generator().manual_seed(seed))
    target = VaeSplit(torch.zeros_like(x), latent_position_ids(h, w, mcfg.max_latent_size))
    b = pack(
        [refine_sample(tok, enc.vit(mis), target, prompt)],
        tok.vision_start_id,
        tok.vision_end_id,
        torch.Generator(),
    )
    b.lat_noise, b.lat_t = x, torch.ones(h * w)  # x_t = x at t = 1
    with torch.no_grad():
        v = forward(ema_model, b).velocity
        z = unpatchify_latent(x - v, h, w, mcfg.latent_patch_size, mcfg.vae.z_channels)
        img = tensor_to_pil(vae.decode(z[None])[0])
    diff = np.abs(np.asarray(img, dtype=int) - np.asarray(got.image, dtype=int))
    assert diff.max() <= 1


def test_ema_warmup_tracks_a_model_trained_from_scratch(ckpt, world):
    root, records = world
    model, vae, tok, cfg = load_for_training(ckpt)
    mix = Mixture(tok, ImageEncoder(cfg, vae), root, records, MixtureConfig({"t2i": 1}))
    batch = pack(
        mix.batch(0, 0, 120), tok.vision_start_id, tok.vision_end_id, torch.Generator().manual_seed(0)
    )
    name = "llm2vae.weight"
    init = model.state_dict()[name].clone()
    slow = Trainer(model, TrainConfig(lr=1e-2, warmup_steps=1, ema_decay=0.9999))
    slow.train_step(batch)
    # constant 0.9999: the EMA barely leaves the initial weights; with warm-up the first decay is 0.1
    assert torch.allclose(slow.ema[name], init, atol=1e-5)
    fast = Trainer(model, TrainConfig(lr=1e-2, warmup_steps=1, ema_decay=0.9999, ema_warmup=True))
    before = model.state_dict()[name].clone()
    fast.train_step(batch)
    after = model.state_dict()[name]
    assert torch.allclose(fast.ema[name], 0.1 * before + 0.9 * after, atol=1e-6)


def test_pair_cast_tints_both_images_of_a_refine_pair_alike(ckpt, world):
    """refine_pair_cast: the misaligned (ViT) and aligned (latent target) images share one random cast, the
    cast target is not served from the latent cache, and without the option the images are untouched."""
    from training.checker import background
    from training.dataset import open_rgb, parse_image_list, resolve

    root, records = world
    _, vae, tok, cfg = load_for_training(ckpt)

    class Spy(ImageEncoder):
        def __init__(self):
            super().__init__(cfg, vae)
            self.seen = []

        def vit(self, img):
            self.seen.append(("vit", img, None))
            return super().vit(img)

        def latents(self, img, key=None):
            self.seen.append(("latents", img, key))
            return super().latents(img, key)

    rec = records["rvr"][0]
    originals = [open_rgb(resolve(root, p)) for p in parse_image_list(rec["image_list"])]

    def bg(img):
        return background(np.asarray(img, dtype=np.float64))

    for strength in (0.0, 0.3):
        spy = Spy()
        mix = Mixture(tok, spy, root, {"rvr": [rec]}, MixtureConfig({"rvr": 1}, refine_pair_cast=strength))
        mix.make("rvr", rec, np.random.default_rng(4))
        (_, mis, _), (_, ali, key) = spy.seen
        ratios = [bg(img) / bg(orig) for img, orig in zip((mis, ali), originals, strict=True)]
        if strength == 0:
            assert key == parse_image_list(rec["image_list"])[1] and all(np.allclose(r, 1.0) for r in ratios)
        else:
            assert "|cast=" in key  # the cast target has its own cache entry
            assert np.abs(ratios[0] - ratios[1]).max() < 0.02  # one cast for both images
            assert ratios[0].min() < 0.97 and np.isclose(ratios[0].max(), 1.0, atol=0.02)


def test_image_cast_tints_t2i_and_und_images_each_on_its_own(ckpt, world):
    """image_cast: text-to-image targets and understanding images get independent random casts from the
    world's fixed set (cached per cast); refine pairs are left to refine_pair_cast."""
    from training.checker import background

    root, records = world
    _, vae, tok, cfg = load_for_training(ckpt)
    seen = []

    class Spy(ImageEncoder):
        def vit(self, img):
            seen.append(("vit", img, None))
            return super().vit(img)

        def latents(self, img, key=None):
            seen.append(("latents", img, key))
            return super().latents(img, key)

    mix = Mixture(tok, Spy(cfg, vae), root, records, MixtureConfig({"t2i": 1, "und": 1}, image_cast=0.3))
    rng = np.random.default_rng(2)
    for _ in range(6):
        mix.make("t2i", records["t2i"][0], rng)
        mix.make("und", records["und"][0], rng)
    tints = {tuple(np.round(background(np.asarray(img, dtype=np.float64)) / 10)) for _, img, _ in seen}
    assert len(tints) >= 4  # independent casts, not one per run
    assert all("|cast=" in key for kind, _, key in seen if kind == "latents")


def test_a_stopped_t2i_run_resumes_to_the_weights_of_an_uninterrupted_one(ckpt, world, tmp_path):
    """A text-to-image-only mixture leaves parameters without gradients (the text expert's last layers feed no
    loss), so AdamW keeps no state for them; resuming must accept that and continue bit-exactly."""
    root, records = world
    cfg = TrainConfig(steps=3, lr=1e-3, warmup_steps=1, max_rows=200, save_every=1, mixture={"t2i": 1.0})
    whole, _ = train(ckpt, root, records, tmp_path / "whole", cfg, progress=False)
    train(ckpt, root, records, tmp_path / "split", replace(cfg, steps=2), progress=False)
    resumed, hist = train(ckpt, root, records, tmp_path / "split", cfg, progress=False)
    assert len(hist) == 1 and resumed.step == 3
    untouched = [n for n, p in whole.model.named_parameters() if p.requires_grad and p not in whole.opt.state]
    assert untouched  # the case this test is about
    for (name, a), b in zip(
        whole.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
