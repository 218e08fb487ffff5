"""What the waiting calls return, and the job status view. Fields the server adds later stay readable
through `view` / `raw`."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, BinaryIO


def open_image(data: BinaryIO) -> Any:
    """Bytes -> a loaded PIL image; a clear error when Pillow is not installed."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError(
            "PIL images need Pillow: pip install 'rvr-client[pil]' (the bytes are in .content)"
        ) from exc
    im = Image.open(data)
    im.load()
    return im


def scores_of(view: dict[str, Any]) -> list[float]:
    """Judge p(yes) per round: the view's `scores` where the server sends them, else its one `score`."""
    scores = view.get("scores")
    if isinstance(scores, list):
        return [float(s) for s in scores]
    score = view.get("score")
    return [float(score)] if score is not None else []


@dataclass(frozen=True)
class JobStatus:
    """`GET /v1/jobs/{id}`: the job view."""

    raw: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.raw["id"])

    @property
    def kind(self) -> str:
        return str(self.raw.get("kind", ""))

    @property
    def status(self) -> str:
        """queued, running, succeeded, failed or cancelled."""
        return str(self.raw["status"])

    @property
    def done(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")

    @property
    def position(self) -> int | None:
        return self.raw.get("position")

    @property
    def eta_s(self) -> float | None:
        return self.raw.get("eta_s")

    @property
    def step(self) -> int | None:
        return self.raw.get("step")

    @property
    def total(self) -> int | None:
        return self.raw.get("total")

    @property
    def seed(self) -> int | None:
        return self.raw.get("seed")

    @property
    def scores(self) -> list[float]:
        return scores_of(self.raw)

    @property
    def error(self) -> dict[str, str] | None:
        return self.raw.get("error")

    @property
    def links(self) -> dict[str, str]:
        return dict(self.raw.get("links", {}))


@dataclass(frozen=True)
class Result:
    """A finished refine or generate job: the image bytes as the server encoded them, and what the job
    reported (seed, judge scores per round for refine with `until_score`)."""

    job_id: str
    content: bytes
    content_type: str
    seed: int | None
    scores: list[float] = field(default_factory=list)
    view: dict[str, Any] = field(default_factory=dict)

    @property
    def score(self) -> float | None:
        """The last round's judge p(yes), when the job was judged."""
        return self.scores[-1] if self.scores else None

    @property
    def rounds(self) -> int | None:
        return self.view.get("round")

    @cached_property
    def image(self) -> Any:
        """The result as a PIL image (needs Pillow: `pip install 'rvr-client[pil]'`)."""
        return open_image(io.BytesIO(self.content))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the bytes as received (the job's output_format)."""
        with open(path, "wb") as f:
            f.write(self.content)


@dataclass(frozen=True)
class JudgeResult:
    job_id: str
    score: float
    view: dict[str, Any] = field(default_factory=dict)
