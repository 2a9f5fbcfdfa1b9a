"""Property-based fuzz of the OpenAI HTTP API from its own OpenAPI document (schemathesis),
over the real stack: whatever the body, the gateway answers with a 2xx or 4xx, never a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from deploy.local.stack import StackInfo

pytestmark = pytest.mark.integration


def test_no_operation_answers_a_server_error(stack: StackInfo):
    # schemathesis' strategies driven by hypothesis directly: its pytest plugin predates pytest 9.
    schema = schemathesis.openapi.from_url(
        stack.openai_base_url.removesuffix("/v1") + "/openapi.json")
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 4
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=20, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def answers_without_5xx(case) -> None:
            response = case.call(headers=headers, timeout=60)
            assert response.status_code < 500, (case.path, case.body, response.text)

        answers_without_5xx()
