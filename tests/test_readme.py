"""README stays true: its settings table is the generated one, and every `rvr` command it shows exists
with the flags it uses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from server.cli import TRAINING_COMMANDS, build_parser, run_training_command
from server.settings import settings_table_markdown

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_settings_table_is_current():
    assert settings_table_markdown().strip() in README


def _rvr_lines() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    lines = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("rvr "):
                lines.append(line)
    return lines


@pytest.mark.parametrize("line", _rvr_lines())
def test_readme_commands_parse(line, capsys):
    argv = shlex.split(line.replace('"$POD_NAME"', "pod-0").replace("[--model DIR]", ""))[1:]
    if argv[0] in TRAINING_COMMANDS:  # parsed by their own module: every flag shown must be in its --help
        assert run_training_command(argv[0], ["--help"]) == 0
        usage = capsys.readouterr().out
        assert all(a in usage for a in argv[1:] if a.startswith("--"))
        return
    build_parser().parse_args(argv)  # argparse exits (SystemExit) on an unknown command or flag


@pytest.mark.slow
def test_python_example_runs(tmp_path, monkeypatch):
    """The README's Python block, run against a tiny checkpoint (path and output size substituted)."""
    from PIL import Image

    from engine import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "tiny", "tiny")
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (96, 64), (200, 40, 40)).save("in.png")
    [block] = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    code = block.replace('"models/RvR-7B-MoT"', repr(str(ckpt))).replace(
        "height=512, width=768", "height=64, width=96"
    )
    code = code.replace("seed=42)", "seed=42, steps=4)")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    with Image.open("refined.png") as refined:
        assert refined.size == (96, 64)
    assert [im.size for im in namespace["images"]] == [(96, 64), (96, 64)]


# ---- "Use it from your app": every `python app` block runs against a live tiny server ----
LOCAL_URL = "http://127.0.0.1:8000"


def _app_block(marker: str) -> str:
    blocks = re.findall(r"```python app\n(.*?)```", README, flags=re.S)
    assert len(blocks) == 3, "the client, webhook receiver and OpenAI SDK snippets"
    [block] = [b for b in blocks if marker in b]
    return block


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    from engine import load_engine, make_checkpoint
    from tests.server.server_testutil import Stack, stack_settings

    ckpt = make_checkpoint(tmp_path_factory.mktemp("readme") / "tiny", "tiny")
    stack = Stack("memory", stack_settings("memory", ckpt, None), load_engine(ckpt, device="cpu")).start()
    yield stack
    stack.stop()


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 64), (200, 40, 40)).save("initial.png")
    return tmp_path


def _run(block: str, url: str) -> dict:
    assert LOCAL_URL in block
    namespace: dict = {}
    exec(compile(block.replace(LOCAL_URL, url), "README.md", "exec"), namespace)
    return namespace


@pytest.mark.slow
def test_client_snippet_runs(live_server, in_tmp):
    from PIL import Image

    ns = _run(_app_block("from rvr_client import Client"), live_server.url)
    assert ns["out"].seed == 42 and 1 <= len(ns["out"].scores) <= 3
    with Image.open("refined.png") as refined, Image.open("cup.png") as cup:
        assert refined.size == (64, 64) and cup.size == (128, 128)
    assert ns["event"].type == "completed"


@pytest.mark.slow
def test_openai_snippet_runs(live_server, in_tmp):
    pytest.importorskip("openai")
    from PIL import Image

    ns = _run(_app_block("from openai import OpenAI"), live_server.url)
    with Image.open("refined.png") as refined:
        assert refined.size == (64, 64)
    assert ns["gen"].size == "128x128"


def test_webhook_receiver_snippet_accepts_signed_and_refuses_forged(monkeypatch):
    """Deliveries signed by the reference Standard Webhooks library, over real HTTP to the snippet's app."""
    import base64
    import json
    import os
    from datetime import datetime, timezone

    import httpx

    standardwebhooks = pytest.importorskip("standardwebhooks")
    from tests.server.server_testutil import LiveServer

    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    monkeypatch.setenv("RVR_WEBHOOK_SECRET", secret)
    namespace: dict = {}
    exec(compile(_app_block("verify_webhook"), "README.md", "exec"), namespace)
    server = LiveServer(namespace["app"]).start()
    try:
        data = {"id": "j1", "status": "succeeded", "links": {"result": "/v1/jobs/j1/result"}}
        body = json.dumps({"type": "completed", "timestamp": "2026-01-01T00:00:00Z", "data": data})
        now = datetime.now(tz=timezone.utc)
        sig = standardwebhooks.Webhook(secret).sign("msg_1", now, body)
        headers = {
            "webhook-id": "msg_1",
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": sig,
        }
        with httpx.Client(base_url=server.url) as http:
            assert http.post("/hooks/rvr", content=body, headers=headers).status_code == 204
            assert http.post("/hooks/rvr", content=body, headers=headers).status_code == 204  # a redelivery
            assert namespace["handled"] == {"msg_1"}
            forged = body.replace("j1", "j2")
            assert http.post("/hooks/rvr", content=forged, headers=headers).status_code == 400
            wrong = {
                **headers,
                "webhook-signature": standardwebhooks.Webhook("whsec_" + "A" * 44).sign("msg_1", now, body),
            }
            assert http.post("/hooks/rvr", content=body, headers=wrong).status_code == 400
    finally:
        server.stop()
