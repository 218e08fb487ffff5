"""The one error type of the server, and the one place it becomes an HTTP response.

`code` is the string a client sees in `{"error": {"code", "message"}}`, in SSE `failed` events, in job
status, and as the `rvr_request_failures_total{code}` label. The OpenAI-compatible routes render the same
error in OpenAI's `{"error": {"message", "type", "code", "param"}}` shape, with the same status code.
"""

from __future__ import annotations


class ServeError(Exception):
    code = "internal"
    status = 500
    param: str | None = None  # the request field at fault, where one is (OpenAI's `error.param`)

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, job_id: str | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.job_id = job_id

    def body(self) -> dict:
        error: dict = {"code": self.code, "message": self.message}
        if self.job_id:
            error["job_id"] = self.job_id
        return {"error": error}


# Paths whose callers speak OpenAI's API (its SDKs read `error.type` and `error.param`).
OPENAI_PATH_PREFIXES = ("/v1/images/", "/v1/models")


def _openai_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(err: ServeError, path: str) -> dict:
    """The JSON body of `err` as the route at `path` answers it."""
    if not path.startswith(OPENAI_PATH_PREFIXES):
        return err.body()
    error: dict = {
        "message": err.message,
        "type": _openai_type(err.status),
        "code": err.code,
        "param": err.param,
    }
    if err.job_id:
        error["job_id"] = err.job_id
    return {"error": error}


class Overloaded(ServeError):
    code, status = "overloaded", 503


class Unavailable(ServeError):
    code, status = "unavailable", 503


class PayloadTooLarge(ServeError):
    code, status = "payload_too_large", 413


class UnsupportedMediaType(ServeError):
    code, status = "unsupported_media_type", 415


class InvalidInput(ServeError):
    code, status = "invalid_input", 422


class LimitExceeded(InvalidInput):
    """A field outside a limit of `GET /v1/info` (the settings and the loaded model together). The code
    stays `invalid_input`; the body adds the field (`param`), the limit's key in `/v1/info`'s `limits`
    (`limit_name`) and its value (`limit`)."""

    def __init__(self, param: str, limit_name: str, limit: int, message: str):
        super().__init__(f"{param}: {message}")
        self.param, self.limit_name, self.limit = param, limit_name, limit

    def body(self) -> dict:
        body = super().body()
        body["error"].update(param=self.param, limit_name=self.limit_name, limit=self.limit)
        return body


class ImageTooLarge(ServeError):
    code, status = "image_too_large", 400


class BadRequest(ServeError):
    code, status = "bad_request", 400


class UnsupportedOption(BadRequest):
    """An option of a compatible API (OpenAI's images) that this service does not implement: refused,
    never ignored."""

    code = "unsupported_option"

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class ModelNotFound(ServeError):
    code, status, param = "model_not_found", 404, "model"


class WaitTimeout(ServeError):
    """A synchronous-only caller (the OpenAI routes) waited `max_wait_s`; the job was cancelled."""

    code, status = "timeout", 504


class Unauthorized(ServeError):
    code, status = "unauthorized", 401


class NotFound(ServeError):
    code, status = "not_found", 404


class IdempotencyMismatch(ServeError):
    """An Idempotency-Key reused with another payload. The same payload gets the same job back, also
    while it runs, so the IETF draft's 409 (still in flight) never arises."""

    code, status = "idempotency_conflict", 422


class JobNotFinished(ServeError):
    code, status = "not_ready", 409


class JobCancelled(ServeError):
    code, status = "cancelled", 409


# Job failure codes (stored on the job, shown in status and SSE) and the HTTP status of a waiting caller
# (`queue_timeout`: the deadline passed in the queue, 504).
FAILURE_STATUS = {
    "queue_timeout": 504,
    "invalid_input": 422,
    "generation_failed": 500,
    "dead_lettered": 500,
    "unavailable": 503,
    "cancelled": 409,
}


def job_failure(code: str, message: str, job_id: str) -> ServeError:
    """The error a `Prefer: wait` caller gets for a job that ended with failure `code`."""
    err = ServeError(message, job_id=job_id)
    err.code, err.status = code, FAILURE_STATUS.get(code, 500)
    return err
