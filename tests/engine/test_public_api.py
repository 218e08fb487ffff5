"""The `engine` package's public surface: pinned exports, lazy imports, error hierarchy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import engine

REPO = Path(__file__).resolve().parents[2]

PUBLIC = [
    "CheckpointError",
    "Engine",
    "EngineError",
    "FinishedRound",
    "GenerationRequest",
    "InvalidRequestError",
    "RequestState",
    "RoundOutput",
    "SamplingParams",
    "StepEvent",
    "StepResult",
    "TASK_DEFAULTS",
    "default_model_dir",
    "load_engine",
    "make_checkpoint",
]


def test_all_is_pinned():
    assert engine.__all__ == PUBLIC


def test_every_export_resolves():
    from engine.core import Engine, RequestState, StepResult
    from engine.errors import CheckpointError, EngineError, InvalidRequestError
    from engine.loading import default_model_dir, load_engine
    from engine.tiny import make_checkpoint
    from engine.types import (
        TASK_DEFAULTS,
        FinishedRound,
        GenerationRequest,
        RoundOutput,
        SamplingParams,
        StepEvent,
    )

    expected = {
        "CheckpointError": CheckpointError,
        "Engine": Engine,
        "EngineError": EngineError,
        "FinishedRound": FinishedRound,
        "GenerationRequest": GenerationRequest,
        "InvalidRequestError": InvalidRequestError,
        "RequestState": RequestState,
        "RoundOutput": RoundOutput,
        "SamplingParams": SamplingParams,
        "StepEvent": StepEvent,
        "StepResult": StepResult,
        "TASK_DEFAULTS": TASK_DEFAULTS,
        "default_model_dir": default_model_dir,
        "load_engine": load_engine,
        "make_checkpoint": make_checkpoint,
    }
    for name, obj in expected.items():
        assert getattr(engine, name) is obj
    with pytest.raises(AttributeError, match="no_such_thing"):
        _ = engine.no_such_thing


def test_error_hierarchy():
    assert issubclass(engine.CheckpointError, engine.EngineError)
    assert issubclass(engine.InvalidRequestError, engine.EngineError)
    assert issubclass(engine.InvalidRequestError, ValueError)  # a per-request input error
    assert not issubclass(engine.CheckpointError, engine.InvalidRequestError)


def test_released_task_defaults():
    """docs/rvr.md §4: refine, edit and notebook T2I values, written out independently."""
    d = engine.TASK_DEFAULTS
    for task in ("refine", "edit"):
        p = d[task]
        assert (p.steps, p.cfg_text, p.cfg_img, tuple(p.cfg_interval)) == (50, 4.0, 2.0, (0.0, 1.0))
        assert (p.renorm, p.renorm_min, p.shift) == ("text_channel", 0.0, 3.0)
    g = d["generate"]
    assert (g.steps, g.cfg_text, tuple(g.cfg_interval), g.renorm, g.renorm_min, g.shift) == (
        50,
        4.0,
        (0.4, 1.0),
        "global",
        0.0,
        3.0,
    )
    assert engine.SamplingParams.for_task("refine", steps=8, cfg_img=None).steps == 8
    assert engine.SamplingParams.for_task("refine", cfg_img=None).cfg_img == 2.0  # None: keep the default


def test_prompt_strings_match_spec():
    from engine.prompts import JUDGE_QUESTION, REFINE_PROMPT, REFINE_SYSTEM_PROMPT
    from tests.engine.conftest import SYSTEM_PROMPT, refine_prompt

    assert REFINE_SYSTEM_PROMPT == SYSTEM_PROMPT
    assert REFINE_PROMPT.format(user_prompt="two cats.") == refine_prompt("two cats.")
    assert len(REFINE_PROMPT) == 42 and REFINE_PROMPT.endswith(". ")
    assert "{prompt}" in JUDGE_QUESTION


def _modules_after(code: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_importing_cli_does_not_import_torch():
    mods = _modules_after("import engine, engine.cli\nengine.cli.register")
    assert "engine.cli" in mods
    heavy = {"torch", "numpy", "PIL", "safetensors", "tokenizers"}
    assert not heavy & {m.split(".")[0] for m in mods}
    # The control: touching a lazy export does import torch in the same kind of subprocess.
    assert "torch" in _modules_after("import engine\nengine.Engine")


def test_cli_help_is_cheap():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = (
        "import sys, contextlib, io\nimport engine.cli as c\n"
        "buf = io.StringIO()\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(buf): c.main(['refine', '--help'])\n"
        "assert '--image' in buf.getvalue()\nassert 'torch' not in sys.modules\nprint('ok')"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
