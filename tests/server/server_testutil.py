"""Real parts for server tests (redis-server processes, uvicorn servers, rvr subprocesses) and HTTP helpers."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from server.settings import Settings

REPO = Path(__file__).resolve().parents[2]


# Steps of a job that must still be running when the test acts on it (cancel, kill, overload). CPU
# speed varies 10x under load, so "long" is the engine's maximum (x 8 rounds); such jobs are cancelled.
LONG = 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.02, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# ---- redis ----
class RedisServer:
    """A real redis-server: random port, temp dir, AOF on (fsync every write), no RDB snapshots."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        cmd += [
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        wait_until(lambda: _ping(client), 10, what="redis-server")
        client.close()

    def stop(self) -> None:
        """Graceful: redis flushes the AOF and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _ping(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


# ---- HTTP ----
class LiveServer:
    """uvicorn serving `app` in a thread on a free port; real sockets, real HTTP."""

    def __init__(self, app) -> None:
        import uvicorn

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        wait_until(lambda: self.server.started, 20, what="uvicorn start")
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        wait_until(lambda: httpx.get(self.url + "/readyz").status_code == 200, timeout, 0.05, "readyz")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class Stack:
    """An API (and its worker: in-process thread, or a Redis worker thread) on a real port."""

    def __init__(self, backend: str, settings: Settings, engine, redis_url: str | None = None) -> None:
        from server.app import create_app

        self.backend = backend
        self.settings = settings
        self.worker = None
        self.worker_thread = None
        self.app = create_app(settings, engine=engine)
        self.live = LiveServer(self.app)
        self.url = self.live.url
        self.engine = engine

    def start(self) -> Stack:
        self.live.start()
        if self.backend == "redis":
            from server.metrics import Metrics
            from server.queue import make_worker_queue
            from server.worker import Worker

            self.worker = Worker(
                self.settings, make_worker_queue(self.settings), Metrics(), engine=self.engine
            )
            self.worker_thread = threading.Thread(target=self.worker.run, daemon=True)
            self.worker_thread.start()
            wait_until(self.worker.ready.is_set, 60, what="redis worker ready")
        self.live.wait_ready()
        return self

    def worker_metrics(self):
        return self.worker.metrics if self.worker is not None else self.rt.metrics

    @property
    def rt(self):
        return self.app.state.rt

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker_thread.join(30)
            self.worker.queue.close()
        self.live.stop()


def stack_settings(backend: str, tiny_model: Path, redis_url: str | None, **overrides) -> Settings:
    base: dict[str, Any] = {
        "model": str(tiny_model),
        "device": "cpu",
        "warmup": False,
        "queue_poll_ms": 20,
        "drain_delay_s": 0,
        "drain_timeout_s": 5,
        "heartbeat_interval_s": 0.2,
        "reaper_interval_s": 0.5,
        "sse_heartbeat_s": 1,
        "worker_name": f"w-{uuid.uuid4().hex[:6]}",
        "max_steps": LONG,
    }
    if backend == "redis":
        base["redis_url"] = redis_url
        base["key_prefix"] = f"t{uuid.uuid4().hex[:10]}"
    base.update(overrides)
    return Settings(**base)


# ---- subprocesses (rvr serve / rvr worker) ----
def rvr_env(**env: str) -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = str(REPO) + os.pathsep + out.get("PYTHONPATH", "")
    out.update(env)
    return out


@contextlib.contextmanager
def rvr_process(args: list[str], env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen]:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", *args],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


# ---- HTTP helpers ----


def image_bytes(size: tuple[int, int] = (64, 48), fmt: str = "PNG", color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def poll(client: httpx.Client, job_id: str, until: set[str], timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = client.get(f"/v1/jobs/{job_id}").json()
        if view["status"] in until:
            return view
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached {until}; last {view}")


def refine_multipart(client: httpx.Client, prompt: str = "a red apple", image: bytes | None = None, **fields):
    data = {"prompt": prompt, **{k: str(v) for k, v in fields.items()}}
    files = {"image": ("in.png", image or image_bytes(), "image/png")}
    return client.post("/v1/refine", data=data, files=files)


def parse_sse(lines) -> list[dict]:
    """SSE lines -> [{id, event, data}] (comments and retry lines skipped)."""
    events, cur = [], {}
    for line in lines:
        if line == "":
            if "event" in cur:
                events.append(cur)
            cur = {}
        elif line.startswith(":") or line.startswith("retry:"):
            continue
        else:
            key, _, value = line.partition(": ")
            cur[key] = json.loads(value) if key == "data" else value
    return events


def read_sse(
    client: httpx.Client, method: str, url: str, stop_after: int | None = None, **kwargs
) -> list[dict]:
    """Read a stream to its end, or disconnect after `stop_after` events."""
    headers = {"Accept": "text/event-stream", **kwargs.pop("headers", {})}
    events: list[dict] = []
    with client.stream(method, url, headers=headers, **kwargs) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        cur: list[str] = []
        for line in resp.iter_lines():
            cur.append(line)
            if line == "":
                events += parse_sse(cur)
                cur = []
                if stop_after is not None and len(events) >= stop_after:
                    break
    return events
