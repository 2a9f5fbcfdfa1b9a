"""The OpenAI bodies → our `GenerationRequest`, and refusals that name the parameter."""

from __future__ import annotations

import pytest

from services.common import errors
from services.gateway.openai_http import (
    _completion,
    error_payload,
    error_response,
    openapi_document,
)
from services.gateway.openai_protocol import (
    ChatCompletionBody,
    CompletionBody,
    openai_param,
    parse_body,
    request_timeout,
    to_generation,
)
from services.gateway.pipeline import ChoiceEnd, Finished
from tests.openai_schema import validate


def chat(**fields) -> ChatCompletionBody:
    return parse_body(ChatCompletionBody, {
        "model": "m@canary", "messages": [{"role": "user", "content": "hi"}], **fields})


def test_chat_parameters_map_exactly():
    body = chat(max_completion_tokens=7, temperature=0.5, top_p=0.9, stop="END", seed=3,
                presence_penalty=0.1, frequency_penalty=0.2, user="alice", n=1, logprobs=False)
    request = to_generation(body, "r1", "idem")
    assert (request.request_id, request.model, request.user, request.idempotency_key) == (
        "r1", "m@canary", "alice", "idem")
    sampling = request.sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.stop,
            sampling.seed, sampling.presence_penalty, sampling.frequency_penalty) == (
        7, 0.5, 0.9, ("END",), 3, 0.1, 0.2)
    assert request.prompt is None and request.messages[0].content == "hi"


