"""`rvr serve` as a real process: the quickstart works, and SIGTERM drains (not ready, 503, clean exit)."""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from tests.server.server_testutil import free_port, rvr_env, rvr_process, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("server-cli")]


def test_rvr_serve_quickstart_and_sigterm_drain(tiny_model, tmp_path):
    port = free_port()
    args = [
        "serve",
        "--model",
        str(tiny_model),
        "--device",
        "cpu",
        "--port",
        str(port),
        "--drain-delay-s",
        "3",
    ]
    with rvr_process(args, rvr_env(), tmp_path / "serve.log") as proc:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=30) as client:

            def ready() -> bool:
                try:
                    return client.get("/readyz").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(ready, 120, 0.1, "rvr serve ready (load + warm-up)")
            r = client.post(
                "/v1/generate", json={"prompt": "a red apple", "steps": 3}, headers={"Prefer": "wait"}
            )
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            slow = client.post("/v1/generate", json={"prompt": "slow", "steps": 30}).json()["id"]
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert client.get("/readyz").status_code == 503  # endpoints drop the pod first
            assert client.get("/livez").status_code == 200
            refused = client.post("/v1/generate", json={"prompt": "x", "steps": 2})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "unavailable"
            assert client.get(f"/v1/jobs/{slow}").status_code == 200  # in-flight work is still served
            # SSE streams are told to come back (elsewhere) and closed.
            assert client.get(f"/v1/jobs/{slow}/events").text.startswith("retry: ")
        assert proc.wait(60) == 0
    log = (tmp_path / "serve.log").read_text()
    assert "draining" in log


def test_rvr_settings_command_prints_the_table():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "settings"],
        env=rvr_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.startswith("| Flag | Environment | Default | Meaning |")


@pytest.mark.parametrize("argv", [["refine", "--steps", "abc"], ["nope"]])
def test_usage_error_is_one_line(argv, capsys):
    from server.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rvr") and ": error: " in err


@pytest.mark.parametrize(
    "argv",
    [["serve", "--port", "x"], ["worker", "--max-queue-depth", "-3"], ["serve", "--api-keys", "changeme"]],
)
def test_invalid_settings_are_one_line(argv, capsys):
    from server.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"rvr {argv[0]}: error: invalid settings: ")
