"""OpenAI-compatible images routes: code written for OpenAI's image API (its SDKs, and tools built on
them) calls RvR by changing the base URL and the model name.

- `POST /v1/images/edits` (multipart) runs a refine of `image` towards `prompt`;
  `POST /v1/images/generations` (JSON) runs text-to-image. Both wait for the job and answer
  `{created, data: [{b64_json}], output_format, size, rvr: {job_id, seed, score, scores}}`.
- `GET /v1/models` lists the names `model` may take: `rvr` always, and the checkpoint directory's name
  when the API knows it (`--model`). One model serves both routes; the route picks the task.
- OpenAI options RvR does not implement (`n` > 1, `mask`, `response_format=url`, `quality` other than
  auto, ...) are refused with 400 `unsupported_option`, never ignored. RvR's own fields (`seed`, `steps`,
  `cfg_text`, `rounds`, `until_score`, ...) are accepted beside OpenAI's (the SDKs' `extra_body`).
- Errors are OpenAI's `{"error": {"message", "type", "code", "param"}}` (`server.errors.error_body`),
  with this service's status codes. The submit path is the native one (`server.submission`).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from server.errors import (
    InvalidInput,
    ModelNotFound,
    Unavailable,
    UnsupportedMediaType,
    UnsupportedOption,
    WaitTimeout,
)
from server.params import form_value, read_multipart, validate_params
from server.runtime import Runtime
from server.schemas import JobParams
from server.settings import Settings
from server.submission import admission_gate, enqueue, idempotency_key, wait_for_end
from server.uploads import check_declared_type
from server.views import finished_result

log = logging.getLogger("rvr.openai")
router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])

MODEL_ALIAS = "rvr"
_SIZE = re.compile(r"^([1-9][0-9]{0,5})x([1-9][0-9]{0,5})$")
# OpenAI options with no RvR counterpart: accepted only at the value that asks for nothing more.
_NEUTRAL: dict[str, set[str]] = {
    "quality": {"auto"},
    "background": {"auto", "opaque"},  # outputs are opaque RGB
    "moderation": {"auto"},
    "stream": {"false"},
    "partial_images": {"0"},
}
_UNSUPPORTED = {
    *_NEUTRAL,
    "mask",
    "markup",
    "style",
    "output_compression",
    "input_fidelity",
    "svg",
    "frame_count",
    "frame_duration_ms",
    "complexity",
}
# Fields of the native API that have another form here.
_NOT_HERE = {
    "height": "give the output size as size=WxH",
    "width": "give the output size as size=WxH",
    "image": "send the image as a file part of a multipart /v1/images/edits",
}


class ImageOptions(BaseModel):
    """The OpenAI options both routes implement. Other fields go to RvR's job parameters."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(min_length=1, description="What the image should show")
    model: str | None = Field(None, description="A name from GET /v1/models; unset: the served model")
    n: int | None = Field(None, ge=1, le=10, description="Images per request: only 1")
    size: str | None = Field(None, description="`auto` or `WxH` (multiples of the output size multiple)")
    response_format: Literal["b64_json", "url"] | None = Field(None, description="Only b64_json")
    output_format: Literal["png", "jpeg", "webp", "gif", "svg"] | None = Field(
        None, description="png (default), jpeg or webp"
    )
    user: str | None = Field(None, description="End-user id, logged with the job id")
    safety_identifier: str | None = Field(None, description="The newer name of `user`")


class GenerationsJSON(ImageOptions):
    """`POST /v1/images/generations`. RvR fields (seed, steps, cfg_text, ...) may be added."""


class ImageData(BaseModel):
    b64_json: str


class RvrInfo(BaseModel):
    job_id: str
    seed: int | None = None
    score: float | None = None
    scores: list[float] | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str
    size: str
    background: str = "opaque"
    rvr: RvrInfo


