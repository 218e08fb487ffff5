"""Load test of rvr-serve: refine submits (multipart, small PNG), status polling, SSE progress.

    pip install locust
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless \
        -u 8 -r 1 -t 10m --csv loadtests/results/$(date -u +%Y%m%d)-h100-512px-s50-u8

Environment (all optional):
    LOADTEST_API_KEY     bearer key, when the service has RVR_API_KEY_SHA256 set
    LOADTEST_SIZE        side of the generated input PNG in pixels (default 512; a multiple of 16)
    LOADTEST_STEPS       denoising steps per job (default 50, the RvR default)
    LOADTEST_POLL_S      seconds between status polls (default 1.0)
    LOADTEST_JOB_TIMEOUT_S  give up on a job after this long (default 900)
    LOADTEST_MAX_FAIL_RATIO exit non-zero when the failure ratio is above it (default 0.01)

Each user submits one job at a time and follows it to the end, so -u is the number of jobs in
flight. 503 (queue full or draining) is counted as a failure under its own name, so that
admission rejections stay visible next to real errors. Poll and stream requests are grouped under
one name per route ("/v1/jobs/[id]"), never per job id.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib

from locust import HttpUser, between, events, task

API_KEY = os.environ.get("LOADTEST_API_KEY", "")
SIZE = int(os.environ.get("LOADTEST_SIZE", "512"))
STEPS = int(os.environ.get("LOADTEST_STEPS", "50"))
POLL_S = float(os.environ.get("LOADTEST_POLL_S", "1.0"))
JOB_TIMEOUT_S = float(os.environ.get("LOADTEST_JOB_TIMEOUT_S", "900"))
MAX_FAIL_RATIO = float(os.environ.get("LOADTEST_MAX_FAIL_RATIO", "0.01"))
TERMINAL = {"succeeded", "failed", "cancelled"}
TERMINAL_EVENTS = {"completed", "failed", "cancelled", "error"}
PROMPTS = [
    "two red apples on a wooden table",
    "three blue cups in a row",
    "a red circle left of a blue square",
    "a cat sitting on a green chair",
]


def make_png(side: int) -> bytes:
    """A small RGB gradient PNG, stdlib only (no Pillow on the load generator)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = bytearray()
    for y in range(side):
        rows.append(0)  # filter: none
        for x in range(side):
            rows += bytes((x * 255 // side, y * 255 // side, 128))
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(rows), 6))
        + chunk(b"IEND", b"")
    )


PNG = make_png(SIZE)


class RefineUser(HttpUser):
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"
        self.n = 0

    def _submit(self) -> str | None:
        self.n += 1
        fields = {"prompt": PROMPTS[self.n % len(PROMPTS)], "steps": str(STEPS), "seed": str(self.n)}
        files = {"image": ("input.png", PNG, "image/png")}
        with self.client.post(
            "/v1/refine", data=fields, files=files, name="/v1/refine", catch_response=True
        ) as resp:
            if resp.status_code == 202:
                resp.success()
                return resp.json()["id"]
            label = "overloaded (503)" if resp.status_code == 503 else f"HTTP {resp.status_code}"
            resp.failure(f"{label}: {resp.text[:200]}")
            return None

    def _fire(self, name: str, started: float, exc: Exception | None = None) -> None:
        events.request.fire(
            request_type="JOB",
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=0,
            exception=exc,
            context={},
        )

    @task(3)
    def refine_and_poll(self) -> None:
        """Submit, poll the status until it ends; reports the job's end-to-end time as JOB poll."""
        started = time.perf_counter()
        job_id = self._submit()
        if job_id is None:
            return
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            time.sleep(POLL_S)
            with self.client.get(f"/v1/jobs/{job_id}", name="/v1/jobs/[id]", catch_response=True) as resp:
                if resp.status_code != 200:
                    resp.failure(f"HTTP {resp.status_code}")
                    continue
                status = resp.json()["status"]
            if status in TERMINAL:
                ok = status == "succeeded"
                self._fire("refine e2e (poll)", started, None if ok else RuntimeError(status))
                if ok:
                    self.client.get(f"/v1/jobs/{job_id}/result", name="/v1/jobs/[id]/result")
                return
        self._fire("refine e2e (poll)", started, TimeoutError(f"not done in {JOB_TIMEOUT_S}s"))

    @task(1)
    def refine_and_stream(self) -> None:
        """Submit, follow the SSE stream; reports time to first event and to the terminal event."""
        started = time.perf_counter()
        job_id = self._submit()
        if job_id is None:
            return
        first = True
        last_type = None
        outcome: Exception | None = RuntimeError("stream ended before a terminal event")
        try:
            with self.client.get(
                f"/v1/jobs/{job_id}/events",
                name="/v1/jobs/[id]/events",
                stream=True,
                timeout=JOB_TIMEOUT_S,
                headers={"Accept": "text/event-stream"},
                catch_response=True,
            ) as resp:
                if resp.status_code != 200:
                    resp.failure(f"HTTP {resp.status_code}")
                    outcome = RuntimeError(f"events: HTTP {resp.status_code}")
                else:
                    resp.success()
                    for raw in resp.iter_lines(decode_unicode=True):
                        if not raw or raw.startswith(":"):
                            continue  # keep-alive comment or event separator
                        if raw.startswith("event:"):
                            last_type = raw.split(":", 1)[1].strip()
                            if first:
                                self._fire("sse first event", started)
                                first = False
                        elif raw.startswith("data:") and last_type in TERMINAL_EVENTS:
                            data = json.loads(raw.split(":", 1)[1])
                            ok = last_type == "completed"
                            outcome = None if ok else RuntimeError(f"{last_type}: {str(data)[:200]}")
                            break
                        elif raw.startswith("retry:"):
                            outcome = RuntimeError("stream closed for a drain (retry:)")
        except Exception as exc:  # network errors and timeouts count as failures of the job
            outcome = exc
        self._fire("refine e2e (sse)", started, outcome)


@events.quitting.add_listener
def _exit_code(environment, **_kw) -> None:
    """Headless runs fail (exit 1) above LOADTEST_MAX_FAIL_RATIO, for CI-style thresholds."""
    if environment.stats.total.fail_ratio > MAX_FAIL_RATIO:
        environment.process_exit_code = 1
