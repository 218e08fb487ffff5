"""Denoising one request and one CFG branch at a time (the `DenoiseStep` unit).

Backends that compile the exported `DenoiseStep` (TensorRT) cannot take the engine's packed varlen
forward, so they return a `BranchwiseDenoiser`: the engine keeps the planning, CFG combination and Euler
update, and the denoiser calls each weight set's step function once per planned branch. Prefill stays on
the engine's packed eager path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch

from engine.backends.base import PYTORCH_CAPABILITIES, Backend, Capabilities, ShapeBucket, select_bucket
from engine.backends.export import branch_inputs
from engine.denoise import BranchPlan, velocities_by_branch
from engine.sampler import Velocities

if TYPE_CHECKING:
    from engine.core import Engine, WeightSet

# (x, t, latent_ids, past_k, past_v, rope) -> (N, C) float32 velocity: DenoiseStep's signature
StepFn = Callable[..., torch.Tensor]


class BucketedStep:
    """A step function that dispatches to the module built for the tightest bucket holding (N, P)."""

    def __init__(self, modules: Mapping[ShapeBucket, StepFn]) -> None:
        if not modules:
            raise ValueError("a bucketed step needs at least one bucket")
        self.modules = dict(modules)

    def __call__(self, x, t, latent_ids, past_k, past_v, rope) -> torch.Tensor:
        bucket = select_bucket(self.modules, x.shape[0], past_k.shape[1])
        # The K/V are strided views of the pool; compiled engines take dense inputs. One copy per branch
        # and step (L*P*Hkv*D elements each) is small next to the N-row forward it feeds.
        return self.modules[bucket](x, t, latent_ids, past_k.contiguous(), past_v.contiguous(), rope)


class BranchwiseDenoiser:
    """Every planned branch through its weight set's step function, one call per branch."""

    def __init__(self, steps: Mapping[str, StepFn]) -> None:
        self.steps = dict(steps)

    def velocities(self, weights: WeightSet, plans: list[BranchPlan]) -> list[Velocities]:
        step = self.steps[weights.name]
        return [
            velocities_by_branch(plan, {b: step(*branch_inputs(plan.state, b)) for b in plan.branches})
            for plan in plans
        ]


def branchwise_denoiser(engine: Engine, steps: Mapping[str, StepFn]) -> BranchwiseDenoiser:
    """A denoiser for `engine` from one step function per weight set (all of them are needed)."""
    missing = set(engine.weight_sets) - set(steps)
    if missing:
        raise ValueError(f"no step function for weight sets {sorted(missing)}")
    return BranchwiseDenoiser(steps)


class PrebuiltBranchwiseBackend(Backend):
    """Steps through step functions built elsewhere (exported programs, tests): `steps(engine)` returns
    one per weight set."""

    name = "branchwise"

    def __init__(self, steps: Callable[[Engine], Mapping[str, StepFn]]) -> None:
        self.steps = steps

    def capabilities(self) -> Capabilities:
        return PYTORCH_CAPABILITIES

    def attach(self, engine: Engine) -> BranchwiseDenoiser:
        return branchwise_denoiser(engine, self.steps(engine))
