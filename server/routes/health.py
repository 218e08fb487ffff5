"""Probes and metrics: no auth, no body. `/livez` has no dependencies; `/readyz` means "can take work"."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server.errors import ServeError
from server.runtime import Runtime

router = APIRouter()


@router.get("/livez", include_in_schema=False)
async def livez() -> dict:
    return {"status": "ok"}


@router.get("/readyz", include_in_schema=False)
async def readyz(request: Request) -> JSONResponse:
    """Ready = queue answers within 200 ms, not draining, and (in-process) the model is warm.
    Never fails on a full queue: every replica would drop out at once; submits get 503 instead."""
    rt: Runtime = request.app.state.rt
    checks = {"backend": rt.queue.name, "draining": rt.draining.is_set(), "queue": "ok"}
    try:
        await asyncio.wait_for(rt.queue.ping(), 0.2)
    except (ServeError, TimeoutError, OSError) as exc:
        checks["queue"] = f"unreachable ({type(exc).__name__})"
    if rt.worker is not None:
        checks["model"] = "ready" if rt.worker_ready() else "loading"
    ok = checks["queue"] == "ok" and not checks["draining"] and checks.get("model", "ready") == "ready"
    return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks}, 200 if ok else 503)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    rt: Runtime = request.app.state.rt
    try:
        stats = await rt.queue.stats()
        rt.metrics.queue_depth.set(stats.queued)
        rt.metrics.queue_running.set(stats.running)
        rt.metrics.queue_oldest.set(stats.oldest_wait_s)
    except ServeError:
        pass  # still serve what we have: the scrape must not fail with the queue
    return Response(rt.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
