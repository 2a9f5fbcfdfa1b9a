"""Tool calling over the real stack with the official `openai` client: a call forced by naming
the function gives arguments valid against its schema (real model, unary; reference engine,
streamed with the arguments arriving in pieces), and the tool's result sent back produces an
answer; on gRPC, the unary answer and a stream's Final carry the same calls. Answers validate
against OpenAI's OpenAPI document."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from deploy.local.stack import StackInfo
from infermesh.v1 import inference_pb2, inference_pb2_grpc
from tests.e2e.test_walking_skeleton import auth
from tests.openai_schema import validate

pytestmark = pytest.mark.integration

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city"],
           "properties": {"city": {"type": "string", "maxLength": 16}}}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": WEATHER}}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
QUESTION = {"role": "user", "content": "What is the weather in Paris?"}


def _api(stack: StackInfo) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.openai_base_url, api_key=stack.api_key,
                              max_retries=0, timeout=180)


async def test_a_named_call_validates_and_its_result_produces_an_answer(stack: StackInfo):
    api = _api(stack)
    raw = await api.chat.completions.with_raw_response.create(
        model=stack.model, messages=[QUESTION], tools=TOOLS, tool_choice=NAMED,
        parallel_tool_calls=False, max_tokens=32, temperature=0)
    payload = json.loads(raw.text)
    validate("CreateChatCompletionResponse", payload)
    choice = payload["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    arguments = json.loads(call["function"]["arguments"])
    jsonschema.validate(arguments, WEATHER)

    answer = await api.chat.completions.create(
        model=stack.model, tools=TOOLS, tool_choice="none", max_tokens=6, temperature=0,
        messages=[QUESTION, {"role": "assistant", "content": None, "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": call["id"],
                   "content": json.dumps({"city": arguments["city"], "sky": "sunny"})}])
    assert answer.choices[0].message.content.strip()
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert not answer.choices[0].message.tool_calls


async def test_a_streamed_call_sends_its_arguments_in_pieces(stack: StackInfo):
    stream = await _api(stack).chat.completions.create(
        model=stack.reference_model, messages=[QUESTION], tools=TOOLS, tool_choice="required",
        max_tokens=64, stream=True)
    name, arguments, pieces, finish_reason = None, "", 0, None
    async for chunk in stream:
        validate("CreateChatCompletionStreamResponse", chunk.model_dump(exclude_unset=True))
        delta = chunk.choices[0].delta
        assert not delta.content
        for piece in delta.tool_calls or ():
            name = piece.function.name or name
            arguments += piece.function.arguments or ""
            pieces += 1
        finish_reason = chunk.choices[0].finish_reason or finish_reason
    assert (name, finish_reason) == ("get_weather", "tool_calls")
    assert pieces > 2  # the name, then the arguments as they came
    jsonschema.validate(json.loads(arguments), WEATHER)


async def test_grpc_gives_the_calls_unary_and_on_a_streams_final(stack: StackInfo):
    request = inference_pb2.GenerateRequest(
        request_id="grpc-tool-call", model=stack.reference_model,
        messages=inference_pb2.Messages(messages=[
            inference_pb2.ChatMessage(role="user", content=QUESTION["content"])]),
        params=inference_pb2.SamplingParams(max_tokens=64),
        tools=[inference_pb2.Tool(name="get_weather", parameters=json.dumps(WEATHER))],
        tool_choice=inference_pb2.ToolChoice(mode=inference_pb2.TOOL_CHOICE_MODE_FUNCTION,
                                             function_name="get_weather"))
    async with stack.channel() as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        unary = await stub.Generate(request, metadata=auth(stack.api_key), timeout=60)
        finals = [frame.final async for frame in stub.GenerateStream(
            iter([inference_pb2.ClientFrame(start=request)]), metadata=auth(stack.api_key),
            timeout=60) if frame.HasField("final")]
    assert unary.finish_reason == finals[0].finish_reason == inference_pb2.TOOL_CALLS
    for calls in (unary.tool_calls, finals[0].tool_calls):
        [call] = calls
        assert (call.id, call.name) == ("call_grpc-tool-call_0", "get_weather")
        jsonschema.validate(json.loads(call.arguments), WEATHER)
