"""`rvr` command line: `serve` (API; plus the worker with the in-process queue), `worker` (Redis-backed
GPU worker), `settings` (the settings table), and the engine's commands from `engine.cli`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from server.settings import Settings, add_cli_flags, settings_from_args, settings_table_markdown

log = logging.getLogger("rvr.cli")

# Training commands parse their own arguments: `rvr eval ...` runs `training.evaluate.main([...])`.
# The `training` package sits beside `engine` (it imports the engine, never the reverse).
TRAINING_COMMANDS = {
    "eval": ("training.evaluate", "mini-GenEval of a model on held-out prompts of the synthetic world"),
    "train": ("training.runs", "the staged training run: world data, autoencoder, T2I, judge, RvR"),
    "finetune": ("training.trainer", "fine-tune a checkpoint on release-format records (torchrun: sharded)"),
}


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (`rvr refine: error: ...`) with exit status 2; `--help` shows usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rvr", description="rvr-serve: RvR refinement service and tools")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="HTTP API (with the in-process queue it also runs the worker)")
    add_cli_flags(serve)
    worker = sub.add_parser("worker", help="GPU worker on the Redis queue (needs --redis-url)")
    add_cli_flags(worker)
    sub.add_parser("settings", help="print every setting as a Markdown table")
    info = sub.add_parser(
        "info", help="load the model as rvr serve would and print what GET /v1/info would serve (JSON)"
    )
    add_cli_flags(info)
    try:
        from engine import cli as engine_cli  # argparse only at import; torch loads when a command runs
    except ImportError:
        engine_cli = None
    if engine_cli is not None:
        engine_cli.register(sub)
    for name, (_, summary) in TRAINING_COMMANDS.items():
        # Listed for --help only; `run_training_command` handles them before the main parse.
        sub.add_parser(name, help=f"{summary} (rvr {name} --help)", add_help=False)
    parser.set_defaults(engine_cli=engine_cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TRAINING_COMMANDS:
        return run_training_command(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "settings":
        sys.stdout.write(settings_table_markdown())
        return 0
    if args.command in ("serve", "worker", "info"):
        try:
            settings = settings_from_args(args)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            print(f"rvr {args.command}: error: invalid settings: {_settings_problems(exc)}", file=sys.stderr)
            return 2
        if args.command == "info":
            return print_info(settings)
        return serve(settings) if args.command == "serve" else run_worker(settings)
    return int(args.engine_cli.run(args))


def print_info(settings: Settings) -> int:
    """The capabilities and limits of `GET /v1/info` for these settings and this machine's model."""
    import dataclasses
    import json

    from engine.errors import EngineError
    from server.capabilities import service_info
    from server.worker import load_engine_for

    try:
        engine = load_engine_for(settings)
    except (EngineError, OSError) as exc:
        print(f"rvr info: error: {exc}", file=sys.stderr)
        return 1
    caps = engine.capabilities()
    log.info("engine: %s", caps.summary())
    print(json.dumps(dataclasses.asdict(service_info(settings, [caps])), indent=2))
    return 0


def run_training_command(command: str, argv: list[str]) -> int:
    """Run a training command with its own argument parser; returns the exit code."""
    import importlib

    module = importlib.import_module(TRAINING_COMMANDS[command][0])
    sys.argv[0] = f"rvr {command}"  # so its usage line names the command
    try:
        module.main(argv)
    except SystemExit as exc:  # argparse exits; keep its status
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def _settings_problems(exc: ValueError) -> str:
    """pydantic errors as `field: message; ...` (one line); other ValueErrors as their text."""
    errors = getattr(exc, "errors", None)
    if errors is None:
        return str(exc)
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in errors())


def _draining_server(config: Any, app: Any, drain_delay_s: float) -> Any:
    """A uvicorn.Server whose first SIGTERM/SIGINT only marks the app draining (not ready, new submits
    503) and stops it after `drain_delay_s`, so endpoints are removed before the socket closes."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            rt = app.state.rt
            if rt.draining.is_set():
                return super().handle_exit(sig, frame)  # second signal: stop now
            log.info("signal %s: draining for %.1fs", sig, drain_delay_s)
            rt.draining.set()
            # Setting should_exit (not super().handle_exit) keeps uvicorn from re-raising the signal
            # after shutdown, so a completed drain exits 0.
            timer = threading.Timer(drain_delay_s, lambda: setattr(self, "should_exit", True))
            timer.daemon = True
            timer.start()

    return Server(config)


def serve(settings: Settings) -> int:
    import uvicorn

    from server.app import create_app

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
    )
    _draining_server(config, app, settings.drain_delay_s).run()
    worker = app.state.rt.worker
    return 1 if worker is not None and worker.fatal is not None else 0


def _probe_server(settings: Settings, worker: Any, metrics: Any) -> ThreadingHTTPServer | None:
    """A worker's /livez (loop heartbeat fresh), /readyz (warm, not draining), /metrics."""
    if settings.worker_port == 0:
        return None

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                return self._send(200, metrics.render(), "text/plain; version=0.0.4")
            if self.path == "/livez":
                stalled = time.time() - worker.last_tick > max(60.0, 10 * settings.heartbeat_interval_s)
                ok = not worker.ready.is_set() or not stalled
                return self._send(200 if ok else 503, b"ok" if ok else b"stalled")
            if self.path == "/readyz":
                ok = worker.ready.is_set() and not worker.stopped.is_set() and not worker.draining
                return self._send(200 if ok else 503, b"ready" if ok else b"not ready")
            return self._send(404, b"not found")

        def _send(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # probes every few seconds would flood the log
            return None

    server = ThreadingHTTPServer((settings.host, settings.worker_port), Handler)
    threading.Thread(target=server.serve_forever, name="rvr-probes", daemon=True).start()
    return server


def run_worker(settings: Settings) -> int:
    from server.metrics import Metrics
    from server.queue import make_worker_queue
    from server.worker import Worker

    metrics = Metrics()
    worker = Worker(settings, make_worker_queue(settings), metrics)

    def on_signal(sig: int, frame: Any) -> None:
        log.info("signal %s: draining (up to %.1fs)", sig, settings.drain_timeout_s)
        worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    probes = _probe_server(settings, worker, metrics)
    worker.load()
    log.info("worker %s ready", settings.worker_name)
    worker.run()
    if probes is not None:
        probes.shutdown()
    return 1 if worker.fatal is not None else 0


if __name__ == "__main__":
    sys.exit(main())
