"""Submit routes: refine, generate, judge. JSON (base64 image) or multipart; 202, wait, or SSE."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.errors import NotFound
from server.params import parse_body
from server.runtime import Runtime
from server.schemas import CONTENT_TYPES, JobParams, JobView, JudgeJSON, JudgeParams, RefineJSON
from server.sse import event_stream
from server.submission import admission_gate, enqueue, idempotency_key, wait_for_end
from server.views import ERRORS, job_view, result_response

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
    depth = await admission_gate(request, rt)
    idem_key = idempotency_key(request)
    if kind == "judge":
        params, raw = await parse_body(request, JudgeParams, needs_image=True)
        job_params = JobParams(prompt=params.prompt, deadline_s=params.deadline_s)
    else:
        job_params, raw = await parse_body(request, JobParams, needs_image=kind == "refine")
    job_id = await enqueue(request, rt, kind, job_params, raw, depth, idem_key)
    return await _answer(request, rt, job_id)


async def _answer(request: Request, rt: Runtime, job_id: str) -> Response:
    accept = request.headers.get("accept", "")
    if "text/event-stream" in accept:
        return event_stream(rt, job_id, None)
    prefer = request.headers.get("prefer", "").lower()
    if "wait" in prefer or request.query_params.get("wait", "").lower() in ("1", "true", "yes"):
        outcome = await wait_for_end(request, rt, job_id)
        if outcome == "ended":
            return await result_response(rt, job_id)
        if outcome == "left":
            return Response(status_code=499)
        # Still running: answer like an async submit, so the client can poll.
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
