"""Redis Streams backend, API side (asyncio). Any number of API replicas share one Redis."""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError as RedisOutOfMemoryError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.errors import IdempotencyMismatch, Overloaded, Unavailable
from server.queue.base import WorkerStats, initial_record
from server.queue.redis_keys import CANCEL, EXPIRE_QUEUED, GROUP, POSITION, SUBMIT, Keys
from server.schemas import Event, JobMessage, QueueStats
from server.settings import Settings

T = TypeVar("T")
_EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


def decode_hash(raw: Any) -> dict[str, str]:
    if isinstance(raw, dict):
        return {k.decode(): v.decode() for k, v in raw.items()}
    it = iter(raw)  # a flat [k, v, ...] list from a script
    return {k.decode(): v.decode() for k, v in zip(it, it, strict=True)}


def stream_ms(entry_id: str) -> float:
    return int(entry_id.split("-")[0]) / 1000


def _unavailable(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Redis down or slow -> 503 `unavailable` (and /readyz fails); Redis at `maxmemory` -> 503
    `overloaded` (retry later, once jobs finish and their entries expire); never a 500."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return await fn(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise Unavailable("the queue is unreachable", headers={"Retry-After": "1"}) from exc
        except RedisOutOfMemoryError as exc:
            raise Overloaded("the queue's store is full", headers={"Retry-After": "5"}) from exc

    return wrapper


class RedisApiQueue:
    name = "redis"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.redis = aioredis.Redis.from_url(
            settings.redis_url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=10
        )
        self._submit = self.redis.register_script(SUBMIT)
        self._position = self.redis.register_script(POSITION)
        self._cancel = self.redis.register_script(CANCEL)
        self._expire_queued = self.redis.register_script(EXPIRE_QUEUED)
        # Records outlive a queued job's longest wait, then the result's TTL.
        self._job_ttl = int(settings.max_queue_wait_s + settings.result_ttl_s + settings.drain_timeout_s + 60)

    @_unavailable
    async def ping(self) -> None:
        await self.redis.ping()

    @_unavailable
    async def submit(
        self, msg: JobMessage, image: bytes | None, fingerprint: str, idem_key: str | None, max_depth: int
    ) -> tuple[str, bool]:
        record = initial_record(msg, fingerprint)
        flat = [x for kv in record.items() for x in kv]
        keys = [self.keys.stream, self.keys.job(msg.id), self.keys.events(msg.id), self.keys.input(msg.id)]
        keys.append(self.keys.idem(idem_key) if idem_key else self.keys.idem("-"))
        args = [GROUP, max_depth, msg.id, msg.model_dump_json(), fingerprint, self._job_ttl]
        args += [
            self.settings.idempotency_ttl_s,
            "1" if idem_key else "0",
            image or b"",
            self.settings.events_maxlen,
        ]
        args += [repr(time.time()), self.settings.key_prefix, *flat]
        outcome, value = await self._submit(keys=keys, args=args)
        outcome, value = outcome.decode(), value.decode()
        if outcome == "full":
            raise Overloaded("the queue is full")
        if outcome == "mismatch":
            raise IdempotencyMismatch("Idempotency-Key reused with a different request")
        return value, outcome == "created"

    @_unavailable
    async def replayed_job(self, idem_key: str) -> str | None:
        prev = await self.redis.get(self.keys.idem(idem_key))
        if prev is None:
            return None
        job_id = prev.decode().split(" ", 1)[0]
        return job_id if await self.redis.exists(self.keys.job(job_id)) else None

    @_unavailable
    async def get(self, job_id: str) -> dict[str, str] | None:
        raw = await self.redis.hgetall(self.keys.job(job_id))
        return decode_hash(raw) if raw else None

    @_unavailable
    async def position(self, job_id: str) -> int | None:
        entry = await self.redis.hget(self.keys.job(job_id), "stream_id")
        if entry is None:
            return None
        return int(await self._position(keys=[self.keys.stream], args=[GROUP, entry]))

    async def _group(self) -> dict[str, Any] | None:
        try:
            groups = await self.redis.xinfo_groups(self.keys.stream)
        except aioredis.ResponseError:
            return None  # no stream yet
        for g in groups:
            if g["name"] in (GROUP, GROUP.encode()):
                return g
        return None

    @_unavailable
    async def stats(self) -> QueueStats:
        g = await self._group()
        if g is None:
            return QueueStats(queued=0, running=0, oldest_wait_s=0.0)
        last = g["last-delivered-id"]
        last = last.decode() if isinstance(last, bytes) else last
        lag = g.get("lag")
        # Redis 7 keeps the group's lag in O(1); count entries only when it cannot (NULL).
        count = 1 if isinstance(lag, int) else self.settings.max_queue_depth + 1
        waiting = await self.redis.xrange(self.keys.stream, f"({last}", "+", count=count)
        queued = lag if isinstance(lag, int) else len(waiting)
        oldest = time.time() - stream_ms(waiting[0][0].decode()) if waiting else 0.0
        return QueueStats(queued=queued, running=int(g["pending"]), oldest_wait_s=max(0.0, oldest))

    @_unavailable
    async def worker_stats(self) -> list[WorkerStats]:
        fresh = time.time() - max(30.0, 5 * self.settings.heartbeat_interval_s)
        out = []
        for raw in (await self.redis.hgetall(self.keys.workers)).values():
            d = json.loads(raw)
            if d.get("ts", 0) >= fresh:
                stats = WorkerStats(d["step_s"], d["job_s"], d["slots"], d.get("capabilities"))
                out.append(stats)
        return out

    @_unavailable
    async def tokenizer_json(self, sha256: str) -> str | None:
        raw = await self.redis.get(self.keys.tokenizer(sha256))
        return raw.decode() if raw is not None else None

    @_unavailable
    async def cancel(self, job_id: str) -> dict[str, str] | None:
        keys = [self.keys.job(job_id), self.keys.cancel(job_id), self.keys.events(job_id)]
        raw = await self._cancel(
            keys=keys, args=[self.settings.result_ttl_s, repr(time.time()), self.settings.events_maxlen]
        )
        return decode_hash(raw) if raw else None

    @_unavailable
    async def expire(self, job_id: str, message: str) -> bool:
        s = self.settings
        data = json.dumps({"code": "queue_timeout", "message": message})
        args = [s.result_ttl_s, repr(time.time()), s.events_maxlen, message, data]
        keys = [self.keys.job(job_id), self.keys.events(job_id)]
        return bool(await self._expire_queued(keys=keys, args=args))

    @_unavailable
    async def events(self, job_id: str, after: str | None, block_s: float) -> list[Event]:
        block = int(block_s * 1000) if block_s > 0 else None
        reply = await self.redis.xread({self.keys.events(job_id): after or "0-0"}, count=200, block=block)
        out = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                data = json.loads(fields[b"data"])
                out.append(Event(id=entry_id.decode(), type=fields[b"type"].decode(), data=data))
        return out

    def valid_event_id(self, event_id: str) -> bool:
        return bool(_EVENT_ID.match(event_id))

    @_unavailable
    async def result(self, job_id: str) -> bytes | None:
        return await self.redis.get(self.keys.result(job_id))

    async def close(self) -> None:
        await self.redis.aclose()
