"""The reference backend: the engine as written (packed varlen forwards, eager PyTorch)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.backends.base import PYTORCH_CAPABILITIES, Backend, Capabilities

if TYPE_CHECKING:
    from engine.core import Engine


class EagerBackend(Backend):
    name = "eager"

    def capabilities(self) -> Capabilities:
        return PYTORCH_CAPABILITIES

    def attach(self, engine: Engine) -> None:
        """Nothing to do: every other backend is checked against this one."""
        return None
