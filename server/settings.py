"""The one settings object of a server process: `RVR_*` environment variables, CLI flags, defaults.

Every limit and knob lives here with a unit in its name. `add_cli_flags` and `settings_table_markdown`
read the same field metadata, so `--help`, the README table and the code cannot drift apart.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import socket
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_GRAPH_BUCKET = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")
# Tokens a copied example would leave in place; refused at startup.
_PLACEHOLDER_KEYS = {"changethis", "changeme", "secret", "password", "test", "example"}


def parse_list_setting(value: Any, name: str) -> Any:
    """A list setting from an env var or flag: a JSON list of strings (`'["a", "b"]'`) or comma-separated
    values (`a,b`). Anything else (broken JSON, a JSON object, non-string items) is refused, naming `name`,
    so a mistyped value fails at start-up instead of becoming one odd entry."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith(("[", "{", '"')):
        try:
            parsed = json.loads(text)
        except ValueError:
            raise ValueError(
                f"{name}: {text[:40]!r} is neither a JSON list nor comma-separated values"
            ) from None
        if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
            raise ValueError(f'{name}: a JSON value must be a list of strings, e.g. ["a", "b"]')
        return [v.strip() for v in parsed if v.strip()]
    return [v.strip() for v in text.split(",") if v.strip()]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RVR_", extra="ignore", validate_default=True)

    # Process and model.
    model: str | None = Field(None, description="Checkpoint directory; unset: bundled demo or tiny model")
    device: str | None = Field(None, description="Torch device of the worker (cuda, cpu); unset: auto")
    dtype: str | None = Field(None, description="Weight dtype (bfloat16, float32); unset: engine default")
    weights: Literal["auto", "both", "rvr", "ema"] = Field(
        "auto", description="Weight files kept resident: auto/both (refine: rvr, others: ema), or one of them"
    )
    engine_backend: Literal["exact", "eager", "inductor", "tensorrt"] = Field(
        "exact",
        description="Engine backend: exact (fused kernels, CUDA graphs), eager (reference), inductor, "
        "tensorrt",
    )
    attention: Literal["auto", "kernel", "reference", "sdpa"] = Field(
        "auto",
        description="LLM attention: auto (CUDA: kernel, or kernel vs SDPA measured per shape under exact), "
        "kernel, reference, sdpa",
    )
    cuda_graph_buckets: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["3x4096", "3x1024"],
        description="Exact backend: denoising-step CUDA graphs captured at warm-up, BRANCHESxLATENT_ROWS",
    )
    cuda_graph_max_padding: float = Field(
        0.25, ge=0, description="Largest fraction of padded latent rows a step may replay a CUDA graph with"
    )
    kv_capacity_tokens: int | None = Field(
        None, ge=1, description="Fixed KV-pool size in tokens per weight set; unset: grows on demand"
    )
    max_prompt_tokens: int = Field(1024, ge=1, description="Longest prompt in tokens the engine accepts")
    host: str = Field("127.0.0.1", description="Address the HTTP server binds")
    port: int = Field(8000, ge=0, le=65535, description="Port of the API (rvr serve)")
    redis_url: str | None = Field(None, description="Redis URL; unset: in-process queue, API + worker in one")
    key_prefix: str = Field("rvr", min_length=1, description="Prefix of every Redis key")
    worker_name: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        description="Consumer name of a worker; stable across restarts (a pod's hostname-pid is)",
    )
    worker_port: int = Field(9100, ge=0, le=65535, description="Port of a worker's /livez, /readyz, /metrics")
    warmup: bool = Field(True, description="Run one tiny job through the engine before reporting ready")
    web_ui: bool = Field(True, description="Serve the web page at / (the API docs at /docs stay)")

    # Admission and deadlines.
    max_queue_depth: int = Field(64, ge=0, description="Jobs waiting for a worker before new ones get 503")
    max_queue_wait_s: float = Field(600.0, gt=0, description="Default and cap of a job's deadline_s")
    retry_after_min_s: int = Field(1, ge=0, description="Lower clamp of a computed Retry-After")
    retry_after_max_s: int = Field(60, ge=1, description="Upper clamp of a computed Retry-After")
    max_wait_s: float = Field(300.0, gt=0, description="Longest a `Prefer: wait` request is held open")

    # Uploads and inputs.
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Request body cap (413 above)")
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="Input pixel cap, read from the header (400)"
    )
    max_image_side: int = Field(8192, ge=1, description="Input side cap, read from the header (400)")
    max_prompt_chars: int = Field(4000, ge=1, description="Longest prompt accepted (422 above)")
    max_steps: int = Field(200, ge=2, description="Most denoising steps a job may ask for")
    max_rounds: int = Field(8, ge=1, description="Most refine rounds a job may ask for")
    max_output_side: int = Field(2048, ge=16, description="Largest output height or width a job may ask for")
    output_size_multiple: int = Field(
        16, ge=1, description="Output sides must be multiples of this (VAE x patch)"
    )
    decode_threads: int = Field(4, ge=1, description="Threads decoding and re-encoding uploads")

    # Worker and batching.
    max_batch_jobs: int = Field(8, ge=1, description="Jobs in the running batch of one worker")
    token_budget: int = Field(262144, ge=1, description="KV + query tokens the running batch may hold")
    queue_poll_ms: int = Field(200, ge=1, description="How long an idle worker blocks waiting for a job")
    preview_max_side: int = Field(256, ge=16, description="Longest side of a preview image")
    preview_format: Literal["jpeg", "webp"] = Field("jpeg", description="Preview encoding")
    preview_quality: int = Field(75, ge=1, le=100, description="Preview JPEG/WebP quality")
    max_previews_per_round: int = Field(
        50, ge=1, description="Previews per round at most; a smaller preview_every is raised to fit"
    )
    preview_threads: int = Field(
        2, ge=1, description="Threads encoding previews and results off the GPU loop"
    )

    # Redis queue reliability.
    visibility_timeout_s: float = Field(30.0, gt=0, description="Idle time after which a job is reclaimed")
    reaper_interval_s: float = Field(5.0, gt=0, description="Period of the reclaim scan in every worker")
    heartbeat_interval_s: float = Field(2.0, gt=0, description="Period of running-job claim refresh")
    max_deliveries: int = Field(3, ge=1, description="Deliveries after which a job is dead-lettered")
    result_ttl_s: int = Field(3600, ge=1, description="Lifetime of results, job records and events")
    idempotency_ttl_s: int = Field(86400, ge=1, description="Lifetime of an Idempotency-Key")
    events_maxlen: int = Field(10000, ge=10, description="Approximate cap of one job's event stream")
    dead_letter_maxlen: int = Field(10000, ge=10, description="Approximate cap of the dead-letter stream")

    # Drain, SSE, auth.
    drain_delay_s: float = Field(5.0, ge=0, description="API: time not-ready before it stops on SIGTERM")
    drain_timeout_s: float = Field(25.0, ge=0, description="Worker: time to finish its batch on SIGTERM")
    sse_heartbeat_s: float = Field(15.0, gt=0, description="Comment sent on a quiet SSE stream")
    sse_retry_ms: int = Field(1000, ge=0, description="SSE `retry:` sent when a stream closes on drain")
    api_key_sha256: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="SHA-256 hex digests of bearer API keys; empty: no auth"
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Plain API keys (compared by SHA-256 digest); prefer api_key_sha256"
    )

    @field_validator("api_key_sha256", "api_keys", "cuda_graph_buckets", mode="before")
    @classmethod
    def _parse_list(cls, value: Any, info: ValidationInfo) -> Any:
        return parse_list_setting(value, f"RVR_{info.field_name.upper()}")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if any(k.lower() in _PLACEHOLDER_KEYS for k in self.api_keys):
            raise ValueError("api_keys holds a placeholder secret; set a real key")
        for digest in self.api_key_sha256:
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
                raise ValueError("api_key_sha256 entries must be 64 hex characters")
        if self.retry_after_min_s > self.retry_after_max_s:
            raise ValueError("retry_after_min_s must not exceed retry_after_max_s")
        if self.queue_poll_ms / 1000 >= self.max_queue_wait_s:
            raise ValueError("queue_poll_ms must be below max_queue_wait_s")
        for spec in self.cuda_graph_buckets:  # the engine parses them (engine/step/buckets.py); no torch here
            m = _GRAPH_BUCKET.match(spec)
            if m is None or int(m.group(1)) < 1 or int(m.group(2)) < 1:
                raise ValueError(
                    f"cuda_graph_buckets entry {spec!r} is not BRANCHESxLATENT_ROWS (e.g. 3x4096)"
                )
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        return self

    @property
    def backend(self) -> str:
        return "redis" if self.redis_url else "memory"

    def key_digests(self) -> list[bytes]:
        """Digests of every accepted key: configured digests plus the plain keys, hashed."""
        digests = [bytes.fromhex(d) for d in self.api_key_sha256]
        digests += [hashlib.sha256(k.encode()).digest() for k in self.api_keys]
        return digests


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default_text(name: str) -> str:
    field = Settings.model_fields[name]
    if field.default_factory is not None:
        if name == "worker_name":
            return "hostname-pid"
        return ",".join(field.default_factory()) or "[]"
    return "unset" if field.default is None else repr(field.default).strip("'")


def add_cli_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting. Unset flags stay absent so environment variables still apply."""
    for name, field in Settings.model_fields.items():
        help_text = f"{field.description} (env RVR_{name.upper()}, default {_default_text(name)})"
        if field.annotation is bool:
            parser.add_argument(
                _flag(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            parser.add_argument(_flag(name), dest=name, default=argparse.SUPPRESS, help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags win over environment variables, which win over defaults."""
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    return Settings(**given)


def settings_table_markdown() -> str:
    """The README table of every setting: flag, environment variable, default, meaning."""
    rows = ["| Flag | Environment | Default | Meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        rows.append(
            f"| `{_flag(name)}` | `RVR_{name.upper()}` | `{_default_text(name)}` | {field.description} |"
        )
    return "\n".join(rows) + "\n"
