"""Typed job events, and the Server-Sent Events decoder they are read with.

Every event keeps its raw `data` dict; the typed classes add properties over it, so fields the server
adds later are still there (`event.data[...]`) and an unknown event type comes through as `Event`.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from typing import Any

TERMINAL_TYPES = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True)
class Event:
    """One event of a job's stream. `id` is what `Last-Event-ID` resumes after."""

    id: str | None
    type: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES


class QueuedEvent(Event):
    @property
    def position(self) -> int | None:
        return self.data.get("position")


class StartedEvent(Event):
    @property
    def total(self) -> int | None:
        return self.data.get("total")


class ProgressEvent(Event):
    """One denoising step done: `step` of `total` in round `round` of `rounds`."""

    @property
    def step(self) -> int:
        return int(self.data.get("step", 0))

    @property
    def total(self) -> int:
        return int(self.data.get("total", 0))

    @property
    def round(self) -> int:
        return int(self.data.get("round", 1))

    @property
    def rounds(self) -> int:
        return int(self.data.get("rounds", 1))


class PreviewEvent(Event):
    """The current x0 estimate, downscaled (jobs with `preview_every`)."""

    @property
    def step(self) -> int:
        return int(self.data.get("step", 0))

    @property
    def round(self) -> int:
        return int(self.data.get("round", 1))

    @property
    def format(self) -> str:
        return str(self.data.get("format", "jpeg"))

    @property
    def image_bytes(self) -> bytes:
        return base64.b64decode(self.data.get("image", ""))

    @property
    def image(self) -> Any:
        """A PIL image (needs Pillow)."""
        from rvr_client.results import open_image

        return open_image(io.BytesIO(self.image_bytes))


class CompletedEvent(Event):
    @property
    def seed(self) -> int | None:
        return self.data.get("seed")

    @property
    def score(self) -> float | None:
        return self.data.get("score")


class FailedEvent(Event):
    @property
    def code(self) -> str:
        return str(self.data.get("code", "generation_failed"))

    @property
    def message(self) -> str:
        return str(self.data.get("message", ""))


class CancelledEvent(Event):
    pass


_TYPES: dict[str, type[Event]] = {
    "queued": QueuedEvent,
    "started": StartedEvent,
    "progress": ProgressEvent,
    "preview": PreviewEvent,
    "completed": CompletedEvent,
    "failed": FailedEvent,
    "cancelled": CancelledEvent,
}


def make_event(event_id: str | None, etype: str, data: str) -> Event:
    try:
        payload = json.loads(data) if data else {}
    except ValueError:
        payload = {"text": data}
    if not isinstance(payload, dict):
        payload = {"value": payload}
    return _TYPES.get(etype, Event)(event_id, etype, payload)


class SSEDecoder:
    """Lines of a `text/event-stream` -> events, per the WHATWG parsing rules (multi-line data, comments,
    `retry:`). `last_id` is the id of the last *dispatched* event, the one a reconnect resumes after: an
    event cut off mid-way by a dropped connection is never counted as seen."""

    def __init__(self, last_id: str | None = None) -> None:
        self.last_id = last_id
        self.retry_ms: int | None = None
        self._reset()

    def _reset(self) -> None:
        self._type = ""
        self._data: list[str] = []
        self._id_buffer = self.last_id

    def restart(self) -> None:
        """A new connection: drop the half-read event."""
        self._reset()

    def feed(self, line: str) -> Event | None:
        if line == "":
            if not self._data and not self._type:
                return None
            self.last_id = self._id_buffer
            event = make_event(self.last_id, self._type or "message", "\n".join(self._data))
            self._type, self._data = "", []
            return event
        if line.startswith(":"):
            return None  # a comment (the server's keep-alive)
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id_buffer = value or None
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None
