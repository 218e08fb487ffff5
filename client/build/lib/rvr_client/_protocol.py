"""What the sync and async clients share, without I/O: request bodies, image inputs, answers -> results."""

from __future__ import annotations

import io
import json
import os
import uuid
from typing import Any

import httpx

from rvr_client.errors import error_from_response
from rvr_client.results import JobStatus, JudgeResult, Result, scores_of

__version__ = "0.1.0"
USER_AGENT = f"rvr-client/{__version__}"
DEFAULT_BASE_URL = "http://127.0.0.1:8000"

# Magic bytes -> the type the upload declares (the server sniffs the bytes again).
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))


def base_url_and_key(base_url: str | None, api_key: str | None) -> tuple[str, str | None]:
    """Arguments first, then `RVR_BASE_URL` / `RVR_API_KEY`."""
    url = base_url or os.environ.get("RVR_BASE_URL") or DEFAULT_BASE_URL
    return url.rstrip("/"), api_key if api_key is not None else os.environ.get("RVR_API_KEY")


def default_headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _content_type(data: bytes) -> str:
    for magic, ctype in _MAGIC:
        if data.startswith(magic):
            return ctype
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def image_upload(image: Any) -> tuple[str, bytes, str]:
    """A path, bytes, a binary file object or a PIL image -> (filename, bytes, content type)."""
    name = "image"
    if isinstance(image, (str, os.PathLike)):
        name = os.path.basename(os.fspath(image)) or name
        with open(image, "rb") as f:
            data = f.read()
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif hasattr(image, "read"):
        data = image.read()
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError("image: open the file in binary mode ('rb')")
        data = bytes(data)
        name = os.path.basename(str(getattr(image, "name", ""))) or name
    elif type(image).__module__.startswith("PIL.") and hasattr(image, "save"):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data, name = buf.getvalue(), "image.png"
    else:
        raise TypeError(f"image: a path, bytes, a binary file or a PIL image, not {type(image).__name__}")
    return name, data, _content_type(data)


def _form_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def new_idempotency_key() -> str:
    return f"rvr-client-{uuid.uuid4().hex}"


def submit_request(
    kind: str, prompt: str, image: Any, params: dict[str, Any], idempotency_key: str
) -> dict[str, Any]:
    """httpx request arguments of one submit. With an image: multipart (the server's streamed upload
    path); without: JSON. Parameters given as None are left out (the server's default)."""
    fields = {"prompt": prompt, **{k: v for k, v in params.items() if v is not None}}
    kwargs: dict[str, Any] = {
        "url": f"/v1/{kind}",
        "headers": {"Idempotency-Key": idempotency_key, "Accept": "application/json"},
    }
    if image is None:
        kwargs["json"] = fields
    else:
        kwargs["data"] = {k: _form_text(v) for k, v in fields.items()}
        kwargs["files"] = {"image": image_upload(image)}
    return kwargs


def raise_for_error(resp: httpx.Response) -> None:
    """Call on a read response."""
    if resp.status_code >= 400:
        raise error_from_response(resp.status_code, resp.content, resp.headers)


def make_result(kind: str, job_id: str, resp: httpx.Response, view: dict[str, Any]) -> Result | JudgeResult:
    if kind == "judge":
        return JudgeResult(job_id=job_id, score=float(resp.json()["score"]), view=view)
    seed = resp.headers.get("x-seed")
    return Result(
        job_id=job_id,
        content=resp.content,
        content_type=resp.headers.get("content-type", "application/octet-stream"),
        seed=int(seed) if seed else view.get("seed"),
        scores=scores_of(view),
        view=view,
    )


def job_status(resp: httpx.Response) -> JobStatus:
    return JobStatus(resp.json())
