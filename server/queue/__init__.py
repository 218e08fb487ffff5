"""Queue backends behind one protocol: in-process (default) and Redis Streams (`redis_url`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.queue.base import ApiQueue, WorkerQueue
    from server.settings import Settings

__all__ = ["make_api_queue", "make_worker_queue"]


def make_api_queue(settings: Settings) -> ApiQueue:
    if settings.redis_url:
        from server.queue.redis_api import RedisApiQueue

        return RedisApiQueue(settings)
    from server.queue.memory import MemoryQueue

    return MemoryQueue(settings.result_ttl_s, settings.idempotency_ttl_s)


def make_worker_queue(settings: Settings) -> WorkerQueue:
    if not settings.redis_url:
        raise ValueError("a separate worker needs --redis-url; `rvr serve` runs the in-process worker")
    from server.queue.redis_worker import RedisWorkerQueue

    return RedisWorkerQueue(settings)