class OpenAIError(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None
    job_id: str | None = None


class OpenAIErrorBody(BaseModel):
    error: OpenAIError


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rvr-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIErrorBody, "description": text}
    for code, text in {
        400: "An unsupported OpenAI option, an image over the pixel limit, or an unparsable body",
        401: "Missing or wrong bearer token",
        404: "Unknown model",
        409: "The job was cancelled",
        413: "Body over the upload limit",
        415: "Image type outside PNG/JPEG/WebP, or another body type",
        422: "Invalid fields",
        500: "The job failed",
        503: "Queue full or draining; see Retry-After",
        504: "Deadline passed while queued, or max_wait_s passed (the job is cancelled)",
    }.items()
}
_ANSWERS = {200: {"model": ImagesResponse, "description": "The image, base64"}, **_ERRORS}


def served_models(settings: Settings) -> list[str]:
    names = [MODEL_ALIAS]
    if settings.model:
        name = Path(settings.model).name
        if name and name != MODEL_ALIAS:
            names.append(name)
    return names


def _job_params(kind: str, fields: dict[str, Any], settings: Settings) -> tuple[JobParams, str | None]:
    """OpenAI options (already free of unsupported ones) + RvR fields -> (job parameters, end-user id)."""
    opts = validate_params(ImageOptions, fields)
    if opts.model and opts.model not in served_models(settings):
        raise ModelNotFound(f"model {opts.model!r} is not served here; GET /v1/models lists the names")
    if opts.n not in (None, 1):
        raise UnsupportedOption("n", "n: only 1 image per request is supported")
    if opts.response_format == "url":
        raise UnsupportedOption("response_format", "response_format: only b64_json is supported")
    if opts.output_format in ("gif", "svg"):
        raise UnsupportedOption("output_format", "output_format: png, jpeg or webp")
    extra = dict(opts.model_extra or {})
    for name in sorted(_NOT_HERE.keys() & extra.keys()):
        raise InvalidInput(f"{name}: not accepted here; {_NOT_HERE[name]}")
    job: dict[str, Any] = {"prompt": opts.prompt, **extra}
    if opts.output_format:
        job["output_format"] = opts.output_format
    if opts.size and opts.size != "auto":
        match = _SIZE.match(opts.size)
        if match is None:
            raise InvalidInput("size: 'auto' or WIDTHxHEIGHT, e.g. 1024x1024")
        job["width"], job["height"] = int(match[1]), int(match[2])
    params = validate_params(JobParams, job)
    if kind == "generate" and (params.rounds != 1 or params.until_score is not None):
        raise InvalidInput("rounds and until_score apply to image edits (refine) only")
    return params, opts.safety_identifier or opts.user


def _without_unsupported(fields: dict[str, Any]) -> dict[str, Any]:
    """400 for an OpenAI option RvR does not implement; the ones at their neutral value are dropped."""
    for name in sorted(_UNSUPPORTED & set(fields)):
        value = fields[name]
        if value is not None and str(value).lower() not in _NEUTRAL.get(name, set()):
            raise UnsupportedOption(name, f"{name}: not supported by this service")
    return {k: v for k, v in fields.items() if k not in _UNSUPPORTED}


async def _run(
    request: Request, kind: str, fields: dict[str, Any], image: bytes | None, depth: int | None
) -> Response:
    rt: Runtime = request.app.state.rt
    idem_key = idempotency_key(request)
    params, user = _job_params(kind, _without_unsupported(fields), rt.settings)
    job_id = await enqueue(request, rt, kind, params, image, depth, idem_key)
    if user:
        log.info("job %s for user %r", job_id, user)  # what OpenAI's `user` is for: tracing abuse
    outcome = await wait_for_end(request, rt, job_id)
    if outcome == "left":
        return Response(status_code=499)
    if outcome == "timeout":
        # These callers cannot poll: nobody would collect the result.
        await rt.queue.cancel(job_id)
        if rt.draining.is_set():
            retry = {"Retry-After": str(rt.settings.retry_after_min_s)}
            raise Unavailable("the server is draining; the job was cancelled", headers=retry, job_id=job_id)
        raise WaitTimeout(f"the job did not finish within {rt.settings.max_wait_s:g} s", job_id=job_id)
    rec, body = await finished_result(rt, job_id)
    with Image.open(io.BytesIO(body)) as im:  # reads the header only
        width, height = im.size
    info = RvrInfo(job_id=job_id, seed=int(rec["seed"]) if rec.get("seed") else None)
    if rec.get("score"):
        info.score = float(rec["score"])
        info.scores = _scores(rec) or [info.score]
    answer = ImagesResponse(
        created=int(float(rec.get("finished_at") or time.time())),
        data=[ImageData(b64_json=base64.b64encode(body).decode())],
        output_format=rec.get("output_format", "png"),
        size=f"{width}x{height}",
        rvr=info,
    )
    return Response(
        answer.model_dump_json(exclude_none=True), media_type="application/json", headers={"X-Job-Id": job_id}
    )


