"""Every client-supplied string and repeated field of a generation request has a limit
(`requests.FIELD_LIMITS`), checked when the request is built — before the idempotency cache,
logs, metrics or audit events can keep it — on both fronts, naming the field and the limit."""

from __future__ import annotations

import pytest

from infermesh.v1 import inference_pb2
from services.common import errors
from services.gateway.openai_protocol import ChatCompletionBody, CompletionBody, to_generation
from services.gateway.requests import (
    FIELD_LIMITS,
    ChatTurn,
    GenerationRequest,
    ResponseFormat,
    SamplingRequest,
)
from services.gateway.server import decode_request
from services.gateway.tool_calls import Tool


def over(name: str) -> int:
    return FIELD_LIMITS[name].chars + 1


# (field named in the error, the limit in its message, GenerationRequest keyword arguments)
CASES = [
    ("request_id", "at most 128", {"request_id": "r" * 129}),
    ("request_id", "A-Z", {"request_id": "has space"}),
    ("model", "at most 256", {"model": "m" * over("model")}),
    ("idempotency_key", "at most 128", {"idempotency_key": "k" * (3 << 20)}),
    ("user", "at most 256", {"user": "u" * over("user")}),
    ("prompt", "at most 200000", {"prompt": "p" * over("prompt")}),
    ("messages", "1..256", {"prompt": None, "messages": ()}),
    ("messages", "1..256", {"prompt": None, "messages": (ChatTurn("user", "x"),) * 257}),
    ("messages", "at most 200000",
     {"prompt": None, "messages": (ChatTurn("user", "x" * 100_000),) * 3}),
    ("messages[1].role", "at most 32",
     {"prompt": None, "messages": (ChatTurn("user", "x"), ChatTurn("r" * 33, "x"))}),
    ("params.stop", "at most 4", {"sampling": SamplingRequest(stop=("s",) * 5)}),
    ("params.stop[0]", "1..128", {"sampling": SamplingRequest(stop=("s" * 129,))}),
    ("params.stop[0]", "1..128", {"sampling": SamplingRequest(stop=("",))}),
    ("params.bad_words", "at most 16", {"sampling": SamplingRequest(bad_words=("w",) * 17)}),
    ("params.bad_words[2]", "1..128",
     {"sampling": SamplingRequest(bad_words=("a", "b", "w" * 129))}),
    ("response_format.json_schema", "at most 32768",
     {"response_format": ResponseFormat("json_schema", "{" + " " * 32_767 + "}")}),
    ("response_format.name", "at most 64",
     {"response_format": ResponseFormat("json_schema", "{}", "n" * over("response_format.name"))}),
    ("tools", "at most 64", {"tools": (Tool("f"),) * 65}),
    ("tools", "at most 65536", {"tools": (Tool("f", "d" * 65_537),)}),
    ("tools[1].function.name", "1-64", {"tools": (Tool("f"), Tool("t" * over("tools.name")))}),
    ("tools[0].function.name", "A-Z", {"tools": (Tool("no spaces"),)}),
]


def test_every_limited_field_has_a_case():
    covered = {field.split("[")[0] for field, _, _ in CASES} | {"messages.role", "tools.name"}
    assert set(FIELD_LIMITS) <= covered


@pytest.mark.parametrize("field,limit,kwargs", CASES, ids=[c[0] + ":" + c[1] for c in CASES])
def test_a_field_over_its_limit_is_refused_when_the_request_is_built(field, limit, kwargs):
    with pytest.raises(errors.InvalidArgument) as raised:
        GenerationRequest(**{"request_id": "r1", "model": "demo", "prompt": "hi", **kwargs})
    assert raised.value.field == field and limit in raised.value.message
    assert len(raised.value.message) < 200  # the value itself is never echoed


def test_values_at_their_limit_pass():
    GenerationRequest(request_id="r" * 128, model="m" * 256, prompt="p" * 200_000,
                      idempotency_key="k" * 128, user="u" * 256,
                      sampling=SamplingRequest(stop=("s" * 128,) * 4, bad_words=("w",) * 16))


@pytest.mark.parametrize("field,value", [("model", "m" * 200_000),
                                         ("idempotency_key", "k" * (3 << 20)),
                                         ("user", "u" * 257)])
def test_the_grpc_front_refuses_at_decode(field, value):
    message = inference_pb2.GenerateRequest(**{"model": "demo", "prompt": "hi", field: value})
    with pytest.raises(errors.InvalidArgument) as raised:
        decode_request(message)
    assert raised.value.field == field


@pytest.mark.parametrize("body_type,body", [
    (CompletionBody, {"model": "m" * 200_000, "prompt": "hi"}),
    (ChatCompletionBody, {"model": "demo", "user": "u" * 300,
                          "messages": [{"role": "user", "content": "hi"}]}),
    (CompletionBody, {"model": "demo", "prompt": "hi", "stop": ["s"] * 5}),
])
def test_the_http_front_refuses_before_the_generation_exists(body_type, body):
    with pytest.raises(errors.InvalidArgument):
        to_generation(body_type.model_validate(body), "r1", "")
    with pytest.raises(errors.InvalidArgument) as raised:
        to_generation(CompletionBody.model_validate({"model": "demo", "prompt": "hi"}), "r1",
                      "k" * 129)
    assert raised.value.field == "idempotency_key"
