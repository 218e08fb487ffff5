"""Sampler: schedule, CFG window, guidance/renorm formulas against float64 references (docs/sampler.md §2,
§3, §4)."""

from __future__ import annotations

import itertools

import pytest
import torch

from engine.sampler import StepGuidance, Velocities, combine, guidance_at, schedule
from engine.types import GenerationRequest, SamplingParams
from tests.engine.conftest import random_image


def _times64(T: int, s: float) -> list[float]:
    u = [1 - i / (T - 1) for i in range(T)]
    return [s * x / (1 + (s - 1) * x) for x in u]


@pytest.mark.parametrize(("T", "shift"), [(50, 3.0), (8, 1.0), (25, 5.0), (2, 3.0)])
def test_schedule_matches_formula(T, shift):
    ts, dts = schedule(T, shift)
    ref = _times64(T, shift)
    assert len(ts) == len(dts) == T - 1
    assert ts[0] == pytest.approx(1.0, abs=1e-7)
    assert ts == pytest.approx(ref[:-1], abs=1e-6)
    assert dts == pytest.approx([a - b for a, b in itertools.pairwise(ref)], abs=1e-6)
    assert sum(dts) == pytest.approx(1.0, abs=1e-5)
    assert all(d > 0 for d in dts)


def test_schedule_last_time_for_defaults():
    ts, _ = schedule(50, 3.0)
    assert ts[-1] == pytest.approx(3 / 51, abs=1e-6)  # u = 1/49: 3u / (1 + 2u)
    assert round(ts[-1], 4) == 0.0588


@pytest.mark.parametrize(("interval", "guided"), [((0.4, 1.0), 41), ((0.0, 1.0), 49)])
def test_cfg_window_counts(interval, guided):
    params = SamplingParams(steps=50, shift=3.0, cfg_text=4.0, cfg_img=2.0, cfg_interval=interval)
    ts, _ = schedule(50, 3.0)
    gs = [guidance_at(params, t) for t in ts]
    assert sum(g.use_text_branch for g in gs) == guided
    assert sum(g.use_img_branch for g in gs) == guided
    assert sum(lo < t <= hi for t in _times64(50, 3.0)[:-1] for lo, hi in [interval]) == guided
    for g in gs:
        assert (g.cfg_text, g.cfg_img) in ((4.0, 2.0), (1.0, 1.0))


def test_cfg_window_bounds_and_branch_rules():
    p = SamplingParams(cfg_text=3.0, cfg_img=1.5, cfg_interval=(0.25, 0.75))
    assert guidance_at(p, 0.25).cfg_text == 1.0  # lo excluded
    assert guidance_at(p, 0.75).cfg_text == 3.0  # hi included
    assert guidance_at(p, 0.8) == StepGuidance(1.0, 1.0)
    assert not StepGuidance(1.0, 4.0).use_img_branch  # image CFG ignored when text CFG is off
    assert StepGuidance(1.01, 1.0).use_text_branch and not StepGuidance(1.01, 1.0).use_img_branch
    assert StepGuidance(2.0, 1.5).use_img_branch


def _ref_combine(vc, vt, vi, s_txt, s_img, renorm, rmin):
    """docs/sampler.md §4 in float64, written from that text."""
    vc, vt = vc.double(), vt.double()
    vi = vi.double() if vi is not None else None
    if s_txt <= 1:
        return vc

    def clamp(x):
        return torch.clamp(x, min=rmin, max=1.0)

    if renorm == "text_channel":
        vT = vt + s_txt * (vc - vt)
        k = vc.norm(dim=-1, keepdim=True) / (vT.norm(dim=-1, keepdim=True) + 1e-8)
        vT = clamp(k) * vT
        return vi + s_img * (vT - vi) if s_img > 1 else vT
    v = vt + s_txt * (vc - vt)
    if s_img > 1:
        v = vi + s_img * (v - vi)
    if renorm == "global":
        k = vc.norm() / (v.norm() + 1e-8)
    else:
        k = vc.norm(dim=-1, keepdim=True) / (v.norm(dim=-1, keepdim=True) + 1e-8)
    return clamp(k) * v


def _velocities(seed=0, n=24, c=16):
    g = torch.Generator().manual_seed(seed)
    vc = torch.randn(n, c, generator=g)
    # Vary the per-token norms of the unconditional branches so that per-token k spans (0, 1] widely.
    vt = torch.randn(n, c, generator=g) * torch.linspace(0.1, 3.0, n)[:, None]
    vi = torch.randn(n, c, generator=g) * torch.linspace(2.0, 0.2, n)[:, None]
    return vc, vt, vi


