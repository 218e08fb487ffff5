"""Schemathesis over the served OpenAPI schema, against the real server with the tiny model: no 5xx,
and answers match the documented status codes, content types and schemas."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import checks  # noqa: E402

from tests.server.server_testutil import Stack, stack_settings  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("server-fuzz")]

# Small jobs only: fuzzed submits run on the real worker.
FUZZ_LIMITS = {
    "max_steps": 6,
    "max_output_side": 128,
    "max_rounds": 2,
    "max_wait_s": 10,
    "max_queue_depth": 10000,
}


@pytest.fixture(scope="module")
def fuzz_stack(tiny_model, engine):
    stack = Stack("memory", stack_settings("memory", tiny_model, None, **FUZZ_LIMITS), engine).start()
    yield stack
    stack.stop()


CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]


def test_no_server_errors(fuzz_stack):
    # Driven by hand: schemathesis' pytest plugin does not support this pytest version.
    schema = schemathesis.openapi.from_url(fuzz_stack.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def run(case):
            case.call_and_validate(timeout=30, checks=CHECKS)

        run()
