"""Fixtures with real parts: a tiny checkpoint and engine, redis-server, uvicorn stacks."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.server_testutil import RedisServer, Stack, stack_settings


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from engine import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def engine(tiny_model):
    from engine import load_engine

    return load_engine(tiny_model, device="cpu")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path) -> Iterator[RedisServer]:
    """A redis-server of this test alone (for restarts)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def make_stack(request, tiny_model, engine):
    """Factory: make_stack(backend, **settings) -> a started Stack, stopped after the test."""
    stacks: list[Stack] = []

    def make(backend: str, **overrides) -> Stack:
        url = request.getfixturevalue("redis_server").url if backend == "redis" else None
        stack = Stack(backend, stack_settings(backend, tiny_model, url, **overrides), engine, url).start()
        stacks.append(stack)
        return stack

    yield make
    for s in reversed(stacks):
        s.stop()
