"""Checks our HTTP answers against OpenAI's published OpenAPI document: the response schemas in
`tests/data/openai_openapi_responses.json` (a pinned, unchanged subset of openai/openai-openapi's
`openapi.json`), validated as JSON Schema 2020-12."""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

import jsonschema

DOCUMENT = pathlib.Path(__file__).parent / "data" / "openai_openapi_responses.json"


def _without_nullable(node: Any) -> Any:
    """OpenAPI 3.0's `nullable: true` (still in some of the document's schemas) as JSON
    Schema's null type, which the 3.1 validator understands."""
    if isinstance(node, list):
        return [_without_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _without_nullable(value) for key, value in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


@functools.cache
def _components() -> dict[str, Any]:
    document = json.loads(DOCUMENT.read_text())
    return _without_nullable({"components": document["components"]})


def validate(schema_name: str, payload: Any) -> None:
    """Raises `jsonschema.ValidationError` when `payload` is not a `schema_name` of the
    document (e.g. `CreateChatCompletionResponse`, `CreateChatCompletionStreamResponse`)."""
    schema = {**_components(), "$ref": f"#/components/schemas/{schema_name}"}
    jsonschema.Draft202012Validator(schema).validate(payload)
