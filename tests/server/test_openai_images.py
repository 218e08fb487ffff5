"""The OpenAI-compatible routes with the official `openai` package as the client, against a real server
(uvicorn, tiny model): edits and generations, models, and every refusal in OpenAI's error shape."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image

from tests.server.server_testutil import LONG, Stack, image_bytes, poll, stack_settings

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.xdist_group("server-openai")


@pytest.fixture(scope="module")
def stack(tiny_model, engine):
    s = Stack("memory", stack_settings("memory", tiny_model, None), engine).start()
    yield s
    s.stop()


@pytest.fixture
def oai(stack):
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused-without-auth", max_retries=0)
    yield client
    client.close()


def _decode(item) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item.b64_json)))


def test_edit_runs_a_refine(oai, stack):
    png = image_bytes((64, 48))
    out = oai.images.edit(
        model="rvr",
        image=("in.png", png, "image/png"),
        prompt="a red apple",
        extra_body={"steps": 4, "seed": 5},
    )
    [item] = out.data
    img = _decode(item)
    assert img.format == "PNG" and img.size == (64, 48) and out.size == "64x48" and out.output_format == "png"
    assert out.created > 0
    job = out.model_extra["rvr"]["job_id"]
    with httpx.Client(base_url=stack.url) as http:
        view = http.get(f"/v1/jobs/{job}").json()
        assert view["kind"] == "refine" and view["seed"] == 5
        # The same job through the native API gives the same bytes.
        assert http.get(f"/v1/jobs/{job}/result").content == base64.b64decode(item.b64_json)


def test_edit_with_size_format_and_a_file_object(oai, tmp_path):
    path = tmp_path / "in.png"
    path.write_bytes(image_bytes((64, 64)))
    with open(path, "rb") as f:
        out = oai.images.edit(
            model="tiny",  # the checkpoint directory's name is served too
            image=f,
            prompt="a blue cup",
            size="96x64",
            output_format="jpeg",
            response_format="b64_json",
            n=1,
            user="end-user-7",
            extra_body={"steps": 3, "rounds": 2, "until_score": 1.0},  # p(yes) < 1: both rounds run
        )
    img = _decode(out.data[0])
    assert img.format == "JPEG" and img.size == (96, 64) and out.size == "96x64"
    rvr = out.model_extra["rvr"]
    assert len(rvr["scores"]) == 2 and rvr["score"] == rvr["scores"][-1]


def test_generate_runs_text_to_image(oai):
    out = oai.images.generate(model="rvr", prompt="a dog", size="96x64", extra_body={"steps": 3})
    assert _decode(out.data[0]).size == (96, 64)
    out = oai.images.generate(prompt="a dog", output_format="webp", quality="auto", extra_body={"steps": 2})
    assert _decode(out.data[0]).format == "WEBP" and out.size == "128x128"


def test_models(oai):
    ids = [m.id for m in oai.models.list()]
    assert ids == ["rvr", "tiny"]
    assert oai.models.retrieve("rvr").owned_by == "rvr-serve"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-image-1")


def _error(exc_info) -> dict:
    body = exc_info.value.body
    assert set(body) >= {"message", "type", "code"}, body  # OpenAI's shape (the SDK unwraps "error")
    return body


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 2}, "n"),
        ({"response_format": "url"}, "response_format"),
        ({"quality": "high"}, "quality"),
        ({"background": "transparent"}, "background"),
        ({"output_format": "gif"}, "output_format"),
        ({"output_compression": 50}, "output_compression"),
        ({"extra_body": {"style": "vivid"}}, "style"),
    ],
)
def test_unsupported_options_are_refused_not_ignored(oai, kwargs, param):
    with pytest.raises(openai.BadRequestError) as exc:
        oai.images.generate(model="rvr", prompt="a dog", **kwargs)
    body = _error(exc)
    assert exc.value.status_code == 400 and body["code"] == "unsupported_option" and body["param"] == param
    assert body["type"] == "invalid_request_error" and param in body["message"]


def test_edit_refusals(oai):
    png = ("in.png", image_bytes(), "image/png")
    with pytest.raises(openai.BadRequestError) as exc:
        oai.images.edit(model="rvr", image=png, mask=png, prompt="a cup")
    assert _error(exc)["param"] == "mask"
    with pytest.raises(openai.BadRequestError) as exc:
        oai.images.edit(model="rvr", image=[png, png], prompt="a cup")
    assert _error(exc)["param"] == "image"
    with pytest.raises(openai.NotFoundError) as exc:
        oai.images.edit(model="gpt-image-1", image=png, prompt="a cup")
    assert _error(exc)["code"] == "model_not_found" and exc.value.param == "model"
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        oai.images.edit(model="rvr", image=png, prompt="a cup", extra_body={"steps": 1})
    assert _error(exc)["code"] == "invalid_input" and "steps" in exc.value.message
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        oai.images.edit(model="rvr", image=png, prompt="a cup", size="64x50")  # not a multiple of 16
    assert _error(exc)["code"] == "invalid_input"
    with pytest.raises(openai.UnprocessableEntityError):
        oai.images.edit(model="rvr", image=png, prompt="a cup", size="big")
    with pytest.raises(openai.APIStatusError) as exc:
        oai.images.edit(model="rvr", image=("a.gif", b"GIF89a....", "image/gif"), prompt="a cup")
    assert exc.value.status_code == 415 and _error(exc)["code"] == "unsupported_media_type"
    with pytest.raises(openai.UnprocessableEntityError):
        oai.images.generate(model="rvr", prompt="a dog", extra_body={"rounds": 2})  # refine only


def test_native_routes_keep_their_error_shape(stack):
    with httpx.Client(base_url=stack.url) as http:
        r = http.post("/v1/generate", json={"prompt": "x", "steps": 1})
        assert r.status_code == 422 and set(r.json()["error"]) == {"code", "message"}
        r = http.post("/v1/images/generations", json={"prompt": "x", "steps": 1})
        assert r.status_code == 422 and set(r.json()["error"]) >= {"code", "message", "type", "param"}


def test_auth_and_overload_in_openai_shape(make_stack):
    stack = make_stack("memory", api_keys=["a-long-api-key"], max_batch_jobs=1, max_queue_depth=0)
    wrong = openai.OpenAI(base_url=stack.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        wrong.images.generate(model="rvr", prompt="a dog")
    assert _error(exc)["type"] == "authentication_error" and _error(exc)["code"] == "unauthorized"
    right = openai.OpenAI(base_url=stack.url + "/v1", api_key="a-long-api-key", max_retries=0)
    with pytest.raises(openai.InternalServerError) as exc:  # max_queue_depth=0: every submit is refused
        right.images.generate(model="rvr", prompt="a dog")
    assert exc.value.status_code == 503 and _error(exc)["code"] == "overloaded"
    assert _error(exc)["type"] == "server_error" and int(exc.value.response.headers["retry-after"]) >= 1
    wrong.close()
    right.close()


def test_a_job_past_max_wait_is_cancelled_and_answers_504(make_stack):
    stack = make_stack("memory", max_wait_s=1)
    oai = openai.OpenAI(base_url=stack.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as exc:
        oai.images.generate(model="rvr", prompt="slow", extra_body={"steps": LONG})
    body = _error(exc)
    assert exc.value.status_code == 504 and body["code"] == "timeout"
    with httpx.Client(base_url=stack.url) as http:
        assert poll(http, body["job_id"], {"cancelled", "succeeded"})["status"] == "cancelled"
    oai.close()
