"""One denoising step of a batch: which CFG branches each request runs, their velocities, the update.

`plan_step` decides per request which branches the step computes (branches outside the request's CFG
window are skipped); a `Denoiser` returns each request's `Velocities` by branch name; `advance` combines
them (per-request renorm) and takes the Euler step. `PackedDenoiser` runs every branch of every request as
one packed forward, each branch a sequence that attends to its own cached context range plus its query
block [<|vision_start|>, latents, <|vision_end|>]. Compiled per-branch modules (`engine.backends`) provide
other denoisers with the same contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from engine.model.packing import RowPacker
from engine.sampler import StepGuidance, Velocities, combine, guidance_at, x0_estimate
from kernels import Segment as AttentionSegment
from kernels import SequenceSpec

if TYPE_CHECKING:
    from engine.core import RequestState, WeightSet
    from engine.model.llm import AttentionFn

# Every CFG context a request may hold; the step computes a subset (`BranchPlan.branches`), in this order.
BRANCHES = ("gen", "cfg_text", "cfg_img")


@dataclass(frozen=True)
class BranchPlan:
    """What one request computes at its current step."""

    state: RequestState
    t: float  # flow time of this step
    guidance: StepGuidance

    @property
    def branches(self) -> tuple[str, ...]:
        """The contexts evaluated: always `gen`, the text- and image-dropped ones only while guided."""
        g = self.guidance
        return (
            "gen",
            *(("cfg_text",) if g.use_text_branch else ()),
            *(("cfg_img",) if g.use_img_branch else ()),
        )

    @property
    def rows(self) -> int:
        """Query rows the step packs for this request: latents plus two markers, per branch."""
        return len(self.branches) * (self.state.x.shape[0] + 2)


def plan_step(states: list[RequestState]) -> list[BranchPlan]:
    plans = []
    for state in states:
        t = state.timesteps[state.step]
        plans.append(BranchPlan(state, t, guidance_at(state.request.params, t)))
    return plans


def velocities_by_branch(plan: BranchPlan, per_branch: dict[str, torch.Tensor]) -> Velocities:
    """Named branch outputs -> Velocities; a branch the plan skipped stays None."""
    return Velocities(per_branch["gen"], per_branch.get("cfg_text"), per_branch.get("cfg_img"))


def advance(plan: BranchPlan, v: Velocities) -> None:
    """CFG-combine one request's velocities, keep the x0 estimate (previews) and take the Euler step."""
    s = plan.state
    params = s.request.params
    velocity = combine(v, plan.guidance, params.renorm, params.renorm_min)  # (N, C)
    s.x0 = x0_estimate(s.x, velocity, plan.t)
    s.x = s.x - velocity * s.dts[s.step]
    s.step += 1


class Denoiser(Protocol):
    """Computes every planned branch of every request of one weight set at their current step."""

    def velocities(self, weights: WeightSet, plans: list[BranchPlan]) -> list[Velocities]: ...


class PackedDenoiser:
    """All branches of all requests in one packed LLM forward over the weight set's KV pool."""

    def __init__(self, marker_ids: torch.Tensor, attention: AttentionFn) -> None:
        self.marker_ids = marker_ids  # (2,) <|vision_start|>, <|vision_end|> on the engine's device
        self.attention = attention

    def velocities(self, weights: WeightSet, plans: list[BranchPlan]) -> list[Velocities]:
        model = weights.model
        device = self.marker_ids.device
        markers = model.embed_tokens(self.marker_ids)  # (2, hidden)
        packer = RowPacker()
        for plan in plans:
            s = plan.state
            n = s.x.shape[0]
            latents = model.embed_latents(s.x, torch.full((n,), plan.t, device=device), s.latent_ids)
            for branch in plan.branches:
                ctx = s.contexts[branch]
                packer.add(markers[:1], ctx.rope, gen=False)
                packer.add(latents, ctx.rope, gen=True)
                packer.add(markers[1:], ctx.rope, gen=False)
                block = (AttentionSegment(n + 2, causal=False),)
                packer.sequences.append(SequenceSpec(block, ctx.offset, ctx.length))
        embeds, batch = packer.build(device)
        _, h_gen = model.llm(embeds, batch, weights.pool.layers(), self.attention)
        v_all = model.velocity(h_gen)  # (sum of branch latents, C): gen rows in packing order
        out, offset = [], 0
        for plan in plans:
            n = plan.state.x.shape[0]
            per_branch = {}
            for branch in plan.branches:
                per_branch[branch] = v_all[offset : offset + n]
                offset += n
            out.append(velocities_by_branch(plan, per_branch))
        return out