def test_text_parts_are_joined_and_developer_is_system():
    body = chat(messages=[{"role": "developer", "content": [
        {"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]}])
    turn = to_generation(body, "r", "").messages[0]
    assert (turn.role, turn.content) == ("system", "be brief")


def test_completion_stop_list_and_extensions():
    body = parse_body(CompletionBody, {"model": "m", "prompt": "p", "stop": ["a", "b"],
                                       "max_tokens": 4, "min_tokens": 2, "top_k": 5})
    request = to_generation(body, "r", "")
    assert request.prompt == "p" and request.sampling.stop == ("a", "b")
    assert (request.sampling.min_tokens, request.sampling.top_k) == (2, 5)


def test_logit_bias_keys_are_token_ids_bounded_before_parsing():
    request = to_generation(chat(logit_bias={"50256": -100, "7": 2.5}), "r", "")
    assert request.sampling.logit_bias == ((7, 2.5), (50256, -100.0))
    for bias, message in (({"x": 1}, "token ids"), ({"-3": 1}, "token ids"),
                          ({str(i): 1 for i in range(301)}, "at most 300"),
                          ({"3": 101}, "[-100, 100]")):
        with pytest.raises(errors.InvalidArgument) as raised:
            to_generation(chat(logit_bias=bias), "r", "")
        assert openai_param(raised.value.field, None) == "logit_bias"
        assert message in raised.value.message


@pytest.mark.parametrize("fields, param", [
    ({"max_tokens": 5, "max_completion_tokens": 5}, "max_completion_tokens"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_unsupported_values_name_the_parameter(fields, param):
    with pytest.raises(errors.InvalidArgument) as raised:
        to_generation(chat(**fields), "r", "")
    assert raised.value.field == param


@pytest.mark.parametrize("fields, param", [
    ({"functions": []}, "functions"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}},
     "response_format.json_schema.name"),
    ({"temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages[0].name"),
])
def test_unknown_or_malformed_fields_name_the_parameter(fields, param):
    with pytest.raises(errors.InvalidArgument) as raised:
        chat(**fields)
    assert raised.value.field == param


def test_validation_field_names_become_openai_params():
    uses_completion_tokens = chat(max_completion_tokens=9)
    assert openai_param("params.max_tokens", uses_completion_tokens) == "max_completion_tokens"
    assert openai_param("params.max_tokens", chat(max_tokens=9)) == "max_tokens"
    assert openai_param("request_id", None) == "X-Request-Id"
    assert openai_param("timeout", None) == "X-Request-Timeout"
    assert openai_param("messages[0].role", None) == "messages[0].role"


def test_errors_keep_openai_shape_status_and_retry_after():
    limited = errors.ResourceExhausted("over quota", retry_after_s=2.2, reason="rpm")
    response = error_response(limited, "r1")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3" and response.headers["x-request-id"] == "r1"
    assert error_payload(limited)["error"] == {
        "message": "over quota", "type": "rate_limit_error", "param": None, "code": "rpm"}
    invalid = errors.InvalidArgument("params.top_p", "must be in (0, 1]")
    assert error_payload(invalid)["error"]["param"] == "top_p"
    for error, status in ((errors.Unauthenticated("x"), 401), (errors.PermissionDenied("x"), 403),
                          (errors.NotFound("x"), 404), (errors.Unavailable("x"), 503),
                          (errors.DeadlineExceeded("x"), 504)):
        assert error_response(error, "").status_code == status


def test_openapi_document_holds_the_bodies():
    document = openapi_document()
    schemas = document["components"]["schemas"]
    assert {"ChatCompletionBody", "CompletionBody", "ChatMessage"} <= set(schemas)
    assert "messages" in schemas["ChatCompletionBody"]["properties"]


def test_the_timeout_header_becomes_the_generations_deadline():
    assert to_generation(chat(), "r", "", request_timeout("2.5")).timeout_s == 2.5
    assert to_generation(chat(), "r", "", request_timeout(None)).timeout_s is None
    for bad in ("0", "-1", "soon", "nan", "inf", ""):
        with pytest.raises(errors.InvalidArgument) as refused:
            request_timeout(bad)
        assert openai_param(refused.value.field, None) == "X-Request-Timeout"


def test_unary_answers_validate_against_openais_document():
    finished = Finished("r1", "stop", "sha256:v", prompt_tokens=3, completion_tokens=2)
    chat_answer = _completion("chat", "r1", chat(), finished, {0: ("hello", None)})
    assert chat_answer["choices"][0]["message"]["refusal"] is None  # required, null
    validate("CreateChatCompletionResponse", chat_answer)
    body = parse_body(CompletionBody, {"model": "m", "prompt": "p"})
    validate("CreateCompletionResponse",
             _completion("completions", "r1", body, finished, {0: ("x", None)}))
    several = Finished("r1", "stop", "sha256:v", prompt_tokens=3, completion_tokens=5,
                       choices=(ChoiceEnd(0, "stop", 2), ChoiceEnd(1, "length", 3)))
    answer = _completion("chat", "r1", chat(n=2), several, {0: ("a", None), 1: ("b c", None)})
    validate("CreateChatCompletionResponse", answer)
    assert [(c["index"], c["finish_reason"], c["message"]["content"])
            for c in answer["choices"]] == [(0, "stop", "a"), (1, "length", "b c")]
    validate("ErrorResponse", error_payload(errors.InvalidArgument("params.top_p", "bad")))


def test_log_probabilities_in_openais_two_shapes_validate_against_its_document():
    from services.common.logprobs import TokenLogprob, TopLogprob
    from services.gateway.openai_logprobs import chat_logprobs, completion_logprobs
    from tests.openai_schema import validate

    logprobs = [TokenLogprob(" Paris", b" Paris", -0.25, (TopLogprob(" Paris", b" Paris", -0.25),
                                                          TopLogprob(" Lyon", b" Lyon", -2.0))),
                TokenLogprob(".", b".", -0.5, (TopLogprob(".", b".", -0.5),
                                               TopLogprob("!", b"!", -1.0)))]
    chat_choice = {"index": 0, "finish_reason": "stop", "logprobs": chat_logprobs(logprobs),
                   "message": {"role": "assistant", "content": " Paris.", "refusal": None}}
    validate("CreateChatCompletionResponse", {
        "id": "chatcmpl-r", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [chat_choice]})
    assert chat_choice["logprobs"]["content"][0]["bytes"] == list(b" Paris")
    completion = completion_logprobs(logprobs, 3)
    assert completion["text_offset"] == [3, 9]
    assert completion["top_logprobs"][1] == {".": -0.5, "!": -1.0}
    validate("CreateCompletionResponse", {
        "id": "cmpl-r", "object": "text_completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop", "text": " Paris.",
                     "logprobs": completion}]})


@pytest.mark.parametrize("fields, param", [
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
])
def test_log_probability_bounds_name_the_parameter(fields, param):
    from services.common.tenancy import TenantPlan
    from services.gateway.requests import Principal
    from services.gateway.validation import Limits, check_parameters
    from services.registry.manifest import ModelVersion

    version = ModelVersion("sha256:" + "0" * 64, {
        "name": "demo", "tokenizer": "whitespace",
        "engine": {"kind": "reference", "context_window": 100, "max_output_tokens": 50},
        "sampling": {"max_tokens": 16, "temperature": 0.7, "top_p": 0.9, "top_k": 0}})
    with pytest.raises(errors.InvalidArgument) as raised:
        check_parameters(to_generation(chat(**fields), "r", ""),
                         Principal("t", "k", "user", TenantPlan()), version, Limits())
    assert openai_param(raised.value.field, None) == param


def test_a_completions_logprobs_is_at_most_five():
    body = parse_body(CompletionBody, {"model": "m", "prompt": "p", "logprobs": 2})
    assert to_generation(body, "r", "").sampling.top_logprobs == 2
    with pytest.raises(errors.InvalidArgument) as raised:
        to_generation(parse_body(CompletionBody, {"model": "m", "prompt": "p", "logprobs": 6}),
                      "r", "")
    assert raised.value.field == "logprobs" and "[0, 5]" in raised.value.message


def test_response_format_becomes_the_schemas_compact_text():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = chat(response_format={"type": "json_schema", "json_schema": {
        "name": "thing", "schema": schema, "strict": True}})
    request = to_generation(body, "r", "")
    assert request.response_format.type == "json_schema"
    assert request.response_format.json_schema == (
        '{"type":"object","properties":{"a":{"type":"integer"}}}')
    json_object = to_generation(chat(response_format={"type": "json_object"}), "r", "")
    assert json_object.response_format.type == "json_object"
    assert to_generation(chat(), "r", "").response_format.type == "text"
    with pytest.raises(errors.InvalidArgument) as missing:
        to_generation(chat(response_format={"type": "json_schema"}), "r", "")
    assert missing.value.field == "response_format.json_schema"
    huge = {"type": "object", "description": "x" * 40_000}
    with pytest.raises(errors.InvalidArgument) as too_big:
        to_generation(chat(response_format={"type": "json_schema", "json_schema": {
            "name": "big", "schema": huge}}), "r", "")
    assert too_big.value.field == "response_format.json_schema"
    assert "32768" in too_big.value.message
