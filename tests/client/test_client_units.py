"""The client's parts that need no server: SSE parsing, retry delays, error mapping, inputs, results."""

from __future__ import annotations

import io
import sys

import pytest
from PIL import Image
from rvr_client import (
    CompletedEvent,
    Event,
    InvalidInput,
    JobCancelled,
    JobFailed,
    NotFound,
    Overloaded,
    PreviewEvent,
    ProgressEvent,
    Result,
    RetryPolicy,
    RvrError,
    ServerError,
    Unauthorized,
)
from rvr_client._protocol import image_upload, submit_request
from rvr_client.errors import error_from_response, parse_retry_after
from rvr_client.events import SSEDecoder
from rvr_client.results import JobStatus


def _png(size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _feed(decoder: SSEDecoder, text: str) -> list[Event]:
    return [ev for line in text.split("\n") if (ev := decoder.feed(line)) is not None]


def test_sse_decoder_follows_the_whatwg_rules():
    d = SSEDecoder()
    stream = (
        ": keep-alive\n\n"
        "retry: 1500\n\n"
        'id: 1-0\nevent: progress\ndata: {"step": 1, "total": 4,\ndata:  "round": 1}\n\n'
        'id: 1-1\nevent: newtype\ndata:{"x": 1}\n\n'
        "data: no event name\n\n"
    )
    events = _feed(d, stream)
    assert [type(e) for e in events] == [ProgressEvent, Event, Event]
    assert events[0].id == "1-0" and events[0].step == 1 and events[0].total == 4 and events[0].round == 1
    assert events[1].type == "newtype" and events[1].data == {"x": 1}  # unknown types come through
    assert events[2].type == "message" and events[2].data == {"text": "no event name"}
    assert events[2].id == "1-1"  # the id carries over to later events, as the spec says
    assert d.retry_ms == 1500 and d.last_id == "1-1"


def test_sse_decoder_never_counts_a_half_read_event_as_seen():
    d = SSEDecoder("5-0")
    _feed(d, 'id: 6-0\nevent: progress\ndata: {"step": 2}')  # connection drops before the blank line
    assert d.last_id == "5-0"
    d.restart()
    [ev] = _feed(d, 'id: 6-0\nevent: progress\ndata: {"step": 2}\n\n')
    assert ev.id == "6-0" and d.last_id == "6-0"


def test_typed_events_keep_unknown_fields():
    d = SSEDecoder()
    preview = _feed(
        d,
        'id: 1\nevent: preview\ndata: {"step": 2, "round": 1, "format": "png", "image": "'
        + __import__("base64").b64encode(_png()).decode()
        + '"}\n\n',
    )[0]
    assert isinstance(preview, PreviewEvent) and preview.image.size == (8, 6) and preview.format == "png"
    done = _feed(d, 'id: 2\nevent: completed\ndata: {"seed": 3, "score": 0.5, "future": [1]}\n\n')[0]
    assert (
        isinstance(done, CompletedEvent) and done.terminal and done.seed == 3 and done.data["future"] == [1]
    )


def test_retry_policy_bounds_and_retry_after():
    p = RetryPolicy(max_attempts=3, max_elapsed_s=10, backoff_initial_s=0.5, backoff_max_s=4)
    for attempt in (1, 2):
        d = p.delay(attempt, 0.0)
        assert d is not None and 0 <= d <= min(4, 0.5 * 2 ** (attempt - 1))
    assert p.delay(3, 0.0) is None  # attempts spent
    d = p.delay(1, 0.0, retry_after=2.0)
    assert d is not None and 2.0 <= d <= 2.2  # the server's hint, a little jitter on top
    assert p.delay(1, 9.0, retry_after=2.0) is None  # would pass max_elapsed_s: give up now


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert 0 <= parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") <= 0.0 + 1e-9  # in the past: now


@pytest.mark.parametrize(
    ("status", "body", "cls", "code"),
    [
        (
            422,
            b'{"error": {"code": "invalid_input", "message": "steps: at least 2"}}',
            InvalidInput,
            "invalid_input",
        ),
        (
            422,
            b'{"error": {"code": "idempotency_conflict", "message": "m"}}',
            InvalidInput,
            "idempotency_conflict",
        ),
        (413, b'{"error": {"code": "payload_too_large", "message": "m"}}', InvalidInput, "payload_too_large"),
        (
            415,
            b'{"error": {"code": "unsupported_media_type", "message": "m"}}',
            InvalidInput,
            "unsupported_media_type",
        ),
        (400, b'{"error": {"code": "image_too_large", "message": "m"}}', InvalidInput, "image_too_large"),
        (401, b'{"error": {"code": "unauthorized", "message": "m"}}', Unauthorized, "unauthorized"),
        (404, b'{"error": {"code": "not_found", "message": "m"}}', NotFound, "not_found"),
        (503, b'{"error": {"code": "overloaded", "message": "the queue is full"}}', Overloaded, "overloaded"),
        (503, b'{"error": {"code": "unavailable", "message": "draining"}}', Overloaded, "unavailable"),
        (
            504,
            b'{"error": {"code": "queue_timeout", "message": "m", "job_id": "j"}}',
            JobFailed,
            "queue_timeout",
        ),
        (409, b'{"error": {"code": "cancelled", "message": "m", "job_id": "j"}}', JobCancelled, "cancelled"),
        (
            500,
            b'{"error": {"code": "generation_failed", "message": "m", "job_id": "j"}}',
            JobFailed,
            "generation_failed",
        ),
        (500, b'{"error": {"code": "internal", "message": "internal error"}}', ServerError, "internal"),
        (502, b"<html>Bad Gateway</html>", ServerError, "http_502"),  # a proxy's page
        (429, b"slow down", Overloaded, "http_429"),
        (409, b'{"error": {"code": "not_ready", "message": "m", "job_id": "j"}}', RvrError, "not_ready"),
    ],
)
def test_error_families(status, body, cls, code):
    err = error_from_response(status, body, {"retry-after": "7"})
    assert type(err) is cls and err.code == code and err.status == status
    assert err.message and err.retry_after == 7.0
    assert code in str(err) and str(status) in str(err)


def test_image_inputs(tmp_path):
    png = _png()
    path = tmp_path / "in.png"
    path.write_bytes(png)
    assert image_upload(str(path)) == ("in.png", png, "image/png")
    assert image_upload(path)[1:] == (png, "image/png")
    assert image_upload(png)[1:] == (png, "image/png")
    assert image_upload(bytearray(png))[1] == png
    with open(path, "rb") as f:
        assert image_upload(f) == ("in.png", png, "image/png")
    _, data, ctype = image_upload(Image.new("RGB", (5, 4)))
    assert ctype == "image/png" and Image.open(io.BytesIO(data)).size == (5, 4)
    with open(path, encoding="latin-1") as f, pytest.raises(TypeError, match="binary"):
        image_upload(f)
    with pytest.raises(TypeError):
        image_upload(12)
    assert image_upload(b"\xff\xd8\xff\xe0 jpeg")[2] == "image/jpeg"
    assert image_upload(b"RIFF\0\0\0\0WEBPVP8 ")[2] == "image/webp"
    assert image_upload(b"GIF89a")[2] == "application/octet-stream"  # the server says 415


def test_submit_request_forms():
    req = submit_request(
        "refine",
        "p",
        _png(),
        {
            "steps": 4,
            "cfg_interval": (0.2, 0.9),
            "until_score": 0.5,
            "speed": "fast",
            "seed": None,
            "flag": True,
        },
        "key-1",
    )
    assert req["url"] == "/v1/refine" and req["headers"]["Idempotency-Key"] == "key-1"
    assert req["data"] == {
        "prompt": "p",
        "steps": "4",
        "cfg_interval": "[0.2, 0.9]",
        "until_score": "0.5",
        "speed": "fast",
        "flag": "true",
    }  # None: left to the server's default
    req = submit_request("generate", "p", None, {"height": 64, "webhook_events": ["completed"]}, "k")
    assert req["json"] == {"prompt": "p", "height": 64, "webhook_events": ["completed"]}


def test_result_scores_and_forward_compatible_views():
    view = {"id": "j", "status": "succeeded", "score": 0.7, "scores": [0.2, 0.7], "new_field": {"a": 1}}
    r = Result(
        job_id="j", content=_png(), content_type="image/png", seed=1, scores=JobStatus(view).scores, view=view
    )
    assert r.scores == [0.2, 0.7] and r.score == 0.7 and r.view["new_field"] == {"a": 1}
    assert JobStatus({"id": "j", "status": "succeeded", "score": 0.4}).scores == [0.4]  # today's servers
    assert JobStatus({"id": "j", "status": "running"}).scores == []
    assert r.image.size == (8, 6)


def test_without_pillow_results_are_bytes_and_image_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # `import PIL` raises ImportError
    monkeypatch.delitem(sys.modules, "PIL.Image", raising=False)
    r = Result(job_id="j", content=b"\x89PNG...", content_type="image/png", seed=None)
    assert r.content.startswith(b"\x89PNG")
    with pytest.raises(ImportError, match=r"pip install 'rvr-client\[pil\]'"):
        _ = r.image


def test_the_client_imports_only_httpx_and_the_standard_library():
    """It installs without the server: no torch, no server or engine code, Pillow only when asked."""
    import subprocess
    from pathlib import Path

    client_dir = Path(__file__).resolve().parents[2] / "client"
    probe = (
        "import sys, rvr_client\n"
        "bad = ('torch', 'server', 'engine', 'PIL', 'numpy', 'fastapi', 'pydantic')\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in bad)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=client_dir, capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == ""
