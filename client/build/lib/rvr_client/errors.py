"""One exception class per error family of the API. Each carries the server's `code`, its `message`,
the HTTP `status` (None when no answer came) and, for job outcomes, the `job_id`."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime


class RvrError(Exception):
    """Base class of every error this client raises."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "error",
        status: int | None = None,
        job_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.job_id = job_id
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f"HTTP {self.status}" if self.status is not None else "no answer"
        job = f", job {self.job_id}" if self.job_id else ""
        return f"{self.code}: {self.message} ({where}{job})"


class InvalidInput(RvrError):
    """The request was refused as given (400, 413, 415, 422): bad fields, image type or size, a reused
    Idempotency-Key with another payload, an unsupported option. Retrying it unchanged cannot help."""


class Unauthorized(RvrError):
    """Missing or wrong API key (401)."""


class NotFound(RvrError):
    """Unknown or expired job, or unknown model (404)."""


class Overloaded(RvrError):
    """The service is full or draining (503), or a rate limit answered 429; raised once the retry
    policy's attempts or time are spent. `retry_after` is the server's last hint in seconds."""


class JobFailed(RvrError):
    """The job ended in failure: `code` is the job's failure code (`generation_failed`,
    `queue_timeout`, `dead_lettered`, `unavailable`, ...)."""


class JobCancelled(JobFailed):
    """The job was cancelled (by `Job.cancel()`, another caller, or a waiting call that gave up)."""


class ServerError(RvrError):
    """A 5xx answer that is none of the above."""


class ConnectionFailed(RvrError):
    """No answer from the server within the retry policy (connection refused or reset, timeouts)."""


class WaitTimeout(RvrError):
    """A wait passed its `timeout`. `Job.result` leaves the job running (`job_id`); the waiting calls
    (`refine`, `generate`, `judge`) cancel it, since nobody else waits for it."""


_BY_CODE: dict[str, type[RvrError]] = {
    "invalid_input": InvalidInput,
    "bad_request": InvalidInput,
    "image_too_large": InvalidInput,
    "payload_too_large": InvalidInput,
    "unsupported_media_type": InvalidInput,
    "idempotency_conflict": InvalidInput,
    "unsupported_option": InvalidInput,
    "unauthorized": Unauthorized,
    "not_found": NotFound,
    "model_not_found": NotFound,
    "overloaded": Overloaded,
    "unavailable": Overloaded,
    "rate_limited": Overloaded,
}
_BY_STATUS: dict[int, type[RvrError]] = {
    400: InvalidInput,
    413: InvalidInput,
    415: InvalidInput,
    422: InvalidInput,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    429: Overloaded,
    503: Overloaded,
}


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def job_error(code: str, message: str, job_id: str, status: int | None = None) -> JobFailed:
    cls = JobCancelled if code == "cancelled" else JobFailed
    return cls(message or code, code=code, status=status, job_id=job_id)


def error_from_response(status: int, body: bytes, headers: Mapping[str, str]) -> RvrError:
    """An error answer -> the exception of its family. Reads both this API's `{"error": {"code",
    "message"}}` and bodies from proxies that are not JSON."""
    code, message, job_id = "", "", None
    try:
        error = json.loads(body).get("error")
        if isinstance(error, dict):
            code = str(error.get("code") or "")
            message = str(error.get("message") or "")
            job_id = error.get("job_id")
    except (ValueError, AttributeError):
        pass
    if not message:
        message = body[:200].decode("utf-8", "replace").strip() or f"HTTP {status}"
    retry_after = parse_retry_after(headers.get("retry-after"))
    if job_id and code not in ("not_ready", ""):
        err = job_error(code, message, job_id, status)
        err.retry_after = retry_after
        return err
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status) or (ServerError if status >= 500 else RvrError)
    return cls(message, code=code or f"http_{status}", status=status, job_id=job_id, retry_after=retry_after)
