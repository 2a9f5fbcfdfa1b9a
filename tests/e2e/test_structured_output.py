"""Structured output over the real stack with the official `openai` client: the real model's
text parses and validates against a strict JSON schema, unary and streamed; the reference engine
answers the same request with a valid instance; a schema that cannot compile is a 400 naming
`response_format` (INVALID_ARGUMENT with a field violation on gRPC). Answers validate against
OpenAI's OpenAPI document."""

from __future__ import annotations

import json

import grpc
import jsonschema
import openai
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from deploy.local.stack import StackInfo
from infermesh.v1 import inference_pb2, inference_pb2_grpc
from tests.e2e.test_walking_skeleton import auth
from tests.openai_schema import validate

pytestmark = pytest.mark.integration

# Small on purpose: the real model decodes ~20 tokens/s on two busy cores.
CITY = {"type": "object", "additionalProperties": False, "required": ["city", "capital"],
        "properties": {"city": {"type": "string", "maxLength": 12},
                       "capital": {"type": "boolean"}}}
FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
MESSAGES = [{"role": "user", "content": "Name a big city, and whether it is a capital, as JSON."}]
MAX_TOKENS = 40


def _api(stack: StackInfo) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.openai_base_url, api_key=stack.api_key,
                              max_retries=0, timeout=180)


def _valid(text: str, finish_reason: str) -> None:
    assert finish_reason == "stop", (finish_reason, text)  # not cut by max_tokens
    jsonschema.validate(json.loads(text), CITY)


async def test_the_real_models_answer_follows_a_strict_schema_unary_and_streamed(
        stack: StackInfo):
    api = _api(stack)
    unary = await api.chat.completions.with_raw_response.create(
        model=stack.model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
        response_format=FORMAT)
    payload = json.loads(unary.text)
    validate("CreateChatCompletionResponse", payload)
    choice = payload["choices"][0]
    _valid(choice["message"]["content"], choice["finish_reason"])

    stream = await api.chat.completions.create(
        model=stack.model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0.8, seed=7,
        response_format=FORMAT, stream=True)
    pieces, finish_reason = [], None
    async for chunk in stream:
        validate("CreateChatCompletionStreamResponse", chunk.model_dump(exclude_unset=True))
        pieces.append(chunk.choices[0].delta.content or "")
        finish_reason = chunk.choices[0].finish_reason or finish_reason
    _valid("".join(pieces), finish_reason)


async def test_the_reference_engine_answers_with_a_valid_instance(stack: StackInfo):
    reply = await _api(stack).chat.completions.create(
        model=stack.reference_model, messages=MESSAGES, max_tokens=MAX_TOKENS,
        response_format=FORMAT)
    _valid(reply.choices[0].message.content, reply.choices[0].finish_reason)
    reply = await _api(stack).chat.completions.create(
        model=stack.reference_model, messages=MESSAGES, max_tokens=MAX_TOKENS,
        response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


async def test_a_schema_that_cannot_compile_is_refused_naming_response_format(stack: StackInfo):
    broken = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}
    with pytest.raises(openai.BadRequestError) as refused:
        await _api(stack).chat.completions.create(
            model=stack.model, messages=MESSAGES, max_tokens=4, response_format=broken)
    assert refused.value.body["param"] == "response_format"
    validate("ErrorResponse", refused.value.response.json())

    request = inference_pb2.GenerateRequest(
        model=stack.model, prompt="Hi", params=inference_pb2.SamplingParams(max_tokens=4),
        response_format=inference_pb2.ResponseFormat(
            type=inference_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema='{"type":"strin"}'))
    async with stack.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await inference_pb2_grpc.InferenceStub(channel).Generate(
                request, metadata=auth(stack.api_key), timeout=30)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(failed.value)
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields += [violation.field for violation in bad_request.field_violations]
    assert fields == ["response_format"]


async def test_grpc_takes_the_same_response_format(stack: StackInfo):
    request = inference_pb2.GenerateRequest(
        model=stack.reference_model, prompt="A city, as JSON.",
        params=inference_pb2.SamplingParams(max_tokens=MAX_TOKENS),
        response_format=inference_pb2.ResponseFormat(
            type=inference_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=json.dumps(CITY),
            name="city"))
    async with stack.channel() as channel:
        reply = await inference_pb2_grpc.InferenceStub(channel).Generate(
            request, metadata=auth(stack.api_key), timeout=60)
    assert reply.finish_reason == inference_pb2.STOP
    jsonschema.validate(json.loads(reply.text), CITY)