@pytest.mark.parametrize("renorm", ["global", "channel", "text_channel"])
@pytest.mark.parametrize("with_img", [False, True])
@pytest.mark.parametrize("renorm_min", [0.0, 0.5, 1.0])
def test_combine_matches_float64_reference(renorm, with_img, renorm_min):
    vc, vt, vi = _velocities()
    g = StepGuidance(4.0, 2.0 if with_img else 1.0)
    out = combine(Velocities(vc, vt, vi if with_img else None), g, renorm, renorm_min)
    ref = _ref_combine(vc, vt, vi, 4.0, g.cfg_img, renorm, renorm_min)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("renorm", ["global", "channel", "text_channel"])
def test_renorm_min_one_disables_renorm(renorm):
    vc, vt, vi = _velocities(1)
    g = StepGuidance(3.0, 1.5)
    out = combine(Velocities(vc, vt, vi), g, renorm, 1.0).double()
    vc, vt, vi = vc.double(), vt.double(), vi.double()
    plain = vi + 1.5 * (vt + 3.0 * (vc - vt) - vi)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)
    # ...and with renorm_min 0 the guided velocity is really shrunk (the test above can fail).
    shrunk = combine(Velocities(vc.float(), vt.float(), vi.float()), g, renorm, 0.0).double()
    assert (shrunk - plain).abs().max() > 1e-2


def test_renorm_bounds_norm_by_conditional():
    vc, vt, _vi = _velocities(2)
    g = StepGuidance(4.0, 1.0)
    out = combine(Velocities(vc, vt), g, "channel", 0.0)
    assert torch.all(out.norm(dim=-1) <= vc.norm(dim=-1) * (1 + 1e-5))
    out = combine(Velocities(vc, vt), g, "global", 0.0)
    assert out.norm() <= vc.norm() * (1 + 1e-5)


@pytest.mark.parametrize("s_txt", [1.0, 0.5, 0.0])
def test_text_scale_at_most_one_returns_v_cond(s_txt):
    vc, vt, vi = _velocities(3)
    for renorm in ("global", "channel", "text_channel"):
        out = combine(Velocities(vc, vt, vi), StepGuidance(s_txt, 3.0), renorm, 0.0)
        assert torch.equal(out, vc)


def test_a_missing_branch_velocity_is_an_error():
    vc, vt, _vi = _velocities(5)
    with pytest.raises(ValueError, match="missing"):
        combine(Velocities(vc), StepGuidance(2.0, 1.0), "global", 0.0)  # text branch on, no v_text
    with pytest.raises(ValueError, match="missing"):
        combine(Velocities(vc, vt), StepGuidance(2.0, 3.0), "text_channel", 0.0)  # image branch on


def test_unknown_renorm_raises():
    vc, vt, _vi = _velocities(4)
    with pytest.raises(ValueError, match="local"):
        combine(Velocities(vc, vt), StepGuidance(2.0, 1.0), "local", 0.0)


# --------------------------------------------------------------------------- per-request norms


def _generate(prompt, seed, size, steps=4, renorm="global"):
    params = SamplingParams.for_task("generate", steps=steps, renorm=renorm, cfg_interval=(0.0, 1.0))
    return GenerationRequest("generate", prompt, None, params, seed=seed, height=size[0], width=size[1])


@pytest.mark.parametrize("renorm", ["global", "channel"])
def test_packed_requests_use_their_own_norms(tiny_engine, renorm):
    eng = tiny_engine
    a = _generate("a red apple", 11, (64, 48), renorm=renorm)
    # B: larger grid, different prompt and seed, a refine (different weights) too, so magnitudes differ.
    b = _generate("a very large blue ocean with waves", 12, (128, 128), renorm=renorm)
    c = GenerationRequest(
        "refine", "a cat", random_image(50, 50, 9), SamplingParams.for_task("refine", steps=4), seed=13
    )
    [solo] = eng.prepare([a])
    while not solo.done:
        eng.step([solo])
    states = eng.prepare([a, b, c])
    # Scale up B's state so that its velocity norms are far from A's.
    states[1].x = states[1].x * 25.0
    while not all(s.done for s in states):
        eng.step(states)
    torch.testing.assert_close(states[0].x, solo.x, atol=1e-5, rtol=1e-5)
    assert states[1].x.norm() > 3 * states[0].x.norm()
    for s in (solo, *states):
        eng.release(s)
