"""Typed boundary of the engine: what a caller (CLI, server worker) hands in and gets back.

No HTTP, queue or job concepts here; `request_id` is an opaque correlation id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from engine.errors import InvalidRequestError

if TYPE_CHECKING:
    import torch
    from PIL import Image

Task = Literal["refine", "generate", "edit"]
RenormType = Literal["global", "channel", "text_channel"]
TASKS: tuple[str, ...] = ("refine", "generate", "edit")
RENORM_TYPES: tuple[str, ...] = ("global", "channel", "text_channel")
MIN_STEPS, MAX_STEPS = 2, 1000  # `steps` (num_timesteps T) the sampler accepts


@dataclass(frozen=True)
class SamplingParams:
    """Sampler settings. `steps` is the official `num_timesteps` T: T - 1 model evaluations."""

    steps: int = 50
    cfg_text: float = 4.0
    cfg_img: float = 2.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    renorm: RenormType = "text_channel"
    renorm_min: float = 0.0
    shift: float = 3.0

    @classmethod
    def for_task(cls, task: str, **overrides) -> SamplingParams:
        """Released defaults: RvR refine, BAGEL edit, BAGEL notebook T2I (docs/rvr.md §4)."""
        base = TASK_DEFAULTS[task]
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def validate(self) -> None:
        """Raises InvalidRequestError (a ValueError) naming the first bad field."""
        if not _is_int(self.steps):
            raise InvalidRequestError(f"steps must be an integer, got {self.steps!r}")
        for name in ("cfg_text", "cfg_img", "renorm_min", "shift"):
            if not _is_number(getattr(self, name)):
                raise InvalidRequestError(f"{name} must be a number, got {getattr(self, name)!r}")
        interval = self.cfg_interval
        if not isinstance(interval, tuple | list) or len(interval) != 2 or not all(map(_is_number, interval)):
            raise InvalidRequestError(f"cfg_interval must be two numbers, got {interval!r}")
        if not MIN_STEPS <= self.steps <= MAX_STEPS:
            raise InvalidRequestError(f"steps must be in [{MIN_STEPS}, {MAX_STEPS}], got {self.steps}")
        lo, hi = self.cfg_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise InvalidRequestError(
                f"cfg_interval must satisfy 0 <= lo <= hi <= 1, got {self.cfg_interval}"
            )
        if self.renorm not in RENORM_TYPES:
            raise InvalidRequestError(f"renorm must be one of {RENORM_TYPES}, got {self.renorm!r}")
        if not 0.0 <= self.renorm_min <= 1.0:
            raise InvalidRequestError(f"renorm_min must be in [0, 1], got {self.renorm_min}")
        if not 0.0 < self.shift <= 100.0:
            raise InvalidRequestError(f"shift must be in (0, 100], got {self.shift}")
        for name in ("cfg_text", "cfg_img"):
            value = getattr(self, name)
            if not 0.0 <= value <= 100.0:
                raise InvalidRequestError(f"{name} must be in [0, 100], got {value}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


TASK_DEFAULTS: dict[str, SamplingParams] = {
    "refine": SamplingParams(cfg_text=4.0, cfg_img=2.0, cfg_interval=(0.0, 1.0), renorm="text_channel"),
    "edit": SamplingParams(cfg_text=4.0, cfg_img=2.0, cfg_interval=(0.0, 1.0), renorm="text_channel"),
    "generate": SamplingParams(cfg_text=4.0, cfg_img=1.0, cfg_interval=(0.4, 1.0), renorm="global"),
}


@dataclass
class GenerationRequest:
    """One image request. `image` is the misaligned image (refine) or the image to edit (edit)."""

    task: Task
    prompt: str
    image: Image.Image | None = None
    params: SamplingParams | None = None  # None: the task's released defaults
    seed: int | None = None  # None: a random seed, reported back in the output
    height: int | None = None  # None: the input's VAE-rule size (refine/edit) or 1024 (generate)
    width: int | None = None
    rounds: int = 1  # refine only: feed each output back as the next input
    until_score: float | None = None  # refine only: stop once the judge's p(yes) >= until_score
    request_id: str = ""
    # Carried between rounds so round k+1 continues the seed's random stream.
    generator: torch.Generator | None = field(default=None, repr=False)
    round_index: int = 1


@dataclass(frozen=True)
class StepEvent:
    """Progress of one request after one denoising step (`step` of `total`, 1-based)."""

    request_id: str
    round_index: int
    rounds: int
    step: int
    total: int


@dataclass(frozen=True)
class FinishedRound:
    """A decoded round (`Engine.finish`): its image, and the request and noise stream it came from."""

    request: GenerationRequest
    image: Image.Image
    generator: torch.Generator = field(repr=False)  # continues the seed's stream in a next round
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def seed(self) -> int:
        assert self.request.seed is not None  # validated requests always carry their seed
        return self.request.seed

    @property
    def round_index(self) -> int:
        return self.request.round_index


@dataclass(frozen=True)
class RoundOutput:
    """The decoded image of one finished round. `next_request` is set when another round follows."""

    request_id: str
    image: Image.Image
    round_index: int
    seed: int
    score: float | None  # judge p(yes) when `until_score` was asked
    done: bool
    next_request: GenerationRequest | None = None
    timings: dict[str, float] = field(default_factory=dict)
