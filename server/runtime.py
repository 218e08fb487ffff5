"""Per-app state shared by the routes: settings, queue, metrics, the in-process worker, drain flag."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import anyio

from server.metrics import Metrics
from server.queue.base import ApiQueue
from server.settings import Settings


@dataclass
class Runtime:
    """Everything a route needs; one per app, on `app.state.rt`."""

    settings: Settings
    queue: ApiQueue
    metrics: Metrics
    worker: Any = None  # server.worker.Worker in the in-process mode
    worker_thread: threading.Thread | None = None
    draining: threading.Event = field(default_factory=threading.Event)
    decode_limiter: anyio.CapacityLimiter | None = None
    tokenizers: dict[str, Any] = field(default_factory=dict)  # tokenizer hash -> engine Tokenizer

    def worker_ready(self) -> bool:
        return self.worker is None or (self.worker.ready.is_set() and not self.worker.stopped.is_set())
