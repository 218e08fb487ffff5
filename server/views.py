"""Job records -> HTTP answers: status views with ETAs, result responses, Retry-After, error docs."""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import Response

from server.errors import JobCancelled, JobNotFinished, NotFound, job_failure
from server.runtime import Runtime
from server.schemas import CONTENT_TYPES, TERMINAL, ErrorBody, JobView

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "Image over the pixel limit, or an unparsable body",
        401: "Missing or wrong bearer token",
        404: "Unknown or expired job",
        409: "Job not finished, or cancelled",
        413: "Body over the upload limit",
        415: "Image type outside PNG/JPEG/WebP, or another body type",
        422: "Invalid fields",
        503: "Queue full or draining; see Retry-After",
        504: "Deadline passed while queued (wait mode)",
    }.items()
}


async def queue_eta_s(rt: Runtime, ahead: int) -> float:
    """Seconds until a job behind `ahead` others is done: (ahead / slots + 1) x measured job time.
    0.0 until a worker has measured a job."""
    stats = await rt.queue.worker_stats()
    slots = sum(w.slots for w in stats) or 1
    return (ahead / slots + 1) * max((w.job_s for w in stats), default=0.0)


def planned_evaluations(rec: dict[str, str]) -> int:
    """Model evaluations a queued job will run: (steps - 1) per round x rounds; one for judge."""
    if rec["kind"] == "judge":
        return 1
    from engine.types import TASK_DEFAULTS  # plain dataclasses; no torch

    steps = int(rec.get("steps") or 0) or TASK_DEFAULTS[rec["kind"]].steps
    return (steps - 1) * int(rec.get("rounds") or 1)


async def queued_job_eta_s(rt: Runtime, ahead: int, rec: dict[str, str]) -> float:
    """Seconds until a queued job is done: the jobs ahead (ahead / slots x measured job time), then its
    own evaluations x the measured step time (job time until a step is measured). 0.0 before any
    measurement."""
    stats = await rt.queue.worker_stats()
    slots = sum(w.slots for w in stats) or 1
    job_s = max((w.job_s for w in stats), default=0.0)
    step_s = max((w.step_s for w in stats), default=0.0)
    own = planned_evaluations(rec) * step_s if step_s else job_s
    return ahead / slots * job_s + own


async def retry_after(rt: Runtime, ahead: int) -> str:
    s = rt.settings
    eta = await queue_eta_s(rt, ahead)
    return str(int(min(max(math.ceil(eta), s.retry_after_min_s), s.retry_after_max_s)))


async def job_view(rt: Runtime, rec: dict[str, str]) -> JobView:
    job_id = rec["id"]
    status = rec["status"]
    links = {"self": f"/v1/jobs/{job_id}", "events": f"/v1/jobs/{job_id}/events"}
    view: dict[str, Any] = {"id": job_id, "kind": rec["kind"], "status": status, "links": links}
    for name in ("step", "total", "round", "rounds", "seed"):
        if rec.get(name):
            view[name] = int(rec[name])
    if rec.get("score"):
        view["score"] = float(rec["score"])
    if rec.get("scores"):
        view["scores"] = json.loads(rec["scores"])
    if status not in TERMINAL and rec.get("cancel_requested"):
        view["status"] = "cancelling"  # no ETA: it stops at the next step boundary
    elif status == "queued":
        view["position"] = await rt.queue.position(job_id)
        if view["position"] is not None:
            view["eta_s"] = await queued_job_eta_s(rt, view["position"], rec) or None
    elif status == "running" and "total" in view:
        step_s = max((w.step_s for w in await rt.queue.worker_stats()), default=0.0)
        rounds_left = max(0, view.get("rounds", 1) - view.get("round", 1))
        view["eta_s"] = (view["total"] - view.get("step", 0) + rounds_left * view["total"]) * step_s or None
    elif status == "succeeded":
        links["result"] = f"/v1/jobs/{job_id}/result"
        if rec.get("timings"):
            view["timings"] = json.loads(rec["timings"])
    elif status == "failed":
        view["error"] = {"code": rec.get("error_code", "internal"), "message": rec.get("error_message", "")}
    if status not in TERMINAL and view["status"] != "cancelling":
        links["cancel"] = f"/v1/jobs/{job_id}"
    return JobView(**view)


async def finished_result(rt: Runtime, job_id: str) -> tuple[dict[str, str], bytes]:
    """(record, result bytes) of a succeeded job; the error a caller gets for any other state."""
    rec = await rt.queue.get(job_id)
    if rec is None:
        raise NotFound("unknown or expired job")
    status = rec["status"]
    if status == "failed":
        raise job_failure(rec.get("error_code", "generation_failed"), rec.get("error_message", ""), job_id)
    if status == "cancelled":
        raise JobCancelled("the job was cancelled", job_id=job_id)
    if status != "succeeded":
        raise JobNotFinished(f"the job is {status}", job_id=job_id)
    body = await rt.queue.result(job_id)
    if body is None:
        raise NotFound("the result expired")
    return rec, body


async def result_response(rt: Runtime, job_id: str) -> Response:
    rec, body = await finished_result(rt, job_id)
    media = "application/json" if rec["kind"] == "judge" else CONTENT_TYPES[rec.get("output_format", "png")]
    headers = {"X-Job-Id": job_id}
    if rec.get("seed"):
        headers["X-Seed"] = rec["seed"]
    if rec.get("score"):
        headers["X-Score"] = rec["score"]
    return Response(body, media_type=media, headers=headers)
