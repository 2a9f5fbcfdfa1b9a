"""Structured output's pure parts: which guides compile, the gateway's refusal naming
`response_format` before anything is spent, and the reference engine's made-up answers, which
validate against their schemas."""

from __future__ import annotations

import json

import jsonschema
import pytest

from backends.triton.reference_engine import GUIDED_PIECE_CHARS, complete, guided_text
from backends.triton.reference_engine import GenerationRequest as ReferenceRequest
from services.common import errors
from services.common.structured_output import MAX_SCHEMA_MINIMUM_COUNT, grammar_of
from services.gateway.requests import GenerationRequest, ResponseFormat
from tests.unit.test_gateway_validation import check

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "minLength": 2},
                         "age": {"type": "integer", "exclusiveMinimum": 17, "maximum": 130},
                         "tags": {"type": "array", "minItems": 1,
                                  "items": {"$ref": "#/$defs/tag"}},
                         "nickname": {"type": "string"}},
          "$defs": {"tag": {"enum": ["a", "b"]}}}


def formatted(response_format: ResponseFormat) -> GenerationRequest:
    return GenerationRequest(request_id="r1", model="demo", prompt="hello world",
                             response_format=response_format)


def test_a_schema_reaches_the_engine_as_tensorrt_llms_guide():
    engine = check(formatted(ResponseFormat("json_schema", json.dumps(PERSON), "person"))).engine
    assert engine.guided_decoding_guide_type == "json_schema"
    assert json.loads(engine.guided_decoding_guide) == PERSON
    engine = check(formatted(ResponseFormat("json_object"))).engine
    assert (engine.guided_decoding_guide_type, engine.guided_decoding_guide) == ("json", "")
    assert check(formatted(ResponseFormat())).engine.guided_decoding_guide_type == ""


@pytest.mark.parametrize("schema, words", [
    ('{"type": "strin"}', "Invalid type"),
    ('{"properties": {"a": {"$ref": "#/nowhere"}}}', "nowhere"),
    ("[1, 2]", "JSON object"),
    ("{not json", "not JSON"),
])
def test_a_schema_that_cannot_compile_is_refused_naming_response_format(schema, words):
    with pytest.raises(errors.InvalidArgument) as refused:
        check(formatted(ResponseFormat("json_schema", schema)))
    assert refused.value.field == "response_format"
    assert words in refused.value.message
    with pytest.raises(ValueError, match=r"^guided_decoding_guide"):
        grammar_of("json_schema", schema)  # the engines refuse it in the same words


def test_the_schemas_size_is_bounded_when_the_request_is_built():
    with pytest.raises(errors.InvalidArgument) as refused:
        formatted(ResponseFormat("json_schema", "{" + " " * 40_000 + "}"))
    assert refused.value.field == "response_format.json_schema"
    assert "32768" in refused.value.message


@pytest.mark.parametrize("schema", [
    PERSON,
    {"type": "object"},
    {"type": "array", "items": {"type": "number", "minimum": 2.5}, "minItems": 2},
    {"anyOf": [{"type": "boolean"}, {"type": "string"}]},
    {"type": "object", "required": ["x"], "properties": {"x": {"const": {"k": [1]}}}},
    {"type": "object", "required": ["n"], "properties": {"n": {"type": ["null", "string"]}}},
])
def test_the_reference_engines_answer_validates_against_the_schema(schema):
    text = guided_text("json_schema", json.dumps(schema), 200)
    jsonschema.validate(json.loads(text), schema)
    whole = complete(ReferenceRequest(1, "a prompt", 200, guided_text=text))
    assert (whole.text, whole.finish_reason.value) == (text, "stop")
    cut = complete(ReferenceRequest(1, "a prompt", 1, guided_text=text + " " * 8))
    assert cut.finish_reason.value == "length"
    assert json.loads(guided_text("json", "", 1)) == {}


@pytest.mark.parametrize("schema", [
    {"type": "string", "minLength": MAX_SCHEMA_MINIMUM_COUNT},
    {"type": "array", "minItems": MAX_SCHEMA_MINIMUM_COUNT,
     "items": {"type": "array", "minItems": MAX_SCHEMA_MINIMUM_COUNT}},
])
def test_a_huge_smallest_instance_is_built_only_as_far_as_max_tokens_reaches(schema):
    """The reference engine's answer stops at max_tokens' characters and finishes for length:
    nothing like 10**10 elements is built inside Triton's execute()."""
    text = guided_text("json_schema", json.dumps(schema), 5)
    assert len(text) == 5 * GUIDED_PIECE_CHARS
    cut = complete(ReferenceRequest(1, "a prompt", 5, guided_text=text))
    assert (cut.text, cut.finish_reason.value) == (text, "length")


@pytest.mark.parametrize("keyword", ["minLength", "minItems", "minProperties"])
def test_a_minimum_count_past_the_limit_is_refused_naming_response_format_and_the_limit(keyword):
    schema = {"type": "object", "required": ["x"],
              "properties": {"x": {keyword: 10**9}}}
    with pytest.raises(errors.InvalidArgument) as refused:
        check(formatted(ResponseFormat("json_schema", json.dumps(schema))))
    assert refused.value.field == "response_format"
    assert refused.value.message.endswith(f"{keyword} must be at most 100000, got 1000000000")
    with pytest.raises(ValueError, match=rf"^guided_decoding_guide {keyword} must be at most"):
        guided_text("json_schema", json.dumps(schema), 1)  # the reference engine refuses it too
    assert check(formatted(ResponseFormat("json_schema", json.dumps(
        {"type": "object", "properties": {"minLength": {"type": "string", "maxLength": 10**9}}})))
    ).engine.guided_decoding_guide_type == "json_schema"  # a property's name, a large maximum
