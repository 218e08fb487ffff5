"""The server suite's real parts (tiny checkpoint and engine, redis-server, uvicorn stacks)."""

from tests.server.conftest import engine, make_stack, redis_server, tiny_model  # noqa: F401
