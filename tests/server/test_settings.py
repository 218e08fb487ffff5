"""One settings object: env vars, CLI flags (flags win), validators, the generated README table."""

from __future__ import annotations

import hashlib

import pytest
from pydantic import ValidationError

from server.cli import build_parser
from server.settings import Settings, settings_from_args, settings_table_markdown


def test_env_then_flags(monkeypatch):
    monkeypatch.setenv("RVR_MAX_QUEUE_DEPTH", "7")
    monkeypatch.setenv("RVR_PORT", "9001")
    monkeypatch.setenv("RVR_API_KEYS", "k1-long-secret,k2-long-secret")
    args = build_parser().parse_args(
        ["serve", "--port", "9002", "--no-warmup", "--redis-url", "redis://h:1/0"]
    )
    s = settings_from_args(args)
    assert s.max_queue_depth == 7 and s.port == 9002 and s.warmup is False
    assert s.backend == "redis" and s.api_keys == ["k1-long-secret", "k2-long-secret"]
    assert hashlib.sha256(b"k1-long-secret").digest() in s.key_digests()


@pytest.mark.parametrize(
    "bad",
    [
        {"api_keys": ["changethis"]},
        {"api_key_sha256": ["abc"]},
        {"retry_after_min_s": 10, "retry_after_max_s": 5},
        {"redis_url": "http://example"},
        {"max_batch_jobs": 0},
        {"queue_poll_ms": 700000},
    ],
)
def test_bad_combinations_refused(bad):
    with pytest.raises(ValidationError):
        Settings(**bad)


def test_table_lists_every_setting():
    table = settings_table_markdown()
    for name in Settings.model_fields:
        assert f"`RVR_{name.upper()}`" in table and f"`--{name.replace('_', '-')}`" in table
    assert "| `--max-queue-depth` | `RVR_MAX_QUEUE_DEPTH` | `64` |" in table


def test_every_setting_is_a_flag_of_both_commands():
    parser = build_parser()
    for cmd in ("serve", "worker"):
        args = parser.parse_args([cmd, "--max-batch-jobs", "3", "--model", "/m", "--device", "cpu"])
        s = settings_from_args(args)
        assert (s.max_batch_jobs, s.model, s.device) == (3, "/m", "cpu")


def test_cuda_graph_buckets_setting(monkeypatch):
    from server.worker import backend_options

    assert Settings().cuda_graph_buckets == ["3x4096", "3x1024"]
    monkeypatch.setenv("RVR_CUDA_GRAPH_BUCKETS", "3x4096, 12x1024")
    s = Settings()
    assert s.cuda_graph_buckets == ["3x4096", "12x1024"]
    assert backend_options(s) == {"graph_buckets": ("3x4096", "12x1024"), "max_padding": 0.25}
    assert backend_options(Settings(engine_backend="eager")) == {}
    for bad in (["3by4096"], ["0x16"], ["3x"]):
        with pytest.raises(ValueError, match="cuda_graph_buckets"):
            Settings(cuda_graph_buckets=bad)
    with pytest.raises(ValueError):
        Settings(cuda_graph_max_padding=-0.1)


@pytest.mark.parametrize(
    "value",
    [
        '["k1-long-secret", "k2-long-secret"]',
        "k1-long-secret, k2-long-secret",
        " k1-long-secret,k2-long-secret,",
    ],
)
def test_list_settings_take_json_or_comma_separated(monkeypatch, value):
    monkeypatch.setenv("RVR_API_KEYS", value)
    assert Settings().api_keys == ["k1-long-secret", "k2-long-secret"]
    args = build_parser().parse_args(["serve", "--api-keys", value])
    assert settings_from_args(args).api_keys == ["k1-long-secret", "k2-long-secret"]


@pytest.mark.parametrize("value", ['["k1-long-secret"', '{"k": "v"}', "[1, 2]", '"k1-long-secret"'])
def test_malformed_list_setting_fails_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("RVR_API_KEYS", value)
    with pytest.raises(ValidationError, match="RVR_API_KEYS"):
        Settings()


def test_malformed_list_setting_stops_rvr_serve(monkeypatch, capsys):
    from server.cli import main

    monkeypatch.setenv("RVR_CUDA_GRAPH_BUCKETS", '["3x4096",')
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "RVR_CUDA_GRAPH_BUCKETS" in err and len(err.strip().splitlines()) == 1


def test_openapi_declares_bearer_auth_only_with_keys():
    from server.app import create_app

    spec = create_app(Settings(api_keys=["k1-long-secret"])).openapi()  # what /openapi.json serves
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key of api_keys",
    }
    assert spec["paths"]["/v1/refine"]["post"]["security"] == [{"bearerAuth": []}]
    assert "security" not in spec["paths"].get("/livez", {}).get("get", {})
    assert "securitySchemes" not in create_app(Settings()).openapi().get("components", {})
