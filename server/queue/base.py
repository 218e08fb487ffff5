"""The queue protocol both backends implement: an async side for the API, a sync side for the worker.

Job records are flat `str -> str` maps (a Redis hash) with these fields: id, kind, status, created_at,
deadline (not started by then: never runs), started_at, finished_at, steps (asked; 0: the task's default), step, total, round, rounds, seed, score, scores (JSON: p(yes) per round),
cancel_requested (1: a cancel asked of a running job), error_code, error_message, output_format, attempts, worker, timings (JSON), completions (results
written; 1 when correct).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from server.schemas import Event, JobMessage, QueueStats


@dataclass
class Delivery:
    """A job handed to a worker. `ref` acknowledges it (a stream entry id for Redis)."""

    msg: JobMessage
    ref: str
    deliveries: int = 1


@dataclass
class WorkerStats:
    """What a worker reports for ETAs and Retry-After: seconds per packed step and per job."""

    step_s: float = 0.0
    job_s: float = 0.0
    slots: int = 1
    capabilities: dict | None = None  # engine.capabilities.Capabilities.to_dict() of a loaded worker


def initial_record(msg: JobMessage, fingerprint: str) -> dict[str, str]:
    return {
        "id": msg.id,
        "kind": msg.kind,
        "status": "queued",
        "created_at": repr(msg.enqueued_at),
        "deadline": repr(msg.deadline),
        "steps": str(msg.params.steps or 0),  # 0: the task's default
        "rounds": str(msg.params.rounds),
        "output_format": msg.params.output_format,
        "attempts": "0",
        "completions": "0",
        "fingerprint": fingerprint,
    }


def finished_fields(status: str, **extra: str) -> dict[str, str]:
    return {"status": status, "finished_at": repr(time.time()), **extra}


class ApiQueue(Protocol):
    """API side. Every method may raise `server.errors.Unavailable` when the backend is unreachable."""

    name: str

    async def ping(self) -> None: ...

    async def submit(
        self, msg: JobMessage, image: bytes | None, fingerprint: str, idem_key: str | None, max_depth: int
    ) -> tuple[str, bool]:
        """Atomically: reuse the idempotency key's job, or check depth and enqueue. Returns (id, created).
        Raises Overloaded when `max_depth` jobs already wait, IdempotencyMismatch on a changed payload."""
        ...

    async def replayed_job(self, idem_key: str) -> str | None:
        """The job a scoped Idempotency-Key names, while its record lives (a replay is no new work)."""
        ...

    async def get(self, job_id: str) -> dict[str, str] | None: ...

    async def position(self, job_id: str) -> int | None:
        """Jobs ahead of a queued job, or None when it is not waiting."""
        ...

    async def stats(self) -> QueueStats: ...

    async def worker_stats(self) -> list[WorkerStats]: ...

    async def cancel(self, job_id: str) -> dict[str, str] | None:
        """Cancel: a queued job at once, a running one at the worker's next step boundary."""
        ...

    async def expire(self, job_id: str, message: str) -> bool:
        """End a job still waiting in the queue as failed `queue_timeout` (its deadline passed); False when
        it is no longer waiting."""
        ...

    async def events(self, job_id: str, after: str | None, block_s: float) -> list[Event]:
        """Events after id `after` (None: from the start); waits up to `block_s` for the first."""
        ...

    def valid_event_id(self, event_id: str) -> bool: ...

    async def result(self, job_id: str) -> bytes | None: ...

    async def tokenizer_json(self, sha256: str) -> str | None:
        """A tokenizer a worker shared (`WorkerQueue.share_tokenizer`), or None."""
        ...

    async def close(self) -> None: ...


class WorkerQueue(Protocol):
    """Worker side; blocking calls, run on the worker's own thread."""

    durable: bool  # jobs survive this worker (another can take them); else they end with it

    def take(self, n: int, block_s: float) -> list[Delivery]:
        """At most `n` jobs: reclaimed ones first, then new ones; blocks up to `block_s` when none."""
        ...

    def wake(self) -> None:
        """Make a `take` blocked on another thread return soon (drain)."""
        ...

    def input_image(self, job_id: str) -> bytes | None: ...

    def record(self, job_id: str) -> dict[str, str] | None: ...

    def cancelled(self, job_ids: list[str]) -> set[str]: ...

    def publish(self, job_id: str, etype: str, data: dict, fields: dict[str, str] | None = None) -> None:
        """Append an event and update the job record's `fields` with it."""
        ...

    def publish_many(self, items: list[tuple[str, str, dict, dict[str, str] | None]]) -> None:
        """`publish` for several jobs in one round trip (every running job's progress, each step)."""
        ...

    def complete(self, d: Delivery, result: bytes, data: dict, fields: dict[str, str]) -> bool:
        """Write result, status and `completed` event, then ack: one atomic step. False: a result
        already existed (a duplicate delivery), nothing was written, the entry is acked."""
        ...

    def terminate(self, d: Delivery, etype: str, data: dict, fields: dict[str, str]) -> None:
        """Finish a job without a result (failed / cancelled) and ack it."""
        ...

    def hand_back(self, d: Delivery) -> None:
        """Return a job to the queue for another worker (drain). Durable queues only."""
        ...

    def share_tokenizer(self, sha256: str, tokenizer_json: str) -> None:
        """Make the worker's tokenizer readable by API processes (prompt tokens counted at submit)."""
        ...

    def refresh(self, deliveries: list[Delivery], stats: WorkerStats) -> None:
        """Heartbeat: keep running jobs from looking abandoned, and publish this worker's stats."""
        ...

    def reap(self) -> tuple[int, int]:
        """Reclaim jobs of dead workers; dead-letter those over the delivery cap. (reclaimed, dead)."""
        ...
