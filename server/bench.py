"""Serving benchmark: API overhead per request, jobs/s through each queue backend, submit-to-first-preview.

    python -m server.bench                          # tiny random model, both backends, JSON on stdout
    python -m server.bench --model /ckpt --device cuda --backend redis --redis-url redis://host:6379/0

Everything runs through real HTTP (uvicorn on a local port). The worker runs on a thread of this
process (in-process backend: the app's own worker; Redis: one `Worker` on the Redis queue), so the
figures include the GIL contention of API and worker sharing a process. Prints one JSON document
with the conditions (device, torch version, CPU count, settings, date) next to every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import httpx

from server.settings import Settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def _ms(xs: list[float]) -> dict[str, float]:
    return {"p50_ms": round(_pct(xs, 50) * 1000, 3), "p99_ms": round(_pct(xs, 99) * 1000, 3), "n": len(xs)}


@contextlib.contextmanager
def _redis_server() -> Iterator[str]:
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server not found; pass --redis-url")
    workdir = tempfile.mkdtemp(prefix="rvr-bench-redis-")
    port = _free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir]
    cmd += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis

        client = redis.Redis(port=port)
        _wait(client.ping, 10, "redis-server")
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def _stack(settings: Settings, engine: Any) -> Iterator[str]:
    """API on uvicorn (a thread) and its worker; yields the base URL once ready."""
    import uvicorn

    from server.app import create_app

    app = create_app(settings, engine=engine)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    api = threading.Thread(target=server.run, daemon=True)
    api.start()
    worker = wthread = None
    if settings.redis_url:
        from server.metrics import Metrics
        from server.queue import make_worker_queue
        from server.worker import Worker

        worker = Worker(settings, make_worker_queue(settings), Metrics(), engine=engine)
        wthread = threading.Thread(target=worker.run, daemon=True)
        wthread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: httpx.get(url + "/readyz").status_code == 200, 120, "API ready")
        yield url
    finally:
        if worker is not None:
            worker.stop()
            wthread.join(60)
            worker.queue.close()
        server.should_exit = True
        api.join(60)


def _api_overhead(url: str, n: int) -> dict[str, Any]:
    """Submit (202) and status latencies. Jobs expire at once, so the worker drops them unrun."""
    submit, status = [], []
    with httpx.Client(base_url=url, timeout=30) as client:
        ids = []
        for i in range(n):
            t0 = time.perf_counter()
            r = client.post("/v1/generate", json={"prompt": f"bench {i}", "steps": 2, "deadline_s": 0.000001})
            submit.append(time.perf_counter() - t0)
            if r.status_code != 202:
                raise RuntimeError(f"submit answered {r.status_code}: {r.text}")
            ids.append(r.json()["id"])
        for job in ids:
            t0 = time.perf_counter()
            client.get(f"/v1/jobs/{job}")
            status.append(time.perf_counter() - t0)
    return {"submit_202": _ms(submit), "get_status": _ms(status)}


def _throughput(url: str, jobs: int, steps: int, concurrency: int) -> dict[str, Any]:
    """Jobs/s for `jobs` generate jobs submitted by `concurrency` clients that wait for their results."""

    def one(i: int) -> float:
        with httpx.Client(base_url=url, timeout=600) as c:
            t0 = time.perf_counter()
            r = c.post(
                "/v1/generate",
                json={"prompt": f"job {i}", "steps": steps, "seed": i},
                headers={"Prefer": "wait"},
            )
            if r.status_code != 200:
                raise RuntimeError(f"job answered {r.status_code}: {r.text[:200]}")
            return time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, range(jobs)))
    wall = time.perf_counter() - t0
    return {
        "jobs": jobs,
        "jobs_per_s": round(jobs / wall, 3),
        "wall_s": round(wall, 3),
        "e2e": _ms(latencies),
    }


def _first_preview(url: str, runs: int, steps: int) -> dict[str, Any]:
    """Submit with `Accept: text/event-stream` and preview_every=1; time to the first `preview` event."""
    times = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(runs):
            body = {"prompt": f"preview {i}", "steps": steps, "preview_every": 1}
            t0 = time.perf_counter()
            with client.stream(
                "POST", "/v1/generate", json=body, headers={"Accept": "text/event-stream"}
            ) as r:
                for line in r.iter_lines():
                    if line == "event: preview":
                        times.append(time.perf_counter() - t0)
                        break
            # Let the job finish so runs do not overlap.
            time.sleep(0.05)
    return _ms(times)


def _conditions(settings: Settings, engine: Any, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    info = engine.info()
    gpu = torch.cuda.get_device_name(0) if str(engine.device).startswith("cuda") else None
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(engine.device),
        "gpu": gpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "model_dir": info.get("model_dir"),
        "dtype": info.get("dtype"),
        "max_image_side": info.get("max_image_side"),
        "steps": args.steps,
        "jobs": args.jobs,
        "concurrency": args.concurrency,
        "max_batch_jobs": settings.max_batch_jobs,
        "worker": "thread in the benchmark process (shares the GIL with the API)",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint dir; default: a fresh tiny random checkpoint")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", choices=["memory", "redis", "both"], default="both")
    p.add_argument("--redis-url", default=None, help="default: start a local redis-server")
    p.add_argument("--jobs", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-batch-jobs", type=int, default=8)
    p.add_argument("--overhead-requests", type=int, default=300)
    p.add_argument("--preview-runs", type=int, default=5)
    args = p.parse_args(argv)

    from engine import load_engine, make_checkpoint

    with tempfile.TemporaryDirectory(prefix="rvr-bench-ckpt-") as tmp:
        model = args.model or str(make_checkpoint(tmp, "tiny", seed=0))
        return _run(args, model, load_engine(model, device=args.device))


def _run(args: argparse.Namespace, model: str, engine: Any) -> int:
    base = {
        "model": model,
        "device": args.device,
        "max_batch_jobs": args.max_batch_jobs,
        "max_queue_depth": max(1000, args.overhead_requests + args.jobs),
        "queue_poll_ms": 5,
        "drain_delay_s": 0,
        "warmup": True,
        "key_prefix": f"bench{os.getpid()}",
    }
    results: dict[str, Any] = {}
    backends = ["memory", "redis"] if args.backend == "both" else [args.backend]
    with contextlib.ExitStack() as stack:
        for backend in backends:
            extra = {}
            if backend == "redis":
                extra["redis_url"] = args.redis_url or stack.enter_context(_redis_server())
            settings = Settings(**base, **extra)
            with _stack(settings, engine) as url:
                results[backend] = {
                    "api_overhead": _api_overhead(url, args.overhead_requests),
                    "throughput": _throughput(url, args.jobs, args.steps, args.concurrency),
                    "time_to_first_preview": _first_preview(url, args.preview_runs, args.steps),
                }
    report = {"conditions": _conditions(Settings(**base), engine, args), "results": results}
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
