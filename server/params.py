"""Request bodies -> validated parameters and raw image bytes (JSON with base64, or multipart)."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from server.capabilities import Limits
from server.errors import BadRequest, InvalidInput, LimitExceeded, ServeError, UnsupportedMediaType
from server.schemas import JobParams
from server.uploads import check_declared_type

_MAX_FIELDS = 32


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(x) for x in e["loc"]) or "body"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def form_value(name: str, value: str) -> Any:
    # Multipart carries strings; cfg_interval is "lo,hi" (or a JSON list). Pydantic coerces the rest.
    if name == "cfg_interval":
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except ValueError:
                return text
        return [v.strip() for v in text.split(",")]
    if value == "" and name != "prompt":
        return None
    return value


async def parse_body(request: Request, model: type[BaseModel], needs_image: bool) -> tuple[Any, bytes | None]:
    """Returns (params, image bytes or None). 415 for other body types, 422 for bad fields."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    image: bytes | None = None
    if ctype == "application/json":
        try:
            raw = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise InvalidInput("the body is not valid JSON") from exc
        if not isinstance(raw, dict):
            raise InvalidInput("the JSON body must be an object")
        if needs_image:
            b64 = raw.pop("image", None)
            if not isinstance(b64, str) or not b64:
                raise InvalidInput("image: a base64 string is required")
            try:
                image = base64.b64decode(
                    b64.split(",", 1)[-1] if b64.startswith("data:") else b64, validate=True
                )
            except (binascii.Error, ValueError) as exc:
                raise InvalidInput("image: not valid base64") from exc
        fields = raw
    elif ctype == "multipart/form-data":
        fields, image = await _read_form(request, needs_image)
    else:
        raise UnsupportedMediaType("send application/json or multipart/form-data")
    return validate_params(model, fields), image


def validate_params(model: type[BaseModel], fields: dict[str, Any]) -> Any:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise InvalidInput(_validation_message(exc)) from exc


@dataclass
class FilePart:
    name: str
    content_type: str | None
    data: bytes


async def read_multipart(request: Request, max_files: int = 1) -> tuple[dict[str, str], list[FilePart]]:
    """A multipart body -> (text fields, file parts), within the field and part limits (400 otherwise)."""
    try:
        form = await request.form(max_files=max_files, max_fields=_MAX_FIELDS, max_part_size=256 * 1024)
    except ServeError:
        raise  # the streamed byte cap (413)
    except Exception as exc:
        raise BadRequest("the multipart body could not be parsed") from exc
    try:
        fields: dict[str, str] = {}
        files: list[FilePart] = []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append(FilePart(name, value.content_type, await value.read()))
            else:
                fields[name] = value
        return fields, files
    finally:
        await form.close()  # spooled upload files


async def _read_form(request: Request, needs_image: bool) -> tuple[dict[str, Any], bytes | None]:
    text, files = await read_multipart(request)
    fields = {name: form_value(name, value) for name, value in text.items()}
    for part in files:
        if part.name != "image":
            raise InvalidInput(f"{part.name}: unexpected file")
    upload = files[0] if files else None
    if needs_image:
        if upload is None:
            raise InvalidInput("image: a file part is required")
        check_declared_type(upload.content_type)
        return fields, upload.data
    if upload is not None:
        raise InvalidInput("image: not accepted by this endpoint")
    return fields, None


def check_limits(kind: str, p: JobParams, limits: Limits) -> None:
    """The limits of `GET /v1/info` (422 naming the field, the limit and its value), and task rules the
    schema cannot express (422). Prompt tokens are counted by the caller (async): `check_prompt_tokens`."""
    if len(p.prompt) > limits.max_prompt_chars:
        n = limits.max_prompt_chars
        raise LimitExceeded("prompt", "max_prompt_chars", n, f"longer than {n} characters")
    if not p.prompt.strip():
        raise InvalidInput("prompt: must not be blank")
    if p.steps is not None:
        lo, hi = limits.min_steps, limits.max_steps
        if not lo <= p.steps <= hi:
            name, value = ("min_steps", lo) if p.steps < lo else ("max_steps", hi)
            raise LimitExceeded("steps", name, value, f"must be in [{lo}, {hi}], got {p.steps}")
    if p.rounds > limits.max_rounds:
        n = limits.max_rounds
        raise LimitExceeded("rounds", "max_rounds", n, f"at most {n}, got {p.rounds}")
    for field in ("height", "width"):
        value = getattr(p, field)
        if value is None:
            continue
        if value < limits.min_side:
            name, limit = "min_side", limits.min_side
        elif value > limits.max_side:
            name, limit = "max_side", limits.max_side
        elif value % limits.side_multiple:
            name, limit = "side_multiple", limits.side_multiple
        else:
            continue
        raise LimitExceeded(
            field,
            name,
            limit,
            f"a multiple of {limits.side_multiple} in [{limits.min_side}, {limits.max_side}] "
            f"(this model and these settings), got {value}",
        )
    if p.cfg_interval is not None and not 0.0 <= p.cfg_interval[0] <= p.cfg_interval[1] <= 1.0:
        raise InvalidInput("cfg_interval: needs 0 <= lo <= hi <= 1")
    if kind == "generate" and (p.rounds != 1 or p.until_score is not None):
        raise InvalidInput("rounds and until_score apply to refine only")


def check_prompt_tokens(n_tokens: int | None, limits: Limits) -> None:
    n = limits.max_prompt_tokens
    if n_tokens is not None and n is not None and n_tokens > n:
        raise LimitExceeded("prompt", "max_prompt_tokens", n, f"{n_tokens} tokens; the limit is {n}")