def _scores(rec: dict[str, str]) -> list[float] | None:
    """Judge p(yes) per round, where the record keeps them (a JSON list)."""
    try:
        scores = json.loads(rec.get("scores") or "null")
    except ValueError:
        return None
    return [float(x) for x in scores] if isinstance(scores, list) else None


_EDIT_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        **ImageOptions.model_json_schema()["properties"],
                    },
                    "required": ["image", "prompt"],
                }
            }
        },
    },
    "parameters": [
        {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}}
    ],
}


@router.post(
    "/images/edits",
    responses=_ANSWERS,
    openapi_extra=_EDIT_FORM,
    summary="OpenAI-compatible image edit: refines `image` towards `prompt` (RvR)",
)
async def images_edits(request: Request) -> Response:
    rt: Runtime = request.app.state.rt
    depth = await admission_gate(request, rt)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise UnsupportedMediaType("send multipart/form-data")
    text, files = await read_multipart(request, max_files=4)
    fields: dict[str, Any] = {name: form_value(name, value) for name, value in text.items()}
    images = [f for f in files if f.name in ("image", "image[]")]  # the SDKs send a list as image[]
    for part in files:
        if part.name in _UNSUPPORTED:
            raise UnsupportedOption(part.name, f"{part.name}: not supported by this service")
        if part not in images:
            raise InvalidInput(f"{part.name}: unexpected file")
    if not images:
        raise InvalidInput("image: a file part is required")
    if len(images) > 1:
        raise UnsupportedOption("image", "image: one input image per request")
    check_declared_type(images[0].content_type)
    return await _run(request, "refine", fields, images[0].data, depth)


@router.post(
    "/images/generations",
    responses=_ANSWERS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": GenerationsJSON.model_json_schema()}},
        },
        "parameters": _EDIT_FORM["parameters"],
    },
    summary="OpenAI-compatible text-to-image",
)
async def images_generations(request: Request) -> Response:
    rt: Runtime = request.app.state.rt
    depth = await admission_gate(request, rt)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise UnsupportedMediaType("send application/json")
    try:
        fields = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidInput("the body is not valid JSON") from exc
    if not isinstance(fields, dict):
        raise InvalidInput("the JSON body must be an object")
    return await _run(request, "generate", fields, None, depth)


def _cards(settings: Settings) -> list[ModelCard]:
    # OpenAI's `created` is when the model was made: the checkpoint's mtime where the API can see it.
    ckpt = Path(settings.model) if settings.model else None
    created = int(ckpt.stat().st_mtime) if ckpt is not None and ckpt.exists() else 0
    return [ModelCard(id=name, created=created) for name in served_models(settings)]


@router.get("/models", response_model=ModelList, responses={401: _ERRORS[401]}, summary="Served model names")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=_cards(request.app.state.rt.settings))


@router.get(
    "/models/{model}",
    response_model=ModelCard,
    responses={401: _ERRORS[401], 404: _ERRORS[404]},
    summary="One served model",
)
async def get_model(model: str, request: Request) -> ModelCard:
    for card in _cards(request.app.state.rt.settings):
        if card.id == model:
            return card
    raise ModelNotFound(f"model {model!r} is not served here")
