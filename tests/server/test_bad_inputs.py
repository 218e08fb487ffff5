"""Bad inputs through real HTTP: each gets its specific 4xx, never a 5xx."""

from __future__ import annotations

import io
import json
import struct
import zlib

import pytest
from PIL import Image

from tests.server.server_testutil import Stack, b64, image_bytes, stack_settings

pytestmark = pytest.mark.xdist_group("server-bad-inputs")

LIMITS = {"max_upload_bytes": 300_000, "max_image_pixels": 1_000_000, "max_image_side": 2048}


@pytest.fixture(scope="module")
def client(tiny_model, engine):
    stack = Stack("memory", stack_settings("memory", tiny_model, None, **LIMITS), engine).start()
    with stack.client() as c:
        yield c
    stack.stop()


def png_header(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming a huge size, with a tiny IDAT: a decompression bomb shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def other_format(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format=fmt)
    return buf.getvalue()


GOOD = image_bytes()
FILES = [
    ("garbage", b"this is not an image at all", "image/png", 415, "unsupported_media_type"),
    ("gif_declared", other_format("GIF"), "image/gif", 415, "unsupported_media_type"),
    ("gif_as_png", other_format("GIF"), "image/png", 415, "unsupported_media_type"),
    ("tiff", other_format("TIFF"), "application/octet-stream", 415, "unsupported_media_type"),
    ("png_declared_text", GOOD, "text/plain", 415, "unsupported_media_type"),
    ("truncated", GOOD[: len(GOOD) // 2], "image/png", 422, "invalid_input"),
    ("empty", b"", "image/png", 422, "invalid_input"),
    ("bomb_pixels", png_header(20000, 20000), "image/png", 400, "image_too_large"),
    ("bomb_side", png_header(1, 30000), "image/png", 400, "image_too_large"),
    ("zero_width", png_header(0, 10), "image/png", 422, "invalid_input"),
]


@pytest.mark.parametrize(("name", "data", "ctype", "status", "code"), FILES, ids=[f[0] for f in FILES])
def test_bad_image_files(client, name, data, ctype, status, code):
    r = client.post("/v1/refine", data={"prompt": "x"}, files={"image": ("f", data, ctype)})
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text


FIELDS = [
    ("prompt_missing", {}, 422),
    ("prompt_blank", {"prompt": "   "}, 422),
    ("prompt_overlong", {"prompt": "x" * 5000}, 422),
    ("steps_low", {"steps": "1"}, 422),
    ("steps_high", {"steps": "100000"}, 422),
    ("steps_text", {"steps": "many"}, 422),
    ("cfg_negative", {"cfg_text": "-1"}, 422),
    ("cfg_interval_reversed", {"cfg_interval": "0.9,0.1"}, 422),
    ("cfg_interval_text", {"cfg_interval": "a,b"}, 422),
    ("renorm_unknown", {"renorm": "nope"}, 422),
    ("format_bmp", {"output_format": "bmp"}, 422),
    ("height_odd", {"height": "17"}, 422),
    ("width_huge", {"width": "99999"}, 422),
    ("rounds_high", {"rounds": "50"}, 422),
    ("until_score_high", {"until_score": "1.5"}, 422),
    ("deadline_zero", {"deadline_s": "0"}, 422),
    ("seed_negative", {"seed": "-4"}, 422),
    ("unknown_field", {"colour": "red"}, 422),
]


@pytest.mark.parametrize(("name", "fields", "status"), FIELDS, ids=[f[0] for f in FIELDS])
def test_bad_fields(client, name, fields, status):
    data = {"prompt": "a red apple", **fields} if name != "prompt_missing" else {}
    r = client.post("/v1/refine", data=data, files={"image": ("a.png", GOOD, "image/png")})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == "invalid_input"


def test_body_limits(client):
    big = b"\0" * 400_000
    r = client.post("/v1/refine", data={"prompt": "x"}, files={"image": ("a.png", big, "image/png")})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    def chunks():  # no Content-Length: the cap is counted while streaming
        for _ in range(40):
            yield b"\0" * 10_000

    r = client.post("/v1/refine", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


JSON_CASES = [
    ("not_json", b"{nope", "application/json", 422),
    ("json_array", b"[1, 2]", "application/json", 422),
    ("image_not_base64", json.dumps({"prompt": "x", "image": "***"}).encode(), "application/json", 422),
    ("image_missing", json.dumps({"prompt": "x"}).encode(), "application/json", 422),
    (
        "image_base64_garbage",
        json.dumps({"prompt": "x", "image": b64(b"garbage!")}).encode(),
        "application/json",
        415,
    ),
    ("text_body", b"prompt=x", "text/plain", 415),
    ("form_urlencoded", b"prompt=x", "application/x-www-form-urlencoded", 415),
]


@pytest.mark.parametrize(("name", "body", "ctype", "status"), JSON_CASES, ids=[c[0] for c in JSON_CASES])
def test_bad_bodies(client, name, body, ctype, status):
    r = client.post("/v1/refine", content=body, headers={"Content-Type": ctype})
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) >= {"code", "message"}


def test_endpoint_specific_rules(client):
    assert client.post("/v1/judge", json={"prompt": "x"}).status_code == 422  # judge needs an image
    r = client.post("/v1/generate", data={"prompt": "x"}, files={"image": ("a.png", GOOD, "image/png")})
    assert r.status_code == 422  # generate takes none
    assert client.post("/v1/generate", json={"prompt": "x", "rounds": 2}).status_code == 422
    two = [("image", ("a.png", GOOD, "image/png")), ("image", ("b.png", GOOD, "image/png"))]
    assert client.post("/v1/refine", data={"prompt": "x"}, files=two).status_code == 400
    r = client.post("/v1/generate", json={"prompt": "x"}, headers={"Idempotency-Key": "k" * 300})
    assert r.status_code == 422
    assert client.get("/v1/jobs/" + "z" * 500).status_code == 404
    assert client.put("/v1/refine").status_code == 405
    assert client.get("/v1/nothing").status_code == 404


def test_engine_side_rejection_is_a_job_failure_not_a_5xx(client):
    """Limits only the model knows (the tiny model's largest side is 128) fail the job as invalid_input."""
    r = client.post(
        "/v1/generate", json={"prompt": "x", "steps": 2, "height": 256}, headers={"Prefer": "wait"}
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"


def test_exif_orientation_is_applied_on_decode():
    """A JPEG stored 4x2 with EXIF orientation 6 (rotate 90° CW) is a 2x4 upright photo."""
    from server.uploads import normalize_image

    im = Image.new("RGB", (4, 2), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 2, 2))  # left half blue: after a 90° CW turn it is the top half
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes(), quality=100)
    out = Image.open(io.BytesIO(normalize_image(buf.getvalue(), 1_000_000, 2048)))
    assert out.size == (2, 4)
    assert out.getexif().get(0x0112) is None
    top, bottom = out.getpixel((1, 0)), out.getpixel((1, 3))
    assert top[2] > 200 and top[0] < 60, top
    assert bottom[0] > 200 and bottom[2] < 60, bottom
