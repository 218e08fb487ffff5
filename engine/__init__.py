"""rvr-serve engine: BAGEL-7B-MoT / RvR inference (refine, generate, edit, judge) with a step-level batch API.

Exports are lazy so that importing a light submodule (e.g. `engine.cli` for argument parsing) does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Engine": "engine.core",
    "RequestState": "engine.core",
    "StepResult": "engine.core",
    "load_engine": "engine.loading",
    "default_model_dir": "engine.loading",
    "make_checkpoint": "engine.tiny",
    "GenerationRequest": "engine.types",
    "SamplingParams": "engine.types",
    "StepEvent": "engine.types",
    "RoundOutput": "engine.types",
    "FinishedRound": "engine.types",
    "TASK_DEFAULTS": "engine.types",
    "EngineError": "engine.errors",
    "CheckpointError": "engine.errors",
    "InvalidRequestError": "engine.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
