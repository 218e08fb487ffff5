"""`torch.compile` of the per-token blocks (docs/backends.md §2, the development form of `inductor`).

Every decoder layer's `pre_attention` (input norm, q/k/v, QK-norm) and `post_attention` (o_proj, residual,
norm, MLP) is compiled with dynamic row counts; routing, RoPE, cache writes and attention (which depend on
the packed layout) stay eager, so one compiled graph serves prefill and denoise forwards of any batch.
The layers share one code object, so the graphs compile once per expert and are reused across layers
(regional compilation), keeping compile time independent of depth.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from engine.backends.base import PYTORCH_CAPABILITIES, Backend, Capabilities

if TYPE_CHECKING:
    from engine.core import Engine

# Modes that record CUDA graphs on their own; they need the explicit opt-in below.
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
_MODES = ("default", "max-autotune-no-cudagraphs", *_CUDAGRAPH_MODES)
_BLOCKS = ("pre_attention", "post_attention")


class InductorBackend(Backend):
    """Options: `mode` (a torch.compile mode), `fullgraph`, `dynamic`, `cudagraphs` (off by default).

    CUDA graphs re-record for every distinct shape (docs/backends.md §7.3), so they only pay off with
    bucketed, warmed-up shapes; `cudagraphs=True` is required for the modes that enable them.
    """

    name = "inductor"

    def __init__(
        self,
        mode: str = "default",
        *,
        fullgraph: bool = True,
        dynamic: bool = True,
        cudagraphs: bool = False,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"inductor mode must be one of {_MODES}, got {mode!r}")
        if mode in _CUDAGRAPH_MODES and not cudagraphs:
            raise ValueError(f"mode {mode!r} records CUDA graphs; pass cudagraphs=True to allow it")
        self.mode, self.fullgraph, self.dynamic, self.cudagraphs = mode, fullgraph, dynamic, cudagraphs

    def capabilities(self) -> Capabilities:
        return PYTORCH_CAPABILITIES

    def compile_options(self) -> dict[str, Any]:
        """Keyword arguments for torch.compile (mode and options are mutually exclusive there)."""
        opts: dict[str, Any] = {"backend": "inductor", "fullgraph": self.fullgraph, "dynamic": self.dynamic}
        if self.cudagraphs and self.mode not in _CUDAGRAPH_MODES:
            opts["options"] = {"triton.cudagraphs": True}
        else:
            opts["mode"] = self.mode
        return opts

    def attach(self, engine: Engine) -> None:
        """Wrap every layer's per-token blocks in place (idempotent); steps stay on the packed forward."""
        opts = self.compile_options()
        for ws in engine.weight_sets.values():
            for layer in ws.model.llm.layers:
                for block in _BLOCKS:
                    if block not in vars(layer):  # not yet wrapped (an instance attribute shadows the method)
                        setattr(layer, block, _CompiledBlock(getattr(layer, block), opts))
        return None


class _CompiledBlock:
    """A compiled per-token block that leaves 0- and 1-row calls eager.

    Dynamic shapes still specialise sizes 0 and 1, and an empty expert (e.g. no gen rows in a text-only
    prefill) is common: compiling those would add graphs (and compile time) for no work.
    """

    def __init__(self, fn: Callable[..., Any], opts: dict[str, Any]) -> None:
        self.eager = fn
        self.compiled = torch.compile(fn, **opts)

    def __call__(self, h: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # h: (rows, hidden)
        return (self.compiled if h.shape[0] > 1 else self.eager)(h, *args, **kwargs)
