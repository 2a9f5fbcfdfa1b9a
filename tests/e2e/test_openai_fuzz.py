"""Property-based fuzz of the OpenAI HTTP API from its own OpenAPI document (schemathesis),
over the real stack: bodies the schema allows and bodies it does not, with a real model's name
in some of them so that generations run too. Whatever was sent, the answer's status is one the
document lists for that operation, and never a 5xx. Seeded (hypothesis' derandomized mode) and
bounded: 300 examples in all, well under a minute."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error, status_code_conformance

from deploy.local.stack import StackInfo

pytestmark = pytest.mark.integration

EXAMPLES = {schemathesis.GenerationMode.POSITIVE: 45, schemathesis.GenerationMode.NEGATIVE: 30}
MAX_TOKENS = 4  # a generation the fuzz starts stays short


def _with_the_stacks_model(case, model: str) -> None:
    """Points a generation body at a model that exists, with few tokens to generate."""
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = model
        for name in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(name), int) and case.body[name] > MAX_TOKENS:
                case.body[name] = MAX_TOKENS
        case.headers = {**(case.headers or {}), "X-Request-Timeout": "20"}


def test_every_operation_answers_only_documented_statuses(stack: StackInfo):
    # schemathesis' strategies driven by hypothesis directly: its pytest plugin predates pytest 9.
    schema = schemathesis.openapi.from_url(
        stack.openai_base_url.removesuffix("/v1") + "/openapi.json")
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 4
    statuses: set[int] = set()
    for operation in operations:
        for mode, examples in EXAMPLES.items():

            @given(case=operation.as_strategy(generation_mode=mode), real_model=st.booleans())
            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def answers_as_documented(case, real_model: bool) -> None:
                if real_model:
                    _with_the_stacks_model(case, stack.reference_model)
                response = case.call_and_validate(
                    headers=headers, timeout=30,
                    checks=[not_a_server_error, status_code_conformance])
                statuses.add(response.status_code)

            answers_as_documented()
    # It reached past the schema checks: generations ran, and refusals came back as 4xx.
    assert {200, 400, 404} <= statuses, statuses
