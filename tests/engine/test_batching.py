"""Step-level batching: batch invariance, joining mid-way, CFG branch skipping, judge, rounds, release,
request validation, seeds, and awkward input sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from engine.errors import InvalidRequestError
from engine.types import GenerationRequest, SamplingParams
from tests.engine.conftest import max_pixel_diff, random_image, vae_rule


def _req(task, prompt, image=None, seed=0, size=None, **params):
    p = SamplingParams.for_task(task, **params)
    h, w = size if size else (None, None)
    return GenerationRequest(
        task, prompt, image, p, seed=seed, height=h, width=w, request_id=f"{task}-{seed}"
    )


def _mix():
    """Different tasks, sizes, steps and CFG settings; two refines and generate+edit share forwards."""
    return [
        _req("refine", "a red bicycle", random_image(100, 70, 1), seed=1, steps=6),
        _req("generate", "a lighthouse at night", seed=2, size=(128, 64), steps=4, cfg_interval=(0.4, 1.0)),
        _req("edit", "make it snowy", random_image(50, 70, 3), seed=3, steps=5),
        _req(
            "refine",
            "three yellow ducks",
            random_image(40, 90, 4),
            seed=4,
            steps=7,
            renorm="global",
            cfg_img=1.0,
        ),
        _req("generate", "a small house", seed=5, size=(48, 80), steps=5, renorm="channel", cfg_img=1.5),
    ]


def _solo(eng, req):
    return eng.run(req)[-1].image


def _drain(eng, states):
    while not all(s.done for s in states):
        eng.step(states)
    return [eng.finish(s).image for s in states]


@pytest.fixture(scope="module")
def solo_images(tiny_engine):
    return [_solo(tiny_engine, r) for r in _mix()]


def test_packed_equals_solo(tiny_engine, solo_images):
    reqs = _mix()
    packed = _drain(tiny_engine, tiny_engine.prepare(reqs))
    for req, a, b in zip(reqs, packed, solo_images, strict=True):
        assert a.size == b.size == (req.width or a.size[0], req.height or a.size[1])
        assert max_pixel_diff(a, b) <= 1, req.request_id
    # The requests really produce different images (the comparison above is not vacuous).
    assert max_pixel_diff(solo_images[0].resize((32, 32)), solo_images[3].resize((32, 32))) > 5


def test_requests_joining_mid_way_equal_solo(tiny_engine, solo_images):
    reqs = _mix()
    eng = tiny_engine
    first = eng.prepare([reqs[0], reqs[1]])
    eng.step(first)
    eng.step(first)
    later = eng.prepare(reqs[2:4])
    eng.step(first + later)
    last = eng.prepare([reqs[4]])
    states = first + later + last
    images = _drain(eng, states)
    for req, a, b in zip(reqs, images, solo_images, strict=True):
        assert max_pixel_diff(a, b) <= 1, req.request_id


def test_step_events(tiny_engine):
    events = []
    out = tiny_engine.run(
        _req("generate", "a boat", seed=9, size=(32, 32), steps=5), lambda e, p: events.append((e, p()))
    )
    assert [(e.step, e.total, e.round_index, e.rounds) for e, _ in events] == [
        (i, 4, 1, 1) for i in range(1, 5)
    ]
    assert all(e.request_id == "generate-9" for e, _ in events)
    assert all(isinstance(p, Image.Image) and max(p.size) <= 256 for _, p in events)
    assert out[0].image.size == (32, 32)


# --------------------------------------------------------------------------- CFG branches


def _guided(steps, shift, lo, hi):
    u = [1 - i / (steps - 1) for i in range(steps - 1)]
    return [lo < shift * x / (1 + (shift - 1) * x) <= hi for x in u]


def _count_sequences(eng, monkeypatch, states):
    """Per denoising step: (number of attention sequences, query rows) seen by the attention function of
    the engine's packed denoiser; the step's own stats must say the same."""
    calls = []
    inner = eng._denoiser.attention

    def counting(q, k, v, kc, vc, layout):
        calls.append((layout.num_seqs, layout.total_q))
        return inner(q, k, v, kc, vc, layout)

    monkeypatch.setattr(eng._denoiser, "attention", counting)
    per_step = []
    while not all(s.done for s in states):
        calls.clear()
        stats = eng.step(states).stats
        n_layers = eng.cfg.llm.num_hidden_layers
        assert len(calls) == n_layers and len(set(calls)) == 1
        assert (stats.sequences, stats.rows) == calls[0]
        per_step.append(calls[0])
    monkeypatch.setattr(eng._denoiser, "attention", inner)
    return per_step


def test_branches_outside_window_are_not_computed(tiny_engine, monkeypatch):
    eng = tiny_engine
    a = _req("refine", "a cat", random_image(60, 60, 1), seed=1, steps=8, cfg_interval=(0.5, 1.0))
    b = _req("refine", "a dog", random_image(40, 80, 2), seed=2, steps=8, cfg_text=1.0, cfg_img=3.0)
    c = _req("refine", "a cow", random_image(70, 40, 3), seed=3, steps=8, cfg_text=3.0, cfg_img=1.0)
    states = eng.prepare([a, b, c])
    n = [s.x.shape[0] for s in states]
    guided = _guided(8, 3.0, 0.5, 1.0)
    assert 0 < sum(guided) < 7
    per_step = _count_sequences(eng, monkeypatch, states)
    expected = []
    for g in guided:
        branches = [3 if g else 1, 1, 2]  # a: windowed 3-way CFG; b: text CFG off -> no CFG; c: text only
        expected.append((sum(branches), sum(k * (m + 2) for k, m in zip(branches, n, strict=True))))
    assert per_step == expected
    for s in states:
        eng.release(s)


def test_generate_cfg_text_branch_uses_empty_context(tiny_engine, monkeypatch):
    eng = tiny_engine
    [s] = eng.prepare([_req("generate", "a tree", seed=1, size=(32, 48), steps=6, cfg_interval=(0.4, 1.0))])
    per_step = _count_sequences(eng, monkeypatch, [s])
    n = 2 * 3
    assert per_step == [(2, 2 * (n + 2)) if g else (1, n + 2) for g in _guided(6, 3.0, 0.4, 1.0)]
    assert s.contexts["cfg_text"].length == 0 and s.contexts["cfg_img"] == s.contexts["gen"]
    eng.release(s)


def test_text_cfg_off_ignores_image_scale(tiny_engine):
    img = random_image(64, 64, 8)
    outs = [
        tiny_engine.refine(img, "a blue vase", seed=5, steps=4, cfg_text=t, cfg_img=i).image
        for t, i in ((1.0, 2.0), (1.0, 5.0), (0.5, 2.0), (1.0, 1.0), (4.0, 2.0), (4.0, 3.0))
    ]
    for o in outs[1:4]:
        assert max_pixel_diff(o, outs[0]) == 0
    assert max_pixel_diff(outs[4], outs[0]) > 0  # guidance on: different image
    assert max_pixel_diff(outs[5], outs[4]) > 0  # and the image scale matters when text CFG is on


# --------------------------------------------------------------------------- judge, rounds, release


def test_judge_batch_equals_one_by_one(tiny_engine):
    items = [
        (random_image(64, 64, 1), "a cat"),
        (random_image(30, 90, 2, "RGBA"), "two dogs playing in the snow"),
        (random_image(120, 50, 3), "x"),
        (random_image(64, 64, 1), "a completely different prompt"),
    ]
    batch = tiny_engine.judge(items)
    singles = [tiny_engine.judge([it])[0] for it in items]
    assert batch == pytest.approx(singles, abs=1e-5)
    assert all(0.0 < p < 1.0 for p in batch)
    assert len({round(p, 6) for p in batch}) == len(batch)
    assert tiny_engine.judge([]) == []


def test_judge_rejects_blank_prompt(tiny_engine):
    with pytest.raises(InvalidRequestError):
        tiny_engine.judge([(random_image(8, 8), "a cat"), (random_image(8, 8), "  ")])


def test_judge_rejects_non_image(tiny_engine):
    with pytest.raises(InvalidRequestError):
        tiny_engine.judge([("not an image", "a cat")])


def test_judge_rejects_over_long_prompt(tiny_engine):
    prompt = "cat " * (tiny_engine.limits.max_prompt_tokens + 10)
    assert len(tiny_engine.tokenizer.encode(prompt)) > tiny_engine.limits.max_prompt_tokens
    with pytest.raises(InvalidRequestError):
        tiny_engine.judge([(random_image(8, 8), prompt)])


def _first_noise(seed, n, c, draws=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, generator=g) for _ in range(draws)], g


def test_rounds_feed_back_and_continue_the_seed(tiny_engine):
    eng = tiny_engine
    img = random_image(64, 48, 6)
    outs = eng.run(_req("refine", "an orange fox", img, seed=21, steps=3) | _rounds(3))
    assert [o.round_index for o in outs] == [1, 2, 3]
    assert [o.done for o in outs] == [False, False, True]
    assert [o.score for o in outs] == [None] * 3
    assert all(o.seed == 21 for o in outs)
    assert outs[0].next_request.image is outs[0].image and outs[-1].next_request is None
    # Round 2 = a fresh refine of round 1's output whose noise is the seed's *second* draw.
    n = (48 // 16) * (64 // 16)
    _, g = _first_noise(21, n, eng.cfg.latent_channels)
    again = _req("refine", "an orange fox", outs[0].image, seed=21, steps=3)
    again.generator = g
    assert max_pixel_diff(eng.run(again)[0].image, outs[1].image) == 0
    # ...and not the same as starting the seed over.
    fresh = eng.run(_req("refine", "an orange fox", outs[0].image, seed=21, steps=3))[0].image
    assert max_pixel_diff(fresh, outs[1].image) > 0


class _rounds:
    def __init__(self, rounds, until=None):
        self.rounds, self.until = rounds, until

    def __ror__(self, req):
        req.rounds, req.until_score = self.rounds, self.until
        return req


def test_until_score(tiny_engine):
    img = random_image(48, 48, 7)
    outs = tiny_engine.run(_req("refine", "a pear", img, seed=2, steps=3) | _rounds(3, 0.0))
    assert len(outs) == 1 and outs[0].done
    assert outs[0].score == pytest.approx(tiny_engine.judge([(outs[0].image, "a pear")])[0], abs=1e-6)
    outs = tiny_engine.run(_req("refine", "a pear", img, seed=2, steps=3) | _rounds(2, 1.0))
    assert len(outs) == 2 and [o.done for o in outs] == [False, True]
    assert all(o.score is not None and o.score < 1.0 for o in outs)


def test_release_mid_run_frees_kv(tiny_engine):
    eng = tiny_engine
    pool = eng.weight_sets["rvr"].pool
    before = pool.used
    states = eng.prepare([_req("refine", "a hat", random_image(64, 64, 1), seed=1, steps=6)] * 2)
    eng.step(states)
    eng.step(states)
    eng.release(states[0])
    assert states[0].step == 2
    eng.step(states)  # the released state is skipped
    assert states[0].step == 2 and states[1].step == 3
    with pytest.raises(RuntimeError):
        eng.finish(states[0])
    eng.release(states[1])
    eng.release(states[1])
    assert pool.used == before


# --------------------------------------------------------------------------- validation


def _bad_requests():
    img = random_image(40, 40)
    ok = SamplingParams.for_task("refine", steps=4)
    p = SamplingParams.for_task
    return {
        "empty prompt": GenerationRequest("refine", "", img, ok),
        "blank prompt": GenerationRequest("refine", " \n\t", img, ok),
        "prompt not str": GenerationRequest("refine", None, img, ok),
        "over-long prompt": GenerationRequest("refine", "apple " * 1100, img, ok),
        "unknown task": GenerationRequest("inpaint", "a cat", img, ok),
        "height not multiple": GenerationRequest("refine", "a cat", img, ok, height=40, width=32),
        "height zero": GenerationRequest("refine", "a cat", img, ok, height=0, width=32),
        "width negative": GenerationRequest("generate", "a cat", None, ok, height=32, width=-16),
        "too large": GenerationRequest("generate", "a cat", None, ok, height=32, width=144),
        "float size": GenerationRequest("generate", "a cat", None, ok, height=32.0, width=32),
        "zero height, width unset": GenerationRequest("generate", "a cat", None, ok, height=0),
        "steps 1": GenerationRequest("refine", "a cat", img, p("refine", steps=1)),
        "steps float": GenerationRequest("refine", "a cat", img, p("refine", steps=4.5)),
        "cfg_text negative": GenerationRequest("refine", "a cat", img, p("refine", cfg_text=-1.0)),
        "cfg_text str": GenerationRequest("refine", "a cat", img, p("refine", cfg_text="4")),
        "cfg_img nan": GenerationRequest("refine", "a cat", img, p("refine", cfg_img=math.nan)),
        "interval reversed": GenerationRequest("refine", "a cat", img, p("refine", cfg_interval=(0.6, 0.4))),
        "interval short": GenerationRequest("refine", "a cat", img, p("refine", cfg_interval=(0.5,))),
        "renorm local": GenerationRequest("refine", "a cat", img, p("refine", renorm="local")),
        "renorm_min 2": GenerationRequest("refine", "a cat", img, p("refine", renorm_min=2.0)),
        "shift 0": GenerationRequest("refine", "a cat", img, p("refine", shift=0.0)),
        "refine no image": GenerationRequest("refine", "a cat", None, ok),
        "edit no image": GenerationRequest("edit", "a cat", None, ok),
        "empty image": GenerationRequest("refine", "a cat", Image.new("RGB", (0, 0)), ok),
        "edit image not PIL": GenerationRequest("edit", "a cat", np.zeros((8, 8, 3)), ok),
        "generate with image": GenerationRequest("generate", "a cat", img, ok),
        "rounds for generate": GenerationRequest("generate", "a cat", None, ok, rounds=2),
        "until_score for edit": GenerationRequest("edit", "a cat", img, ok, until_score=0.5),
        "rounds 0": GenerationRequest("refine", "a cat", img, ok, rounds=0),
        "rounds 99": GenerationRequest("refine", "a cat", img, ok, rounds=99),
        "rounds float": GenerationRequest("refine", "a cat", img, ok, rounds=2.5),
        "until_score 1.5": GenerationRequest("refine", "a cat", img, ok, until_score=1.5),
        "seed negative": GenerationRequest("refine", "a cat", img, ok, seed=-1),
        "seed too big": GenerationRequest("refine", "a cat", img, ok, seed=2**63),
        "seed float": GenerationRequest("refine", "a cat", img, ok, seed=1.5),
    }


@pytest.mark.parametrize("name", sorted(_bad_requests()))
def test_invalid_request(tiny_engine, name):
    good = _req("refine", "a cat", random_image(40, 40), steps=4)
    pools = [ws.pool for ws in tiny_engine.weight_sets.values()]
    before = [p.used for p in pools]
    with pytest.raises(InvalidRequestError):
        tiny_engine.prepare([good, _bad_requests()[name]])
    assert [p.used for p in pools] == before


def test_over_long_prompt_is_about_tokens(tiny_engine):
    limit = tiny_engine.limits.max_prompt_tokens
    words = "apple " * (limit * 2)
    ids = tiny_engine.tokenizer.encode(words)
    assert len(ids) > limit
    ok = tiny_engine.tokenizer.decode(ids[:limit])
    assert len(tiny_engine.tokenizer.encode(ok)) <= limit
    tiny_engine.validate(_req("generate", ok, size=(32, 32)))  # at the limit: accepted


def test_unknown_sampling_parameter(tiny_engine):
    with pytest.raises(InvalidRequestError, match="cfg_scale"):
        tiny_engine.generate("a cat", 32, 32, seed=0, cfg_scale=3.0)


# --------------------------------------------------------------------------- seeds


@pytest.mark.parametrize(("task", "size"), [("refine", None), ("generate", (48, 32)), ("refine", (32, 64))])
def test_initial_latent_is_seed_randn(tiny_engine, task, size):
    image = random_image(70, 50, 2) if task == "refine" else None
    [s] = tiny_engine.prepare([_req(task, "a cat", image, seed=1234, size=size, steps=3)])
    h, w = size if size else vae_rule(70, 50, *_vae_args(tiny_engine))[::-1]
    n = (h // 16) * (w // 16)
    [expected], _ = _first_noise(1234, n, tiny_engine.cfg.latent_channels)
    assert torch.equal(s.x, expected)
    tiny_engine.release(s)


@pytest.mark.parametrize("size", [None, (32, 32)])
def test_edit_noise_follows_the_vae_posterior_draw(tiny_engine, size):
    eng = tiny_engine
    [s] = eng.prepare([_req("edit", "a cat", random_image(70, 50, 2), seed=77, size=size, steps=3)])
    cw, ch = vae_rule(70, 50, *_vae_args(eng))  # the context image's size drives the posterior draw
    h, w = size or (ch, cw)
    g = torch.Generator().manual_seed(77)
    torch.randn(1, eng.cfg.vae.z_channels, ch // 8, cw // 8, generator=g)
    expected = torch.randn((h // 16) * (w // 16), eng.cfg.latent_channels, generator=g)
    assert torch.equal(s.x, expected)
    eng.release(s)


def test_random_seed_is_reported_and_reproduces(tiny_engine):
    img = random_image(48, 48, 3)
    a = tiny_engine.refine(img, "a kite", steps=3)
    assert isinstance(a.seed, int) and a.seed >= 0
    b = tiny_engine.refine(img, "a kite", steps=3, seed=a.seed)
    assert max_pixel_diff(a.image, b.image) == 0
    c = tiny_engine.refine(img, "a kite", steps=3, seed=a.seed + 1)
    assert max_pixel_diff(a.image, c.image) > 0


# --------------------------------------------------------------------------- awkward inputs


def _vae_args(eng):
    t = eng.cfg.vae_transform
    return t.max_size, t.min_size, t.stride, t.max_pixels


def _palette_with_transparency():
    img = Image.new("P", (40, 30), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    img.paste(1, (10, 10, 30, 20))
    img.info["transparency"] = 0
    return img


@pytest.mark.parametrize(
    "image",
    [
        random_image(1, 1, 1),
        random_image(127, 33, 2),
        random_image(3, 200, 3),
        random_image(300, 5, 4),
        random_image(45, 45, 5, "RGBA"),
        random_image(30, 70, 6, "LA"),
        random_image(17, 17, 7, "L"),
        _palette_with_transparency(),
    ],
    ids=["1x1", "odd", "tall", "wide", "rgba", "la", "gray", "p-transparent"],
)
def test_awkward_inputs_refine_to_vae_rule_size(tiny_engine, image):
    out = tiny_engine.refine(image, "a thing", seed=0, steps=2)
    assert out.image.mode == "RGB"
    assert out.image.size == vae_rule(*image.size, *_vae_args(tiny_engine))


def test_transparent_pixels_are_composited_on_white(tiny_engine):
    rgba = random_image(40, 40, 9, "RGBA")
    arr = np.asarray(rgba).copy()
    arr[..., 3] = 0  # fully transparent: colour channels must not matter
    clear = Image.fromarray(arr, "RGBA")
    white = Image.new("RGB", (40, 40), (255, 255, 255))
    a = tiny_engine.refine(clear, "a thing", seed=1, steps=3).image
    b = tiny_engine.refine(white, "a thing", seed=1, steps=3).image
    c = tiny_engine.refine(rgba.convert("RGB"), "a thing", seed=1, steps=3).image
    assert max_pixel_diff(a, b) == 0
    assert max_pixel_diff(a, c) > 0


def test_run_releases_kv_when_the_callback_raises(tiny_engine):
    pool = tiny_engine.weight_sets["ema"].pool
    before = pool.used

    def cancel(event, _preview):
        if event.step == 2:
            raise KeyboardInterrupt  # e.g. a cancelled job

    with pytest.raises(KeyboardInterrupt):
        tiny_engine.run(_req("generate", "a boat", seed=1, size=(32, 32), steps=6), cancel)
    assert pool.used == before


@pytest.mark.parametrize("size", [(1, 1), (17, 400), (333, 91), (128, 128), (511, 513)])
@pytest.mark.parametrize("task", ["refine", "edit"])
def test_kv_tokens_matches_what_prepare_allocates(tiny_engine, size, task):
    """Admission counts tokens from the resize arithmetic; prepare resizes pixels. They must agree."""
    from PIL import Image

    req = tiny_engine.validate(GenerationRequest(task, "two red circles", Image.new("RGB", size), None, 1))
    [state] = tiny_engine.prepare([req])
    try:
        n = state.grid[0] * state.grid[1]
        assert tiny_engine.kv_tokens(req) == state.alloc[1] + 3 * (n + 2)
    finally:
        tiny_engine.release(state)


def test_run_batch_equals_run_alone_across_chunks_and_rounds(tiny_engine):
    reqs = [
        _req("generate", "a red circle", seed=7, size=(64, 64), steps=3),
        GenerationRequest(
            "refine",
            "two blue squares",
            random_image(64, 64, 8),
            SamplingParams.for_task("refine", steps=3),
            seed=8,
            rounds=2,
        ),
        _req("edit", "make it green", random_image(48, 64, 9), seed=9, steps=2),
    ]
    alone = [[o.image for o in tiny_engine.run(r)] for r in reqs]
    used = {n: ws.pool.used for n, ws in tiny_engine.weight_sets.items()}
    batched = tiny_engine.run_batch(reqs, batch_size=2)
    assert [len(rounds) for rounds in batched] == [1, 2, 1]
    for want, got in zip(alone, batched, strict=True):
        assert [max_pixel_diff(a, o.image) for a, o in zip(want, got, strict=True)] == [0] * len(want)
    assert {n: ws.pool.used for n, ws in tiny_engine.weight_sets.items()} == used
