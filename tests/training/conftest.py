"""Fixtures for the training tests: one float32 CPU engine on a tiny random checkpoint per session."""

from __future__ import annotations

import pytest
import torch

# Tiny shapes: intra-op threads only add contention on the 2 shared cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory):
    from engine.loading import load_engine
    from engine.tiny import make_checkpoint

    return load_engine(
        make_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "tiny", seed=0),
        device="cpu",
        dtype="float32",
    )
