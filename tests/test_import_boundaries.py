"""The API side of `server` never imports torch or `engine`: API pods run without them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_PROBE = """
import sys
import server.app, server.cli, server.queue.memory, server.queue.redis_api, server.queue.redis_worker
from server.app import create_app
from server.settings import Settings
create_app(Settings())
server.cli.build_parser()
import server.worker  # the worker module too: it imports engine lazily, when the engine loads
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "engine.model", "engine.core")))
print(",".join(bad))
"""


def test_server_imports_no_torch():
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "", f"imported at module level: {out.stdout.strip()}"


def test_server_public_surface():
    import server

    assert server.__all__ == ["Settings", "create_app"]
    assert callable(server.create_app) and server.Settings().backend == "memory"


def _imported_by(setup: str, prefixes: tuple[str, ...]) -> list[str]:
    """Modules under `prefixes` that running `setup` in a fresh interpreter imports."""
    probe = f"import sys\n{setup}\nprint(','.join(sorted(sys.modules)))\n"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300, check=True
    )
    modules = out.stdout.strip().split(",")
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes)]


def test_engine_never_imports_training_or_the_server():
    """`training` is built on `engine`; the engine (and so the serving worker) never needs it, and it
    knows nothing of HTTP or queues."""
    every_engine_module = (
        "import pkgutil, importlib, engine\n"
        "for m in pkgutil.walk_packages(engine.__path__, 'engine.'):\n"
        "    importlib.import_module(m.name)"
    )
    assert _imported_by(every_engine_module, ("training", "server", "fastapi", "starlette", "redis")) == []


def test_batcher_is_pure_policy():
    """The batching policy decides from plain data: it imports nothing of the engine, the queue or metrics."""
    seen = _imported_by(
        "import server.batcher",
        ("engine", "torch", "server.queue", "server.metrics", "server.worker", "prometheus_client", "redis"),
    )
    assert seen == []
