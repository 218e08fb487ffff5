"""Redis Streams backend, worker side (blocking; runs on the worker's loop thread).

At-least-once: a job stays in the group's pending list until the script that writes its result also
acks it. Dead workers' jobs are reclaimed with XAUTOCLAIM once idle past `visibility_timeout_s`;
running jobs are kept fresh by re-claiming them (JUSTID, no delivery counted) every heartbeat, so a
long job is never mistaken for an abandoned one. Past `max_deliveries` a job is dead-lettered.
A Redis outage stalls the worker (retries with backoff) instead of killing it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.queue.base import Delivery, WorkerStats
from server.queue.redis_api import decode_hash
from server.queue.redis_keys import (
    DEAD_LETTER,
    FINISH,
    GROUP,
    HAND_BACK,
    PUBLISH,
    REFRESH,
    TOKENIZER_TTL_S,
    Keys,
)
from server.schemas import JobMessage
from server.settings import Settings

log = logging.getLogger("rvr.queue")
T = TypeVar("T")
_OUTAGE_LIMIT_S = 120.0  # a Redis gone longer than this is fatal: exit and let the pod restart


class RedisWorkerQueue:
    name = "redis"
    durable = True

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.consumer = settings.worker_name
        block_s = settings.queue_poll_ms / 1000
        self.redis = redis.Redis.from_url(
            settings.redis_url, socket_timeout=block_s + 10, socket_connect_timeout=2
        )
        self._publish = self.redis.register_script(PUBLISH)
        self._finish = self.redis.register_script(FINISH)
        self._hand_back = self.redis.register_script(HAND_BACK)
        self._dead = self.redis.register_script(DEAD_LETTER)
        self._refresh = self.redis.register_script(REFRESH)
        self._backlog: list[Delivery] = []  # reclaimed or own pending entries, taken before new ones
        self._retry(self._ensure_group)
        self._recover_own()

    # ---- plumbing ----
    def _retry(self, fn: Callable[[], T]) -> T:
        start, delay = time.monotonic(), 0.05
        while True:
            try:
                return fn()
            except (RedisConnectionError, RedisTimeoutError) as exc:
                if time.monotonic() - start > _OUTAGE_LIMIT_S:
                    raise
                log.warning("redis unreachable (%s); retrying", exc)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._ensure_group()  # the group was lost with Redis' data: recreate and retry

    def _ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.keys.stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _recover_own(self) -> None:
        """A restarted worker (same stable name) first takes back what it held before."""
        reply = self._retry(
            lambda: self.redis.xreadgroup(GROUP, self.consumer, {self.keys.stream: "0"}, count=1000)
        )
        entries = [e for _s, es in reply or [] for e in es]
        if not entries:
            return
        # Redis' real delivery count (the re-read above counted one): a job that killed this
        # worker on every run (OOM kill, segfault) must reach the cap, not come back forever.
        pending = self._retry(
            lambda: self.redis.xpending_range(
                self.keys.stream, GROUP, "-", "+", len(entries), consumername=self.consumer
            )
        )
        counts = {p["message_id"].decode(): int(p["times_delivered"]) for p in pending}
        for entry, fields in entries:
            entry_id = entry.decode()
            deliveries = counts.get(entry_id, self.settings.max_deliveries + 1)
            if deliveries > self.settings.max_deliveries:
                job_id = (fields or {}).get(b"id", b"?").decode()
                self._dead_letter(entry_id, job_id, "worker_crashed: delivery cap reached", deliveries)
                continue
            d = self._delivery(entry, fields, deliveries)
            if d is not None:
                self._backlog.append(d)

    def _delivery(self, entry: bytes, fields: dict | None, deliveries: int) -> Delivery | None:
        entry_id = entry.decode()
        if not fields:  # an entry deleted while pending: nothing to run
            self._retry(lambda: self.redis.xack(self.keys.stream, GROUP, entry_id))
            return None
        try:
            msg = JobMessage.model_validate_json(fields[b"msg"])
        except (ValidationError, KeyError) as exc:
            job_id = fields.get(b"id", b"?").decode()
            self._dead_letter(entry_id, job_id, f"unreadable job message: {type(exc).__name__}", deliveries)
            return None
        return Delivery(msg=msg, ref=entry_id, deliveries=deliveries)

    # ---- protocol ----
    def take(self, n: int, block_s: float) -> list[Delivery]:
        out, self._backlog = self._backlog[:n], self._backlog[n:]
        if len(out) >= n:
            return out
        block = int(block_s * 1000) if block_s > 0 and not out else None
        reply = self._retry(
            lambda: self.redis.xreadgroup(
                GROUP, self.consumer, {self.keys.stream: ">"}, count=n - len(out), block=block
            )
        )
        for _s, entries in reply or []:
            out += [d for d in (self._delivery(e, f, 1) for e, f in entries) if d]
        return out

    def wake(self) -> None:
        """Nothing to interrupt: a blocking read lasts at most `queue_poll_ms`, then the loop sees the drain."""
        return None

    def input_image(self, job_id: str) -> bytes | None:
        return self._retry(lambda: self.redis.get(self.keys.input(job_id)))

    def record(self, job_id: str) -> dict[str, str] | None:
        raw = self._retry(lambda: self.redis.hgetall(self.keys.job(job_id)))
        return decode_hash(raw) if raw else None

    def cancelled(self, job_ids: list[str]) -> set[str]:
        flags = self._retry(lambda: self.redis.mget([self.keys.cancel(i) for i in job_ids]))
        return {i for i, f in zip(job_ids, flags, strict=True) if f is not None}

    def publish(self, job_id: str, etype: str, data: dict, fields: dict[str, str] | None = None) -> None:
        self.publish_many([(job_id, etype, data, fields)])

    def publish_many(self, items: list[tuple[str, str, dict, dict[str, str] | None]]) -> None:
        def run() -> None:
            pipe = self.redis.pipeline(transaction=False)
            for job_id, etype, data, fields in items:
                flat = [x for kv in (fields or {}).items() for x in kv]
                args = [
                    etype,
                    json.dumps(data),
                    self.settings.events_maxlen,
                    self.settings.result_ttl_s,
                    *flat,
                ]
                self._publish(keys=[self.keys.job(job_id), self.keys.events(job_id)], args=args, client=pipe)
            pipe.execute()

        self._retry(run)

    def _end(self, d: Delivery, etype: str, data: dict, fields: dict[str, str], result: bytes | None) -> bool:
        i = d.msg.id
        keys = [
            self.keys.stream,
            self.keys.job(i),
            self.keys.events(i),
            self.keys.result(i),
            self.keys.input(i),
            self.keys.cancel(i),
        ]
        flat = [x for kv in fields.items() for x in kv]
        args = [
            GROUP,
            d.ref,
            etype,
            json.dumps(data),
            self.settings.events_maxlen,
            self.settings.result_ttl_s,
        ]
        args += [result or b"", "1" if result is not None else "0", *flat]
        return bool(self._retry(lambda: self._finish(keys=keys, args=args)))

    def complete(self, d: Delivery, result: bytes, data: dict, fields: dict[str, str]) -> bool:
        return self._end(d, "completed", data, fields, result)

    def terminate(self, d: Delivery, etype: str, data: dict, fields: dict[str, str]) -> None:
        self._end(d, etype, data, fields, None)

    def hand_back(self, d: Delivery) -> None:
        keys = [self.keys.stream, self.keys.job(d.msg.id), self.keys.events(d.msg.id)]
        args = [GROUP, d.ref, d.msg.id, d.msg.model_dump_json(), self.settings.events_maxlen]
        self._retry(lambda: self._hand_back(keys=keys, args=args))

    def refresh(self, deliveries: list[Delivery], stats: WorkerStats) -> None:
        refs = [d.ref for d in deliveries + self._backlog]
        now = time.time()
        beat = json.dumps(
            {
                "ts": now,
                "step_s": stats.step_s,
                "job_s": stats.job_s,
                "slots": stats.slots,
                "capabilities": stats.capabilities,
            }
        )
        caps = stats.capabilities or {}

        def run() -> None:
            pipe = self.redis.pipeline(transaction=False)
            if refs:
                # Reset idle time of what this worker still owns, without counting a delivery.
                self._refresh(keys=[self.keys.stream], args=[GROUP, self.consumer, *refs], client=pipe)
            pipe.hset(self.keys.workers, self.consumer, beat)
            if caps.get("tokenizer_hash"):
                pipe.expire(self.keys.tokenizer(caps["tokenizer_hash"]), TOKENIZER_TTL_S)
            pipe.execute()

        self._retry(run)

    def share_tokenizer(self, sha256: str, tokenizer_json: str) -> None:
        self._retry(lambda: self.redis.set(self.keys.tokenizer(sha256), tokenizer_json, ex=TOKENIZER_TTL_S))

    def reap(self) -> tuple[int, int]:
        """XAUTOCLAIM entries idle past the visibility timeout, looping the cursor to 0-0."""
        if self._backlog:
            return 0, 0  # still working through earlier reclaims
        reclaimed = dead = 0
        cursor = "0-0"
        idle_ms = int(self.settings.visibility_timeout_s * 1000)
        while True:
            reply = self._retry(
                lambda c=cursor: self.redis.xautoclaim(
                    self.keys.stream,
                    GROUP,
                    self.consumer,
                    idle_ms,
                    start_id=c,
                    count=self.settings.max_batch_jobs,
                )
            )
            cursor = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
            for entry, fields in reply[1]:
                entry_id = entry.decode()
                info = self._retry(
                    lambda e=entry_id: self.redis.xpending_range(self.keys.stream, GROUP, e, e, 1)
                )
                deliveries = int(info[0]["times_delivered"]) if info else self.settings.max_deliveries + 1
                if deliveries > self.settings.max_deliveries:
                    job_id = (fields or {}).get(b"id", b"?").decode()
                    self._dead_letter(entry_id, job_id, "delivery cap reached", deliveries)
                    dead += 1
                    continue
                d = self._delivery(entry, fields, deliveries)
                if d is not None:
                    self._backlog.append(d)
                    reclaimed += 1
            if cursor == "0-0" or self._backlog:
                break
        if reclaimed or dead:
            log.warning("reclaimed %d job(s), dead-lettered %d", reclaimed, dead)
        return reclaimed, dead

    def _dead_letter(self, entry_id: str, job_id: str, reason: str, deliveries: int) -> None:
        keys = [self.keys.stream, self.keys.dead, self.keys.job(job_id), self.keys.events(job_id)]
        message = f"the job failed {deliveries - 1} time(s) on its worker ({reason})"
        args = [
            GROUP,
            entry_id,
            job_id,
            reason,
            deliveries,
            self.settings.events_maxlen,
            self.settings.result_ttl_s,
        ]
        args += [repr(time.time()), self.settings.dead_letter_maxlen, message]
        self._retry(lambda: self._dead(keys=keys, args=args))

    def close(self) -> None:
        self.redis.close()
