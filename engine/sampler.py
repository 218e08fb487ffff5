"""Rectified-flow sampler: shifted schedule, Euler steps, CFG window and BAGEL's guidance/renorm formulas.

Convention: x_t = (1 - t) x0 + t eps, the model predicts v = eps - x0, and each step is x <- x - v dt.
Every norm is taken over one request's tokens only, so requests packed in one forward never mix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.types import SamplingParams


def schedule(num_timesteps: int, shift: float) -> tuple[list[float], list[float]]:
    """Times t_0..t_{T-2} to evaluate and their step sizes dt_i = t_i - t_{i+1} (T - 1 of each)."""
    u = torch.linspace(1, 0, num_timesteps)
    t = shift * u / (1 + (shift - 1) * u)
    return t[:-1].tolist(), (t[:-1] - t[1:]).tolist()


@dataclass(frozen=True)
class StepGuidance:
    """Which branches a step evaluates, and with which scales (1.0 = off)."""

    cfg_text: float
    cfg_img: float

    @property
    def use_text_branch(self) -> bool:
        return self.cfg_text > 1.0

    @property
    def use_img_branch(self) -> bool:
        # Image CFG is ignored whenever text CFG is off (reference behaviour).
        return self.cfg_text > 1.0 and self.cfg_img > 1.0


def guidance_at(params: SamplingParams, t: float) -> StepGuidance:
    """CFG window on the shifted time: guided iff lo < t <= hi."""
    lo, hi = params.cfg_interval
    inside = lo < t <= hi
    return StepGuidance(params.cfg_text if inside else 1.0, params.cfg_img if inside else 1.0)


@dataclass(frozen=True)
class Velocities:
    """One request's velocities at one step, by CFG branch: the full context (`cond`), the text-dropped
    context (`text`, present iff the step uses the text branch) and the image-dropped one (`img`)."""

    cond: torch.Tensor  # (N, C)
    text: torch.Tensor | None = None  # (N, C)
    img: torch.Tensor | None = None  # (N, C)


def combine(v: Velocities, guidance: StepGuidance, renorm: str, renorm_min: float) -> torch.Tensor:
    """BAGEL's dual CFG with global / channel / text_channel renorm (docs/sampler.md §4)."""
    if (guidance.use_text_branch and v.text is None) or (guidance.use_img_branch and v.img is None):
        raise ValueError("a velocity is missing for a CFG branch the step's guidance uses")
    if not guidance.use_text_branch:
        return v.cond
    s_txt, s_img = guidance.cfg_text, guidance.cfg_img
    if renorm == "text_channel":
        v_t = v.text + s_txt * (v.cond - v.text)
        k = _norm(v.cond, per_token=True) / (_norm(v_t, per_token=True) + 1e-8)
        v_t = v_t * k.clamp(min=renorm_min, max=1.0)
        if guidance.use_img_branch:
            return v.img + s_img * (v_t - v.img)
        return v_t
    if renorm not in ("global", "channel"):
        raise ValueError(f"unknown renorm type {renorm!r}")
    out = v.text + s_txt * (v.cond - v.text)
    if guidance.use_img_branch:
        out = v.img + s_img * (out - v.img)
    per_token = renorm == "channel"
    k = _norm(v.cond, per_token) / (_norm(out, per_token) + 1e-8)
    return out * k.clamp(min=renorm_min, max=1.0)


def _norm(v: torch.Tensor, per_token: bool) -> torch.Tensor:
    if per_token:
        return torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    return torch.linalg.vector_norm(v)


def x0_estimate(x: torch.Tensor, v: torch.Tensor, t: float) -> torch.Tensor:
    """x0 = x_t - t v under the flow convention; used for previews."""
    return x - t * v
