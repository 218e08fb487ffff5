"""In-process queue: the default backend, API and worker in one process, no Redis.

Same protocol and semantics as Redis (admission, deadlines, cancel, events, idempotency), but not
durable: jobs die with the process and nothing is shared between replicas. One lock guards all
state; the worker thread blocks on a condition, API coroutines are woken through their loop.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field

from server.errors import IdempotencyMismatch, Overloaded
from server.queue.base import Delivery, WorkerStats, finished_fields, initial_record
from server.schemas import TERMINAL, Event, JobMessage, QueueStats


@dataclass
class _Job:
    msg: JobMessage
    record: dict[str, str]
    image: bytes | None
    events: list[Event] = field(default_factory=list)
    result: bytes | None = None
    cancel: bool = False


class MemoryQueue:
    name = "memory"
    durable = False  # nothing outlives the process; no other worker can take a job back

    def __init__(self, result_ttl_s: float = 3600.0, idempotency_ttl_s: float = 86400.0) -> None:
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._waiting: collections.deque[str] = collections.deque()
        self._jobs: dict[str, _Job] = {}
        self._idem: dict[str, tuple[str, str, float]] = {}  # key -> (job id, fingerprint, expires)
        self._expiry: collections.deque[tuple[float, str]] = collections.deque()  # finished jobs
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._running: set[str] = set()
        self._stats: WorkerStats | None = None
        self._tokenizers: dict[str, str] = {}
        self._result_ttl_s = result_ttl_s
        self._idem_ttl_s = idempotency_ttl_s

    # ---- shared helpers (lock held) ----
    def _append_event(self, job: _Job, etype: str, data: dict) -> None:
        job.events.append(Event(id=str(len(job.events) + 1), type=etype, data=data))
        for loop, ev in self._waiters.get(job.msg.id, ()):
            loop.call_soon_threadsafe(ev.set)

    def _finish(self, job: _Job, etype: str, data: dict, fields: dict[str, str]) -> None:
        job.record.update(fields)
        self._append_event(job, etype, data)
        self._running.discard(job.msg.id)
        job.image = None
        self._expiry.append((time.monotonic() + self._result_ttl_s, job.msg.id))

    def _expire(self) -> None:
        now = time.monotonic()
        while self._expiry and self._expiry[0][0] <= now:
            self._jobs.pop(self._expiry.popleft()[1], None)
        for key in [k for k, v in self._idem.items() if v[2] <= now]:
            del self._idem[key]

    # ---- API side ----
    async def ping(self) -> None:
        return None

    async def submit(
        self, msg: JobMessage, image: bytes | None, fingerprint: str, idem_key: str | None, max_depth: int
    ) -> tuple[str, bool]:
        with self._lock:
            self._expire()
            if idem_key is not None and idem_key in self._idem:
                job_id, fp, _ = self._idem[idem_key]
                if job_id in self._jobs:
                    if fp != fingerprint:
                        raise IdempotencyMismatch("Idempotency-Key reused with a different request")
                    return job_id, False
            if len(self._waiting) >= max_depth:
                raise Overloaded("queue is full")
            job = _Job(msg=msg, record=initial_record(msg, fingerprint), image=image)
            self._jobs[msg.id] = job
            if idem_key is not None:
                self._idem[idem_key] = (msg.id, fingerprint, time.monotonic() + self._idem_ttl_s)
            self._append_event(job, "queued", {"position": len(self._waiting)})
            self._waiting.append(msg.id)
            self._cv.notify()
        return msg.id, True

    async def replayed_job(self, idem_key: str) -> str | None:
        with self._lock:
            self._expire()
            entry = self._idem.get(idem_key)
            return entry[0] if entry is not None and entry[0] in self._jobs else None

    async def get(self, job_id: str) -> dict[str, str] | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return dict(job.record) if job else None

    async def position(self, job_id: str) -> int | None:
        with self._lock:
            try:
                return self._waiting.index(job_id)
            except ValueError:
                return None

    async def stats(self) -> QueueStats:
        with self._lock:
            oldest = self._jobs[self._waiting[0]].msg.enqueued_at if self._waiting else time.time()
            return QueueStats(
                queued=len(self._waiting), running=len(self._running), oldest_wait_s=time.time() - oldest
            )

    async def worker_stats(self) -> list[WorkerStats]:
        return [self._stats] if self._stats else []

    async def tokenizer_json(self, sha256: str) -> str | None:
        return self._tokenizers.get(sha256)

    async def cancel(self, job_id: str) -> dict[str, str] | None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            if job_id in self._waiting:
                self._waiting.remove(job_id)
                self._finish(job, "cancelled", {}, finished_fields("cancelled"))
            elif job.record["status"] not in TERMINAL:
                job.cancel = True  # taken by the worker: it stops at the next step boundary
                job.record["cancel_requested"] = "1"
            return dict(job.record)

    async def expire(self, job_id: str, message: str) -> bool:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job_id not in self._waiting:
                return False  # taken: the worker expires it before it reaches the engine
            self._waiting.remove(job_id)
            fields = finished_fields("failed", error_code="queue_timeout", error_message=message)
            self._finish(job, "failed", {"code": "queue_timeout", "message": message}, fields)
            return True

    async def events(self, job_id: str, after: str | None, block_s: float) -> list[Event]:
        start = int(after) if after else 0
        ev = asyncio.Event()
        key = (asyncio.get_running_loop(), ev)
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or len(job.events) > start or block_s <= 0:
                return job.events[start:] if job else []
            self._waiters.setdefault(job_id, set()).add(key)
        try:
            await asyncio.wait_for(ev.wait(), block_s)
        except TimeoutError:
            pass
        finally:
            with self._lock:
                waiters = self._waiters.get(job_id)
                if waiters is not None:
                    waiters.discard(key)
                    if not waiters:
                        del self._waiters[job_id]
        with self._lock:
            job = self._jobs.get(job_id)
            return job.events[start:] if job else []

    def valid_event_id(self, event_id: str) -> bool:
        return event_id.isdigit() and len(event_id) < 10

    async def result(self, job_id: str) -> bytes | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return job.result if job else None

    async def close(self) -> None:
        return None

    # ---- worker side ----
    def take(self, n: int, block_s: float) -> list[Delivery]:
        with self._cv:
            if not self._waiting and block_s > 0:
                self._cv.wait(block_s)
            out = []
            while self._waiting and len(out) < n:
                job = self._jobs[self._waiting.popleft()]
                self._running.add(job.msg.id)
                job.record["attempts"] = str(int(job.record["attempts"]) + 1)
                out.append(Delivery(msg=job.msg, ref=job.msg.id))
            return out

    def wake(self) -> None:
        """Unblock a worker waiting in `take` (drain)."""
        with self._cv:
            self._cv.notify_all()

    def input_image(self, job_id: str) -> bytes | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return job.image if job else None

    def record(self, job_id: str) -> dict[str, str] | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return dict(job.record) if job else None

    def cancelled(self, job_ids: list[str]) -> set[str]:
        with self._lock:
            return {i for i in job_ids if (j := self._jobs.get(i)) is not None and j.cancel}

    def publish(self, job_id: str, etype: str, data: dict, fields: dict[str, str] | None = None) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.record["status"] in TERMINAL:
                return
            if fields:
                job.record.update(fields)
            self._append_event(job, etype, data)

    def publish_many(self, items: list[tuple[str, str, dict, dict[str, str] | None]]) -> None:
        for item in items:
            self.publish(*item)

    def complete(self, d: Delivery, result: bytes, data: dict, fields: dict[str, str]) -> bool:
        with self._lock:
            job = self._jobs.get(d.msg.id)
            if job is None or job.record["status"] in TERMINAL:
                return False
            job.result = result
            job.record["completions"] = str(int(job.record["completions"]) + 1)
            self._finish(job, "completed", data, fields)
            return True

    def terminate(self, d: Delivery, etype: str, data: dict, fields: dict[str, str]) -> None:
        with self._lock:
            job = self._jobs.get(d.msg.id)
            if job is not None and job.record["status"] not in TERMINAL:
                self._finish(job, etype, data, fields)

    def share_tokenizer(self, sha256: str, tokenizer_json: str) -> None:
        self._tokenizers[sha256] = tokenizer_json

    def refresh(self, deliveries: list[Delivery], stats: WorkerStats) -> None:
        self._stats = stats

    def reap(self) -> tuple[int, int]:
        return 0, 0
