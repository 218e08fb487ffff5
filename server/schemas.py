"""Wire types between the API and the workers (versioned), and the HTTP response models.

`server/worker.py` converts these to engine types and back; nothing else touches both sides.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
JobKind = Literal["refine", "generate", "judge"]
OutputFormat = Literal["png", "jpeg", "webp"]
# `cancelling`: cancel asked of a running job, which stops at its next step boundary (then `cancelled`).
JobStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
EVENT_TYPES = ("queued", "started", "progress", "preview", "completed", "failed", "cancelled")
TERMINAL_EVENTS: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class JobParams(BaseModel):
    """What a client may set. Static ranges live here (and in the OpenAPI schema); limits that are
    settings (`max_steps`, `max_prompt_chars`, ...) are checked by `server.params.check_limits`."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="What the image should show")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Fixes the output; unset: random")
    steps: int | None = Field(None, ge=2, le=1000, description="Denoising timesteps; unset: task default")
    cfg_text: float | None = Field(None, ge=0, le=100)
    cfg_img: float | None = Field(None, ge=0, le=100)
    cfg_interval: tuple[float, float] | None = Field(None, description="[lo, hi] within [0, 1]")
    renorm: Literal["global", "channel", "text_channel"] | None = None
    renorm_min: float | None = Field(None, ge=0, le=1)
    shift: float | None = Field(None, gt=0, le=100)
    rounds: int = Field(1, ge=1, le=100, description="Refine only: feed each output back as input")
    until_score: float | None = Field(
        None, ge=0, le=1, description="Refine only: stop once p(yes) reaches it"
    )
    height: int | None = Field(None, ge=16, le=16384)
    width: int | None = Field(None, ge=16, le=16384)
    output_format: OutputFormat = "png"
    preview_every: int = Field(0, ge=0, le=1000, description="Preview every N steps; 0: none")
    deadline_s: float | None = Field(None, gt=0, le=86400, description="Drop the job if not started by then")


class JudgeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    deadline_s: float | None = Field(None, gt=0, le=86400)


class RefineJSON(JobParams):
    image: str = Field(description="Base64 PNG, JPEG or WebP")


class JudgeJSON(JudgeParams):
    image: str = Field(description="Base64 PNG, JPEG or WebP")


class JobMessage(BaseModel):
    """One queue entry's payload. Small: the input image is stored beside it under its job id."""

    schema_version: int = SCHEMA_VERSION
    id: str
    kind: JobKind
    params: JobParams
    has_input: bool
    enqueued_at: float
    deadline: float

    @classmethod
    def new(cls, job_id: str, kind: str, params: JobParams, has_input: bool, deadline_s: float) -> JobMessage:
        now = time.time()
        return cls(
            id=job_id,
            kind=kind,
            params=params,
            has_input=has_input,
            enqueued_at=now,
            deadline=now + deadline_s,
        )


def fingerprint(kind: str, params: BaseModel, image: bytes | None) -> str:
    """Digest of a request's parameters and image: the same Idempotency-Key must carry the same one."""
    h = hashlib.sha256(kind.encode())
    h.update(json.dumps(params.model_dump(mode="json"), sort_keys=True).encode())
    h.update(hashlib.sha256(image or b"").digest())
    return h.hexdigest()


class Event(BaseModel):
    id: str
    type: str
    data: dict


class ErrorInfo(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorInfo


class JobView(BaseModel):
    """`GET /v1/jobs/{id}` and the 202 answer to a submit."""

    id: str
    kind: str
    status: JobStatus
    position: int | None = Field(None, description="Jobs ahead in the queue (queued)")
    eta_s: float | None = Field(None, description="Estimated seconds to completion")
    step: int | None = None
    total: int | None = None
    round: int | None = None
    rounds: int | None = None
    seed: int | None = None
    score: float | None = Field(None, description="Judge p(yes): judge jobs, and refine with until_score")
    scores: list[float] | None = Field(None, description="Refine with until_score: judge p(yes) per round")
    error: ErrorInfo | None = None
    timings: dict[str, float] | None = None
    links: dict[str, str]


class QueueStats(BaseModel):
    queued: int
    running: int
    oldest_wait_s: float
