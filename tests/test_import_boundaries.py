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
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "engine.model", "engine.batching")))
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


def test_engine_never_imports_training():
    """`training` is built on `engine`; the engine (and so the serving worker) never needs it."""
    probe = (
        "import sys, pkgutil, importlib, engine\n"
        "for m in pkgutil.walk_packages(engine.__path__, 'engine.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(','.join(sorted(m for m in sys.modules if m == 'training' or m.startswith('training.'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip() == "", f"engine imported: {out.stdout.strip()}"
