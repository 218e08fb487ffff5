"""The one submit path every front end shares (native `/v1/*` routes and the OpenAI-compatible ones):
admission gate, validation, image normalisation, deadline check, enqueue; and waiting for a job's end."""

from __future__ import annotations

import math
import time
import uuid
from typing import Literal

import anyio
from starlette.requests import Request

from server.capabilities import current_info, prompt_tokens
from server.errors import InvalidInput, Overloaded, Unavailable, job_failure
from server.params import check_limits, check_prompt_tokens
from server.runtime import Runtime
from server.schemas import TERMINAL_EVENTS, JobMessage, JobParams, fingerprint
from server.uploads import normalize_image
from server.views import queue_eta_s, retry_after


async def admission_gate(request: Request, rt: Runtime) -> int | None:
    """503 before costly work (body, decode) when draining or full; returns the queue depth seen, or
    None for a replay (an Idempotency-Key whose job lives: it adds no work, so a full queue does not
    refuse it). The queue re-checks atomically at enqueue."""
    s = rt.settings
    if rt.draining.is_set():
        raise Unavailable("the server is draining", headers={"Retry-After": str(s.retry_after_min_s)})
    scoped_key = scoped_idempotency_key(request, idempotency_key(request))
    if scoped_key is not None and await rt.queue.replayed_job(scoped_key) is not None:
        return None
    depth = (await rt.queue.stats()).queued
    if depth >= s.max_queue_depth:
        raise Overloaded("the queue is full", headers={"Retry-After": await retry_after(rt, depth)})
    return depth


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= 255:
        raise InvalidInput("Idempotency-Key: 1 to 255 characters")
    return key


def scoped_idempotency_key(request: Request, idem_key: str | None) -> str | None:
    """Keys are per client: one client's key never names another's job."""
    return f"{request.state.client}:{idem_key}" if idem_key else None


async def enqueue(
    request: Request,
    rt: Runtime,
    kind: str,
    params: JobParams,
    raw_image: bytes | None,
    depth: int | None,
    idem_key: str | None,
) -> str:
    """Validated parameters and raw upload -> a queued job id (the existing one for a repeated
    Idempotency-Key with the same payload). `depth` is admission_gate's answer (None: a replay)."""
    s = rt.settings
    info = await current_info(rt)
    check_limits(kind, params, info.limits)
    check_prompt_tokens(await prompt_tokens(rt, info, params.prompt), info.limits)
    image = None
    if raw_image is not None:
        image = await anyio.to_thread.run_sync(
            normalize_image, raw_image, s.max_image_pixels, s.max_image_side, limiter=rt.decode_limiter
        )
    deadline_s = min(params.deadline_s or s.max_queue_wait_s, s.max_queue_wait_s)
    if depth is not None and await queue_eta_s(rt, depth) > deadline_s:
        # It would expire in the queue: say so now, with when to come back.
        raise Overloaded(
            "the work ahead outlasts deadline_s", headers={"Retry-After": await retry_after(rt, depth)}
        )
    msg = JobMessage.new(uuid.uuid4().hex, kind, params, image is not None, deadline_s)
    scoped_key = scoped_idempotency_key(request, idem_key)
    try:
        job_id, _ = await rt.queue.submit(
            msg, image, fingerprint(kind, params, image), scoped_key, s.max_queue_depth
        )
    except Overloaded as exc:
        exc.headers["Retry-After"] = await retry_after(rt, s.max_queue_depth)
        raise
    return job_id


WaitOutcome = Literal["ended", "timeout", "left"]


async def wait_for_end(request: Request, rt: Runtime, job_id: str) -> WaitOutcome:
    """Hold until the job ends (`ended`), `max_wait_s` passes or the server drains (`timeout`), or the
    caller leaves (`left`: the job is cancelled, since nobody else waits for it). A job still queued when
    its deadline passes raises the 504 `queue_timeout` at once (it will never run: the worker ends it
    failed with that code when it reaches it), instead of holding the caller until a slot frees."""
    deadline = time.monotonic() + rt.settings.max_wait_s
    rec = await rt.queue.get(job_id)
    job_deadline = float(rec["deadline"]) if rec and rec.get("deadline") else math.inf
    after: str | None = None
    while time.monotonic() < deadline:
        block_s = min(1.0, max(0.05, job_deadline - time.time()))
        for ev in await rt.queue.events(job_id, after, block_s):
            after = ev.id
            if ev.type in TERMINAL_EVENTS:
                return "ended"
        if time.time() > job_deadline:
            rec = await rt.queue.get(job_id)
            if rec is not None and rec["status"] == "queued":
                message = "the job's deadline passed before it started"
                await rt.queue.expire(job_id, message)
                raise job_failure("queue_timeout", message, job_id)
            job_deadline = math.inf  # it started in time: wait for its end
        if rt.draining.is_set():
            break
        if await request.is_disconnected():
            await rt.queue.cancel(job_id)
            return "left"
    return "timeout"
