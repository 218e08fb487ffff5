"""Fixtures for the backend tests: fresh tiny engines (backends mutate them) and one refine request."""

from __future__ import annotations

import pytest
import torch

from engine.types import GenerationRequest, SamplingParams
from tests.engine.conftest import random_image

BUCKET_ARGS = ((1, 16, 64), (1, 48, 256))  # ShapeBucket args covering every tiny request (N <= 64)


class IndexRouted(torch.nn.Module):
    """MoT routing in the reference's index form (`out[idx] = ...`): what the static-routing guards catch."""

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        out[idx] = x[idx] * 2
        return out


def refine_request(steps: int = 4) -> GenerationRequest:
    """A refine request whose gen branch has N = 24 latents and three active CFG branches."""
    params = SamplingParams.for_task("refine", steps=steps)
    return GenerationRequest("refine", "a red bicycle", random_image(100, 70, 1), params, seed=1)


def fresh_engine(ckpt, backend: str = "eager", **backend_options):
    from engine.loading import load_engine

    return load_engine(
        ckpt, device="cpu", attention="reference", backend=backend, backend_options=backend_options
    )


def run_refine(engine) -> torch.Tensor:
    """Final latents (N, C) of `refine_request()` through the engine's batch API."""
    [state] = engine.prepare([refine_request()])
    while not state.done:
        engine.step([state])
    engine.release(state)
    return state.x


@pytest.fixture(scope="package")
def eager_latents(tiny_ckpt) -> torch.Tensor:
    return run_refine(fresh_engine(tiny_ckpt))


@pytest.fixture(scope="package")
def step_module(tiny_ckpt):
    """The rvr weight set's DenoiseStep of an untouched engine (read-only)."""
    from engine.backends.export import DenoiseStep

    return DenoiseStep.from_engine(fresh_engine(tiny_ckpt), "rvr")
