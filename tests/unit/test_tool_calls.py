"""Tool calling's pure parts: the request's tools and choice, the forced call's schema (which the
engines compile), the model's answer parsed into calls, and the HTTP shapes, unary and streamed,
against OpenAI's document."""

from __future__ import annotations

import json

import jsonschema
import pytest

from services.common import errors
from services.common.structured_output import grammar_of
from services.gateway.openai_http import _completion
from services.gateway.openai_protocol import ChatCompletionBody, parse_body, to_generation
from services.gateway.openai_tools import StreamedToolCalls
from services.gateway.pipeline import Finished
from services.gateway.tool_calls import (
    Tool,
    ToolCallStream,
    answer_calls,
    forced_schema,
    parse_calls,
)
from services.gateway.validation import Limits, check_parameters, requested_format, with_tools
from tests.openai_schema import validate
from tests.unit.test_gateway_validation import PRINCIPAL, VERSION

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city"],
           "properties": {"city": {"type": "string", "maxLength": 20}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER,
                                           "description": "The weather in a city"}},
         {"type": "function", "function": {"name": "get_time"}}]


def body(**fields) -> ChatCompletionBody:
    return parse_body(ChatCompletionBody, {
        "model": "demo", "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": TOOLS, **fields})


def test_a_named_choice_is_a_structured_output_of_that_functions_call():
    request = to_generation(body(tool_choice={"type": "function",
                                              "function": {"name": "get_weather"}},
                                 parallel_tool_calls=False), "r1", "")
    schema_text = requested_format(request).json_schema
    grammar_of("json_schema", schema_text)  # the engines compile it
    schema = json.loads(schema_text)
    jsonschema.validate([{"name": "get_weather", "arguments": {"city": "Paris"}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_time", "arguments": {}}], schema)
    with pytest.raises(jsonschema.ValidationError):  # one call unless parallel
        jsonschema.validate([{"name": "get_weather", "arguments": {"city": "a"}}] * 2, schema)
    checked = check_parameters(request, PRINCIPAL, VERSION, Limits())
    assert checked.guide == ("json_schema", schema_text)
    required = to_generation(body(tool_choice="required"), "r1", "")
    assert "anyOf" in json.loads(requested_format(required).json_schema)["items"]
    assert requested_format(to_generation(body(), "r1", "")).type == "text"  # auto: free


def test_tools_reach_the_model_in_a_system_block_and_earlier_calls_as_it_writes_them():
    request = to_generation(body(messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]), "r1", "")
    turns = with_tools(request.messages, request)
    assert turns[0].role == "system" and '"name":"get_weather"' in turns[0].content
    assert turns[2].content == '[{"name":"get_weather","arguments":{"city":"Paris"}}]'
    assert (turns[3].role, turns[3].content) == ("tool", "18 C, sunny")
    check_parameters(request, PRINCIPAL, VERSION, Limits())  # the tool role is accepted
    none = to_generation(body(tool_choice="none"), "r1", "")
    assert with_tools(none.messages, none) == none.messages


@pytest.mark.parametrize("fields, field", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
])
def test_a_bad_choice_is_refused_naming_the_parameter(fields, field):
    with pytest.raises(errors.InvalidArgument) as refused:
        check_parameters(to_generation(body(**fields), "r1", ""), PRINCIPAL, VERSION, Limits())
    assert refused.value.field == field


def test_a_bad_tool_name_is_refused_when_the_body_is_parsed():
    with pytest.raises(errors.InvalidArgument) as refused:
        body(tools=[{"type": "function", "function": {"name": "no spaces"}}])
    assert refused.value.field == "tools[0].function.name"


def test_answers_become_calls_only_when_they_call_known_tools():
    tools = (Tool("get_weather", "", json.dumps(WEATHER)),)
    assert parse_calls('[{"name":"get_weather","arguments":{"city":"Oslo"}}]', tools)[0] \
        .arguments == '{"city":"Oslo"}'
    assert parse_calls('{"name":"get_weather","arguments":{}}', tools) is not None
    for text in ('[{"name":"rm","arguments":{}}]', "It is sunny.", "[]", '{"a": 1}',
                 # a model's text, not the grammar's: a name that is no string, no JSON numbers
                 '[{"name":["get_weather"],"arguments":{}}]', '[{"name":{},"arguments":{}}]',
                 '[{"name":"get_weather","arguments":{"t":NaN}}]',
                 '[{"name":"get_weather","arguments":{"t":-Infinity}}]'):
        assert parse_calls(text, tools) is None
    schema = json.loads(forced_schema(tools, "", parallel=True))
    assert "maxItems" not in schema


def test_a_streamed_call_gives_its_name_then_its_arguments_as_they_come():
    text = ('[{"name":"get_weather","arguments":{"city":"Pa}r\\"is"}},'
            '{"name":"get_time","arguments":{}}]')
    stream = ToolCallStream()
    pieces = [d for i in range(0, len(text), 5) for d in stream.feed(text[i:i + 5])]
    assert [d.name for d in pieces if d.name] == ["get_weather", "get_time"]
    arguments = ["".join(d.arguments for d in pieces if d.index == i) for i in (0, 1)]
    assert [json.loads(a) for a in arguments] == [{"city": 'Pa}r"is'}, {}]


def test_the_http_shapes_validate_against_openais_document():
    request = to_generation(body(tool_choice="required"), "r1", "")
    text = '[{"name":"get_weather","arguments":{"city":"Paris"}}]'
    finished = Finished("r1", "stop", "sha256:v", prompt_tokens=3, completion_tokens=9)
    assert answer_calls(request.tools, request.tool_choice, text) is not None
    answer = _completion("chat", "r1", body(), finished, {0: (text, None)}, request)
    validate("CreateChatCompletionResponse", answer)
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"

    base = {"id": "chatcmpl-r1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    for streamed in (StreamedToolCalls(request, "r1"),
                     StreamedToolCalls(to_generation(body(), "r1", ""), "r1")):  # forced, auto
        calls = []
        for i in range(0, len(text), 7):
            content, pieces = streamed.feed(text[i:i + 7])
            assert content is None
            calls += pieces
        content, pieces = streamed.finish()
        calls += pieces
        assert content is None and streamed.called
        for piece in calls:
            validate("CreateChatCompletionStreamResponse", {**base, "choices": [{
                "index": 0, "delta": {"tool_calls": [piece]}, "finish_reason": None}]})
        assert "".join(p["function"]["arguments"] for p in calls) == '{"city":"Paris"}'
    auto = StreamedToolCalls(to_generation(body(), "r1", ""), "r1")
    assert auto.feed("  It is") == ("  It is", [])  # plain content streams at once
    assert auto.feed(" sunny.") == (" sunny.", []) and not auto.called


def test_the_grpc_request_carries_the_same_tools():
    from infermesh.v1 import inference_pb2
    from services.gateway.server import decode_request

    message = inference_pb2.GenerateRequest(
        request_id="r1", model="demo",
        messages=inference_pb2.Messages(messages=[
            inference_pb2.ChatMessage(role="user", content="Weather in Paris?"),
            inference_pb2.ChatMessage(role="assistant", tool_calls=[inference_pb2.ToolCall(
                id="call_1", name="get_weather", arguments='{"city":"Paris"}')]),
            inference_pb2.ChatMessage(role="tool", tool_call_id="call_1", content="sunny")]),
        tools=[inference_pb2.Tool(name="get_weather", parameters=json.dumps(WEATHER))],
        tool_choice=inference_pb2.ToolChoice(mode=inference_pb2.TOOL_CHOICE_MODE_FUNCTION,
                                             function_name="get_weather"),
        parallel_tool_calls=False)
    request = decode_request(message)
    over_http = to_generation(body(
        messages=[{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "tool_calls": [{
                      "id": "call_1", "type": "function",
                      "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
        tools=TOOLS[:1], tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False), "r1", "")
    assert request.messages == over_http.messages
    assert requested_format(request) == requested_format(over_http)
    bad = inference_pb2.GenerateRequest(
        request_id="r2", model="demo", prompt="hi",
        tools=[inference_pb2.Tool(name="f", parameters="not json")])
    with pytest.raises(errors.InvalidArgument) as refused:
        check_parameters(decode_request(bad), PRINCIPAL, VERSION, Limits())
    assert refused.value.field == "tools"  # a prompt, not a chat
