"""Job routes: status, events (SSE, resumable), result, cancel."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from server.errors import BadRequest, NotFound
from server.runtime import Runtime
from server.schemas import CONTENT_TYPES, JobView
from server.sse import event_stream
from server.views import ERRORS, job_view, result_response

router = APIRouter(prefix="/v1")


def _rt(request: Request) -> Runtime:
    return request.app.state.rt


async def _record(rt: Runtime, job_id: str) -> dict[str, str]:
    if not (1 <= len(job_id) <= 64 and job_id.isalnum()):
        raise NotFound("unknown or expired job")
    rec = await rt.queue.get(job_id)
    if rec is None:
        raise NotFound("unknown or expired job")
    return rec


@router.get("/jobs/{job_id}", response_model=JobView, response_model_exclude_none=True, responses=ERRORS)
async def get_job(job_id: str, request: Request) -> JobView:
    rt = _rt(request)
    return await job_view(rt, await _record(rt, job_id))


@router.get(
    "/jobs/{job_id}/events",
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}, **ERRORS},
)
async def job_events(job_id: str, request: Request) -> StreamingResponse:
    rt = _rt(request)
    await _record(rt, job_id)
    after = request.headers.get("last-event-id") or request.query_params.get("last_event_id") or None
    if after is not None and not rt.queue.valid_event_id(after):
        raise BadRequest("Last-Event-ID is not an event id of this server")
    return event_stream(rt, job_id, after)


@router.get(
    "/jobs/{job_id}/result",
    responses={
        200: {
            "content": {t: {} for t in (*CONTENT_TYPES.values(), "application/json")},
            "description": "Image",
        },
        **ERRORS,
    },
)
async def job_result(job_id: str, request: Request) -> Response:
    rt = _rt(request)
    await _record(rt, job_id)
    return await result_response(rt, job_id)


@router.delete("/jobs/{job_id}", response_model=JobView, response_model_exclude_none=True, responses=ERRORS)
async def cancel_job(job_id: str, request: Request) -> JobView:
    rt = _rt(request)
    await _record(rt, job_id)
    rec = await rt.queue.cancel(job_id)
    if rec is None:
        raise NotFound("unknown or expired job")
    return await job_view(rt, rec)
