"""Submit routes: refine, generate, judge. JSON (base64 image) or multipart; 202, wait, or SSE."""

from __future__ import annotations

import time
import uuid

import anyio
from fastapi import APIRouter, Request, Response

from server.errors import InvalidInput, NotFound, Overloaded, Unavailable
from server.params import check_limits, parse_body
from server.runtime import Runtime
from server.schemas import (
    CONTENT_TYPES,
    TERMINAL_EVENTS,
    JobMessage,
    JobParams,
    JobView,
    JudgeJSON,
    JudgeParams,
    RefineJSON,
    fingerprint,
)
from server.sse import event_stream
from server.uploads import normalize_image
from server.views import ERRORS, job_view, queue_eta_s, result_response, retry_after

router = APIRouter(prefix="/v1")
_IMAGE_FIELDS = {"image": {"type": "string", "format": "binary"}}


def _body_schema(json_model: type, form_model: type, with_image: bool) -> dict:
    """Documents both body types (the route reads the body itself to accept either)."""
    form = form_model.model_json_schema(ref_template="#/components/schemas/{model}")
    form_props = dict(form["properties"])
    form_required = list(form.get("required", []))
    if with_image:
        form_props.update(_IMAGE_FIELDS)
        form_required.append("image")
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": json_model.model_json_schema()},
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": form_props, "required": form_required}
                },
            },
        },
        "parameters": [
            {"name": "wait", "in": "query", "required": False, "schema": {"type": "boolean"}},
            {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}},
            {"name": "Prefer", "in": "header", "required": False, "schema": {"type": "string"}},
        ],
    }


async def _submit(request: Request, kind: str) -> Response:
    rt: Runtime = request.app.state.rt
    s = rt.settings
    if rt.draining.is_set():
        raise Unavailable("the server is draining", headers={"Retry-After": str(s.retry_after_min_s)})
    # The gate before costly work (body, decode); the queue re-checks atomically at enqueue.
    depth = (await rt.queue.stats()).queued
    if depth >= s.max_queue_depth:
        raise Overloaded("the queue is full", headers={"Retry-After": await retry_after(rt, depth)})
    idem_key = request.headers.get("idempotency-key")
    if idem_key is not None and not 1 <= len(idem_key) <= 255:
        raise InvalidInput("Idempotency-Key: 1 to 255 characters")

    if kind == "judge":
        params, raw = await parse_body(request, JudgeParams, needs_image=True)
        job_params = JobParams(prompt=params.prompt, deadline_s=params.deadline_s)
    else:
        job_params, raw = await parse_body(request, JobParams, needs_image=kind == "refine")
    check_limits(kind, job_params, s)
    image = None
    if raw is not None:
        image = await anyio.to_thread.run_sync(
            normalize_image, raw, s.max_image_pixels, s.max_image_side, limiter=rt.decode_limiter
        )
    deadline_s = min(job_params.deadline_s or s.max_queue_wait_s, s.max_queue_wait_s)
    if await queue_eta_s(rt, depth) > deadline_s:
        # It would expire in the queue: say so now, with when to come back.
        raise Overloaded(
            "the work ahead outlasts deadline_s", headers={"Retry-After": await retry_after(rt, depth)}
        )
    msg = JobMessage.new(uuid.uuid4().hex, kind, job_params, image is not None, deadline_s)
    scoped_key = f"{request.state.client}:{idem_key}" if idem_key else None
    try:
        job_id, _ = await rt.queue.submit(
            msg, image, fingerprint(kind, job_params, image), scoped_key, s.max_queue_depth
        )
    except Overloaded as exc:
        exc.headers["Retry-After"] = await retry_after(rt, s.max_queue_depth)
        raise
    return await _answer(request, rt, job_id)


async def _answer(request: Request, rt: Runtime, job_id: str) -> Response:
    accept = request.headers.get("accept", "")
    if "text/event-stream" in accept:
        return event_stream(rt, job_id, None)
    prefer = request.headers.get("prefer", "").lower()
    if "wait" in prefer or request.query_params.get("wait", "").lower() in ("1", "true", "yes"):
        return await _wait(request, rt, job_id)
    rec = await rt.queue.get(job_id)
    if rec is None:
        raise NotFound("job expired")
    view = await job_view(rt, rec)
    return Response(
        view.model_dump_json(exclude_none=True),
        status_code=202,
        media_type="application/json",
        headers={"Location": view.links["self"]},
    )


async def _wait(request: Request, rt: Runtime, job_id: str) -> Response:
    """Hold the request until the job ends; a caller who leaves cancels the job (nobody else waits)."""
    deadline = time.monotonic() + rt.settings.max_wait_s
    after: str | None = None
    while time.monotonic() < deadline:
        for ev in await rt.queue.events(job_id, after, 1.0):
            after = ev.id
            if ev.type in TERMINAL_EVENTS:
                return await result_response(rt, job_id)
        if rt.draining.is_set():
            break
        if await request.is_disconnected():
            await rt.queue.cancel(job_id)
            return Response(status_code=499)
    rec = await rt.queue.get(job_id)
    view = await job_view(rt, rec) if rec else None
    # Still running: answer like an async submit, so the client can poll.
    return Response(
        view.model_dump_json(exclude_none=True) if view else "{}", 202, media_type="application/json"
    )


_SUBMIT_RESPONSES = {
    200: {
        "description": "`Prefer: wait`: the result (image bytes; JSON for judge). "
        "`Accept: text/event-stream`: the job's events.",
        "content": {t: {} for t in (*CONTENT_TYPES.values(), "application/json", "text/event-stream")},
    },
    202: {"model": JobView, "description": "Accepted (also a `Prefer: wait` that outlasted max_wait_s)"},
    **ERRORS,
}


@router.post(
    "/refine",
    status_code=202,
    responses=_SUBMIT_RESPONSES,
    openapi_extra=_body_schema(RefineJSON, JobParams, with_image=True),
    summary="Refine an image towards its prompt",
)
async def refine(request: Request) -> Response:
    return await _submit(request, "refine")


@router.post(
    "/generate",
    status_code=202,
    responses=_SUBMIT_RESPONSES,
    openapi_extra=_body_schema(JobParams, JobParams, with_image=False),
    summary="Generate an image from text",
)
async def generate(request: Request) -> Response:
    return await _submit(request, "generate")


@router.post(
    "/judge",
    status_code=202,
    responses=_SUBMIT_RESPONSES,
    openapi_extra=_body_schema(JudgeJSON, JudgeParams, with_image=True),
    summary="Score how well an image matches a prompt (p(yes))",
)
async def judge(request: Request) -> Response:
    return await _submit(request, "judge")
