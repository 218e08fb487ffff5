"""The service's capabilities: what every live worker published, intersected with this process's settings
(docs/serving.md §6). `GET /v1/info` shows them and submit validates against exactly them, so a
job the API accepts never fails later on a limit the API could have known.

No worker published yet (all scaled to zero, or still loading): the limits are the settings alone and
`workers` is 0; submits are still accepted (the queue is the buffer) and the worker checks the model's
limits when it takes the job. Torch-free: API pods read published dicts only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from engine.capabilities import Capabilities
from server.settings import Settings

if TYPE_CHECKING:
    from server.runtime import Runtime


@dataclass(frozen=True)
class Limits:
    """Every limit a request is checked against at submit. Sides are output pixels."""

    min_side: int
    max_side: int
    side_multiple: int
    min_steps: int
    max_steps: int
    max_rounds: int
    max_prompt_chars: int
    max_prompt_tokens: int | None  # None: counted by the workers only (none published a tokenizer yet)
    max_upload_bytes: int
    max_image_pixels: int
    max_image_side: int


@dataclass(frozen=True)
class ServiceInfo:
    workers: int
    model: str | None
    model_hash: str | None
    tasks: list[str]
    device: list[str]
    dtype: list[str]
    weights: list[str]
    backend: list[str]
    attention: list[str]
    speed_modes: list[str]
    limits: Limits
    tokenizer_hashes: list[str] = field(default_factory=list)  # the live workers' tokenizers (sha256)


_SETTINGS_TASKS = ["refine", "generate", "judge"]  # what the native routes submit


def service_info(settings: Settings, published: list[Capabilities]) -> ServiceInfo:
    """The intersection of the settings and every published capability set."""
    s = settings
    multiple = s.output_size_multiple
    for c in published:
        multiple = math.lcm(multiple, c.side_multiple)
    max_side = min([s.max_output_side, *(c.max_side for c in published)])
    min_side = max([multiple, *(c.min_side for c in published)])
    limits = Limits(
        min_side=-(-min_side // multiple) * multiple,
        max_side=max_side // multiple * multiple,
        side_multiple=multiple,
        min_steps=max([2, *(c.min_steps for c in published)]),
        max_steps=min([s.max_steps, *(c.max_steps for c in published)]),
        max_rounds=min([s.max_rounds, *(c.max_rounds for c in published)]),
        max_prompt_chars=s.max_prompt_chars,
        max_prompt_tokens=min([s.max_prompt_tokens, *(c.max_prompt_tokens for c in published)])
        if published
        else None,
        max_upload_bytes=s.max_upload_bytes,
        max_image_pixels=s.max_image_pixels,
        max_image_side=s.max_image_side,
    )

    def common(name: str) -> list[str]:
        sets = [set(getattr(c, name)) for c in published]
        return sorted(set.intersection(*sets)) if sets else []

    def each(name: str) -> list[str]:
        return sorted({getattr(c, name) for c in published})

    models = each("model")
    hashes = each("model_hash")
    tasks = [t for t in _SETTINGS_TASKS if not published or all(t in c.tasks for c in published)]
    return ServiceInfo(
        workers=len(published),
        model=models[0]
        if len(models) == 1
        else (",".join(models) or (Path(s.model).name if s.model else None)),
        model_hash=hashes[0] if len(hashes) == 1 else None,
        tasks=tasks,
        device=each("device"),
        dtype=each("dtype"),
        weights=common("weights"),
        backend=each("backend"),
        attention=each("attention"),
        speed_modes=common("speed_modes") if published else ["exact"],
        limits=limits,
        tokenizer_hashes=sorted({c.tokenizer_hash for c in published if c.tokenizer_hash}),
    )


async def current_info(rt: Runtime) -> ServiceInfo:
    """The intersection as of now: every live worker's last published capabilities and the settings."""
    published = [
        Capabilities.from_dict(w.capabilities) for w in await rt.queue.worker_stats() if w.capabilities
    ]
    return service_info(rt.settings, published)


async def prompt_tokens(rt: Runtime, info: ServiceInfo, prompt: str) -> int | None:
    """The prompt's length in tokens by the live workers' tokenizers (the most of them: a rollout may mix
    two), or None when none is readable yet. Tokenizers are fetched once per hash and kept."""
    counts = []
    for sha in info.tokenizer_hashes:
        tok = rt.tokenizers.get(sha)
        if tok is None:
            text = await rt.queue.tokenizer_json(sha)
            if text is None:
                continue
            from engine.tokenizer import Tokenizer  # the `tokenizers` library only; no torch

            tok = rt.tokenizers[sha] = await anyio.to_thread.run_sync(Tokenizer.from_json, text)
        counts.append(await anyio.to_thread.run_sync(tok.count_tokens, prompt, limiter=rt.decode_limiter))
    return max(counts, default=None)
