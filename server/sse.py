"""Server-Sent Events of one job: `id:` is the queue's event id, so `Last-Event-ID` resumes anywhere."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from server.runtime import Runtime
from server.schemas import TERMINAL_EVENTS


def format_event(ev_id: str, etype: str, data: dict) -> bytes:
    return f"id: {ev_id}\nevent: {etype}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def event_stream(rt: Runtime, job_id: str, after: str | None) -> StreamingResponse:
    async def stream() -> AsyncIterator[bytes]:
        nonlocal after
        quiet_since = time.monotonic()
        while True:
            if rt.draining.is_set():
                # Tell the client to come back (to another replica) and resume with Last-Event-ID.
                yield f"retry: {rt.settings.sse_retry_ms}\n\n".encode()
                return
            events = await rt.queue.events(job_id, after, min(1.0, rt.settings.sse_heartbeat_s))
            for ev in events:
                after = ev.id
                yield format_event(ev.id, ev.type, ev.data)
                if ev.type in TERMINAL_EVENTS:
                    return
            if events:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= rt.settings.sse_heartbeat_s:
                if await rt.queue.get(job_id) is None:
                    return  # the job expired while we waited
                quiet_since = time.monotonic()
                yield b": keep-alive\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Job-Id": job_id}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)
