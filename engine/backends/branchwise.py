"""Running an engine's denoise steps one request and one CFG branch at a time (the `DenoiseStep` unit).

Backends that compile the exported `DenoiseStep` (TensorRT) cannot take the engine's packed varlen
forward, so they install per-branch velocity functions through `Engine.branch_steps`: the engine keeps
the guidance, combination and Euler update, and calls the step once per active branch. Prefill stays on
the engine's packed eager path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch

from engine.backends.base import ShapeBucket, select_bucket
from engine.backends.export import branch_inputs

if TYPE_CHECKING:
    from engine.batching import Engine, RequestState

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


def install_branchwise_denoise(engine: Engine, steps: Mapping[str, StepFn]) -> None:
    """Make `engine.step` run each weight set's denoise through `steps[weight_set_name]`, branch by branch."""
    missing = set(engine.weight_sets) - set(steps)
    if missing:
        raise ValueError(f"no step function for weight sets {sorted(missing)}")
    for name, step in steps.items():
        engine.branch_steps[name] = functools.partial(_branch_velocity, step)


def _branch_velocity(step: StepFn, state: RequestState, branch: str) -> torch.Tensor:
    return step(*branch_inputs(state, branch))
