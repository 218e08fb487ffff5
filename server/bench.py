"""Serving benchmark: API overhead per request, jobs/s through each queue backend, submit-to-first-preview;
and (`--sweep`) refine throughput through the real worker per `max_batch_jobs`.

    python -m server.bench                          # tiny random model, both backends, JSON on stdout
    python -m server.bench --model /ckpt --device cuda --backend redis --redis-url redis://host:6379/0
    python -m server.bench --sweep --preset bagel-7b --device cuda --sizes 512:20,1024:10 --batch 1,4,8
    python -m server.bench --sweep --preset tiny --sizes 64:4 --batch 1,2 --sweep-jobs 4   # CPU smoke

The sweep submits `--sweep-jobs` refines at once (all clients waiting on their SSE streams, `preview_every`
1) to the in-process queue and worker, for every size and every `max_batch_jobs`, and reports jobs per
minute, submit-to-completed latency (p50 / p95) and time to first preview (p50 / p95). `--preset` builds
the engine from random weights (no checkpoint on disk); its exact backend captures CUDA graphs for the
steady batches (3 x jobs branches of each size).

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


def _s(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"n": 0}
    return {"p50_s": round(_pct(xs, 50), 3), "p95_s": round(_pct(xs, 95), 3), "n": len(xs)}


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


def _png_b64(size: int, seed: int) -> str:
    import base64
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8")).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _refine_jobs(url: str, jobs: int, size: int, steps: int) -> dict[str, Any]:
    """`jobs` refines submitted at once, each client on its job's SSE stream: latency and first preview."""
    image = _png_b64(size, 0)

    def one(i: int) -> tuple[float, float | None]:
        body = {"image": image, "prompt": f"refine job {i}", "steps": steps, "seed": i, "preview_every": 1}
        first = None
        with httpx.Client(base_url=url, timeout=1800) as c:
            t0 = time.perf_counter()
            with c.stream("POST", "/v1/refine", json=body, headers={"Accept": "text/event-stream"}) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"refine answered {r.status_code}: {r.read()[:200]!r}")
                for line in r.iter_lines():
                    if line == "event: preview" and first is None:
                        first = time.perf_counter() - t0
                    elif line in ("event: failed", "event: cancelled"):
                        raise RuntimeError(f"job {i} ended with {line}")
                    elif line == "event: completed":
                        return time.perf_counter() - t0, first
        raise RuntimeError(f"job {i}: stream ended before completion")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(jobs) as pool:
        done = list(pool.map(one, range(jobs)))
    wall = time.perf_counter() - t0
    return {
        "jobs": jobs,
        "wall_s": round(wall, 3),
        "jobs_per_min": round(jobs / wall * 60, 2),
        "latency": _s([lat for lat, _ in done]),
        "time_to_first_preview": _s([f for _, f in done if f is not None]),
    }


def _sweep_engine(
    args: argparse.Namespace, sizes: list[tuple[int, int]], batches: list[int]
) -> tuple[Any, str]:
    """The engine the sweep serves: random weights of a preset (exact backend), or a checkpoint."""
    from engine.checkpoint import read_config
    from engine.loading import resolve_device, resolve_dtype
    from engine.tiny import preset

    device = resolve_device(args.device)
    buckets: tuple[str, ...] = ()
    if args.graph_buckets == "auto":
        # Steady batches only: `b` jobs of one size, all three CFG branches.
        down = (preset(args.preset) if args.preset else read_config(args.model)).latent_downsample
        buckets = tuple(f"{3 * b}x{(size // down) ** 2}" for size, _ in sizes for b in batches)
    elif args.graph_buckets != "none":
        buckets = tuple(x for x in args.graph_buckets.split(",") if x)
    options = {"graph_buckets": buckets}
    if args.preset:
        from engine.backends.exact import ExactBackend
        from engine.core import Engine
        from engine.tiny import random_weights

        dtype = resolve_dtype(None, device)
        w = random_weights(args.preset, device, dtype)
        engine = Engine(
            w.cfg, w.tokenizer, {"rvr": w.model}, w.vae, device, dtype, backend=ExactBackend(buckets)
        )
        return engine, f"random weights ({args.preset})"
    from engine import load_engine

    return load_engine(args.model, device=args.device, backend_options=options), str(args.model)


def _sweep(args: argparse.Namespace) -> int:
    sizes = [tuple(int(v) for v in x.split(":")) for x in args.sizes.split(",") if x]
    batches = [int(b) for b in args.batch.split(",") if b]
    jobs = args.sweep_jobs or max(batches)
    engine, model = _sweep_engine(args, sizes, batches)
    t0 = time.perf_counter()
    warm = engine.warm_up()
    warm_s = time.perf_counter() - t0
    results: list[dict[str, Any]] = []
    for size, steps in sizes:
        first = True
        for b in batches:
            settings = Settings(
                max_batch_jobs=b,
                max_queue_depth=max(64, 2 * jobs),
                queue_poll_ms=5,
                drain_delay_s=0,
                warmup=False,
                max_output_side=max(2048, size),
                key_prefix=f"bench{os.getpid()}",
            )
            with _stack(settings, engine) as url:
                if first:  # untimed: autotuning, attention choices, allocator growth at this size
                    _refine_jobs(url, min(jobs, max(batches)), size, 3)
                    first = False
                row = {
                    "size": size,
                    "steps": steps,
                    "max_batch_jobs": b,
                    **_refine_jobs(url, jobs, size, steps),
                }
            results.append(row)
            lat, ttfp = row["latency"], row["time_to_first_preview"]
            print(
                f"{size}^2 x{steps} batch {b}: {row['jobs_per_min']} jobs/min, "
                f"latency p50 {lat.get('p50_s')} p95 {lat.get('p95_s')} s, "
                f"first preview p50 {ttfp.get('p50_s')} p95 {ttfp.get('p95_s')} s",
                file=sys.stderr,
            )
    import torch

    denoiser = engine.denoiser
    report = {
        "conditions": {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": str(engine.device),
            "gpu": torch.cuda.get_device_name(0) if engine.device.type == "cuda" else None,
            "torch": torch.__version__,
            "model": model,
            "backend": engine.backend.name,
            "dtype": str(engine.dtype).removeprefix("torch."),
            "queue": "in-process (memory), worker thread in this process, real HTTP + SSE",
            "jobs_per_config": jobs,
            "preview_every": 1,
            "warm_up": warm,
            "warm_up_s": round(warm_s, 3),
        },
        "results": results,
        "graphs": {"replays": denoiser.replays, "fallbacks": denoiser.fallbacks}
        if hasattr(denoiser, "replays")
        else None,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


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
    sweep = p.add_argument_group("throughput sweep (--sweep): refines through the in-process worker")
    sweep.add_argument("--sweep", action="store_true", help="run the max_batch_jobs sweep instead")
    sweep.add_argument(
        "--preset", choices=("tiny", "small", "bagel-7b"), help="random weights, no checkpoint"
    )
    sweep.add_argument("--sizes", default="512:20,1024:10", help="SIZE:NUM_TIMESTEPS pairs")
    sweep.add_argument("--batch", default="1,4,8", help="max_batch_jobs values")
    sweep.add_argument("--graph-buckets", default="auto", help="auto, none, or BRANCHESxLATENT_ROWS list")
    sweep.add_argument(
        "--sweep-jobs", type=int, default=0, help="refines per config (default: largest batch)"
    )
    sweep.add_argument("--out", default=None, help="write the sweep's JSON here (default: stdout)")
    args = p.parse_args(argv)
    if args.sweep:
        if not args.model and not args.preset:
            args.preset = "tiny"
        return _sweep(args)

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
