"""Schemathesis against the gateway (FakeEngine behind it, a real uvicorn on a loopback port):
a fixed seed and a bounded number of examples per operation; every response must be non-5xx and
match the OpenAPI document (status codes, content types, headers, bodies). Found and fixed
with it: the optional `X-Request-Timeout` header was documented as nullable (frontend.api.openapi)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance

from export.tokenizer_builder import build_tokenizer
from frontend.engine.model import ServedModel
from frontend.settings import Settings
from tests.api.fake_engine import FakeEngine
from tests.resilience.conftest import ThreadGateway

pytestmark = [pytest.mark.resilience, pytest.mark.slow]

MAX_EXAMPLES = 25  # per operation


@pytest.fixture(scope="module")
def fuzzed_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadGateway]:
    out: Path = tmp_path_factory.mktemp("tokenizer")
    model = ServedModel(
        name="tiny",
        version="1",
        tokenizer=build_tokenizer(out, 512),
        vocab_size=512,
        max_context=64,
        eos_token_id=511,
        dtype="float32",
        source="fake",
        created=1_700_000_000,
    )
    fake = FakeEngine(model)
    s = Settings(
        environment="test",
        model="tiny",
        max_batch_requests=4,
        max_n=3,
        max_new_tokens_limit=16,
        request_timeout_s=5.0,
        ip_rpm=0,
    )
    gw = ThreadGateway(s, engine_factory=lambda _s, _m: fake)
    try:
        gw.wait_ready(30)
        yield gw
    finally:
        gw.stop()


def test_no_5xx_and_no_schema_violation(fuzzed_gateway: ThreadGateway) -> None:
    # Schemathesis' Python API driven by Hypothesis directly: its pytest plugin does not load on
    # pytest 9 (it reads a private attribute pytest removed).
    schema = schemathesis.openapi.from_url(f"{fuzzed_gateway.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=MAX_EXAMPLES,
            derandomize=True,  # a fixed seed: the same cases every run
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def check(case: schemathesis.Case) -> None:
            # Every response check (no 5xx, status codes, content types, headers and bodies as
            # documented). Not "schema-valid data is accepted": JSON Schema cannot say "no lone
            # surrogates", which the gateway refuses with a 400 on purpose (docs/security.md).
            # A 5xx only where the API promises one: a deadline the request set itself (`timeout`,
            # X-Request-Timeout; 1e-129 s, say) that passed is a 504, as documented.
            response = case.call_and_validate(
                timeout=10, excluded_checks=[positive_data_acceptance, not_a_server_error]
            )
            if response.status_code >= 500:
                asked = (case.headers or {}).get("x-request-timeout") or (case.headers or {}).get("X-Request-Timeout")
                body = case.body if isinstance(case.body, dict) else {}
                own_deadline = asked is not None or body.get("timeout") is not None
                assert response.status_code == 504 and own_deadline, (response.status_code, response.text[:300])

        check()
