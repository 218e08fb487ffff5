"""The asyncio client: `_sync.py`'s logic over `httpx.AsyncClient`; keep them in step."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from rvr_client import _protocol as proto
from rvr_client.errors import ConnectionFailed, RvrError, WaitTimeout, job_error
from rvr_client.events import Event, FailedEvent, SSEDecoder
from rvr_client.results import JobStatus, JudgeResult, Result
from rvr_client.retry import RetryPolicy

ProgressCallback = Callable[[Event], Any]


class AsyncClient:
    """`Client` for asyncio: the same methods, awaitable; `Job.events()` is an async iterator and
    `on_progress` may be a coroutine function.

    Example::

        async with AsyncClient("http://127.0.0.1:8000") as rvr:
            out = await rvr.refine("in.png", "two red apples", seed=42)
            job = await rvr.submit_generate("a blue cup")
            async for event in job.events(): ...

    `base_url` and `api_key` default to `RVR_BASE_URL` / `RVR_API_KEY`. `timeout` bounds each HTTP
    exchange (connect, and each read: event streams get a keep-alive every 15 s); waiting calls take
    their own `timeout` for the whole job.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url, api_key = proto.base_url_and_key(base_url, api_key)
        self.retry = retry or RetryPolicy()
        self._headers = proto.default_headers(api_key)
        self._own_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=timeout)

    # ---- lifecycle ----
    async def close(self) -> None:
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- waiting calls ----
    async def refine(
        self,
        image: Any,
        prompt: str,
        *,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> Result:
        """Refine `image` (path, bytes, binary file or PIL image) towards `prompt` and wait for the
        result. `params` are the API's fields (seed, steps, rounds, until_score, output_format, ...)."""
        job = await self.submit_refine(image, prompt, idempotency_key=idempotency_key, **params)
        return await job._wait_abandoning(timeout, on_progress)  # type: ignore[return-value]

    async def generate(
        self,
        prompt: str,
        *,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> Result:
        """Text-to-image; waits for the result."""
        job = await self.submit_generate(prompt, idempotency_key=idempotency_key, **params)
        return await job._wait_abandoning(timeout, on_progress)  # type: ignore[return-value]

    async def judge(
        self,
        image: Any,
        prompt: str,
        *,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> JudgeResult:
        """p(yes) that `image` shows `prompt`."""
        job = await self._submit("judge", prompt, image, params, idempotency_key)
        return await job._wait_abandoning(timeout, None)  # type: ignore[return-value]

    # ---- jobs ----
    async def submit_refine(
        self, image: Any, prompt: str, *, idempotency_key: str | None = None, **params: Any
    ) -> AsyncJob:
        """Queue a refine and return its Job at once."""
        return await self._submit("refine", prompt, image, params, idempotency_key)

    async def submit_generate(
        self, prompt: str, *, idempotency_key: str | None = None, **params: Any
    ) -> AsyncJob:
        return await self._submit("generate", prompt, None, params, idempotency_key)

    def job(self, job_id: str, kind: str = "") -> AsyncJob:
        """A handle on an existing job (e.g. submitted by another process)."""
        return AsyncJob(self, job_id, kind)

    async def _submit(
        self, kind: str, prompt: str, image: Any, params: dict[str, Any], key: str | None
    ) -> AsyncJob:
        # One key for every try of this call: the server hands a retry the job the first try made.
        request = proto.submit_request(kind, prompt, image, params, key or proto.new_idempotency_key())
        resp = await self._send("POST", **request)
        view = resp.json()
        return AsyncJob(self, view["id"], view.get("kind", kind), view)

    # ---- transport ----
    async def _send(
        self,
        method: str,
        url: str,
        *,
        stream: bool = False,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """One request under the retry policy; error answers raise their exception class."""
        url, headers = self.base_url + url, {**self._headers, **(headers or {})}
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = await self._http.send(
                    self._http.build_request(method, url, headers=headers, **kwargs), stream=stream
                )
            except httpx.TransportError as exc:
                delay = self.retry.delay(attempt, time.monotonic() - started)
                if delay is None:
                    raise ConnectionFailed(
                        f"{method} {url}: {type(exc).__name__}: {exc}", code="connection_error"
                    ) from exc
                await asyncio.sleep(delay)
                continue
            if resp.status_code < 400:
                return resp
            await resp.aread()
            await resp.aclose()
            if resp.status_code in self.retry.retry_statuses:
                hint = proto.error_from_response(resp.status_code, resp.content, resp.headers).retry_after
                delay = self.retry.delay(attempt, time.monotonic() - started, hint)
                if delay is not None:
                    await asyncio.sleep(delay)
                    continue
            proto.raise_for_error(resp)


class AsyncJob:
    """A submitted job. Methods talk to the server each time (no cached state besides `id`)."""

    def __init__(self, client: AsyncClient, job_id: str, kind: str = "", view: dict[str, Any] | None = None):
        self.client = client
        self.id = job_id
        self.kind = kind
        self.submitted = JobStatus(view) if view else None

    def __repr__(self) -> str:
        return f"AsyncJob(id={self.id!r}, kind={self.kind!r})"

    async def status(self) -> JobStatus:
        return proto.job_status(await self.client._send("GET", f"/v1/jobs/{self.id}"))

    async def cancel(self) -> JobStatus:
        """Cancel: a queued job never runs, a running one stops at its next step boundary."""
        return proto.job_status(await self.client._send("DELETE", f"/v1/jobs/{self.id}"))

    async def events(self, last_event_id: str | None = None) -> AsyncIterator[Event]:
        """The job's events from the start (or after `last_event_id`) to its terminal one. A dropped
        connection, or a stream the server ends early (drain), is resumed with `Last-Event-ID`: no
        event is repeated or lost."""
        async for event in self._events(last_event_id):
            if event is not None:
                yield event

    async def _events(self, last_event_id: str | None) -> AsyncIterator[Event | None]:
        """`events`, plus None at each keep-alive so waiters can check their clock."""
        decoder = SSEDecoder(last_event_id)
        policy = self.client.retry
        outage_started, failures = time.monotonic(), 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if decoder.last_id:
                headers["Last-Event-ID"] = decoder.last_id
            cause: Exception | None = None
            try:
                resp = await self.client._send(
                    "GET", f"/v1/jobs/{self.id}/events", headers=headers, stream=True
                )
                try:
                    async for line in resp.aiter_lines():
                        event = decoder.feed(line)
                        if event is None:
                            if line.startswith(":"):
                                yield None
                            continue
                        outage_started, failures = time.monotonic(), 0
                        yield event
                        if event.terminal:
                            return
                finally:
                    await resp.aclose()
            except httpx.TransportError as exc:
                cause = exc
            # Dropped, or closed by the server before the end: resume after the last event seen.
            decoder.restart()
            failures += 1
            hint = decoder.retry_ms / 1000 if decoder.retry_ms is not None else None
            delay = policy.delay(failures, time.monotonic() - outage_started, hint)
            if delay is None:
                raise ConnectionFailed(
                    f"the event stream of job {self.id} kept failing ({cause!r})",
                    code="connection_error",
                    job_id=self.id,
                ) from cause
            await asyncio.sleep(delay)

    async def result(
        self, timeout: float | None = None, on_progress: ProgressCallback | None = None
    ) -> Result | JudgeResult:
        """Wait for the job to end (following its events) and return its result; a failed or cancelled
        job raises JobFailed / JobCancelled, a passed `timeout` WaitTimeout (the job goes on)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        async with contextlib.aclosing(self._events(None)) as events:
            async for event in events:
                if deadline is not None and time.monotonic() > deadline:
                    raise WaitTimeout(
                        f"job {self.id} did not finish within {timeout:g} s", code="timeout", job_id=self.id
                    )
                if event is None:
                    continue
                if event.type == "completed":
                    break
                if isinstance(event, FailedEvent):
                    raise job_error(event.code, event.message, self.id)
                if event.type == "cancelled":
                    raise job_error("cancelled", "the job was cancelled", self.id)
                if on_progress is not None:
                    done = on_progress(event)
                    if inspect.isawaitable(done):
                        await done
        resp = await self.client._send("GET", f"/v1/jobs/{self.id}/result")
        view = (await self.status()).raw
        return proto.make_result(self.kind or view.get("kind", ""), self.id, resp, view)

    async def _wait_abandoning(self, timeout: float | None, on_progress: ProgressCallback | None) -> Any:
        """`result()` for the waiting calls: a caller who gives up (timeout, interrupt, lost server)
        cancels the job, since nobody else waits for it."""
        try:
            return await self.result(timeout, on_progress)
        except BaseException as exc:
            if not isinstance(exc, RvrError) or isinstance(exc, (WaitTimeout, ConnectionFailed)):
                await asyncio.shield(self._cancel_quietly())
            raise

    async def _cancel_quietly(self) -> None:
        try:
            url = f"{self.client.base_url}/v1/jobs/{self.id}"
            await self.client._http.delete(url, headers=self.client._headers, timeout=5)
        except Exception:
            pass  # best effort: the job's deadline bounds it anyway
