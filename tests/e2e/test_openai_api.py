"""The OpenAI-compatible HTTP API over the real stack, driven by the official `openai` client:
the same pipeline as gRPC (same text for the same seed), errors mapped to the client's exception
classes, and a stream closed early frees the engine's slot."""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid

import openai
import pytest

from deploy.local.stack import StackInfo
from infermesh.v1 import inference_pb2, inference_pb2_grpc
from tests.e2e.test_tenants_and_quotas import new_tenant
from tests.e2e.test_walking_skeleton import auth, engine_metrics, metric, reference

pytestmark = pytest.mark.integration


def client(stack: StackInfo, key: str | None = None) -> openai.AsyncOpenAI:
    # No retries: the tests look at the first answer, not at the client's back-off.
    return openai.AsyncOpenAI(base_url=stack.openai_base_url, api_key=key or stack.api_key,
                              max_retries=0, timeout=60)


async def grpc_text(stack: StackInfo, **request) -> str:
    async with stack.channel() as channel:
        reply = await inference_pb2_grpc.InferenceStub(channel).Generate(
            inference_pb2.GenerateRequest(**request), metadata=auth(stack.api_key), timeout=60)
    return reply.text


async def test_completion_unary_and_streaming_equal_grpc(stack: StackInfo):
    expected = await grpc_text(
        stack, model=stack.reference_model, prompt="Tell me about rivers",
        params=inference_pb2.SamplingParams(max_tokens=10, seed=7))
    api = client(stack)
    reply = await api.completions.create(model=stack.reference_model,
                                         prompt="Tell me about rivers", max_tokens=10, seed=7)
    assert reply.choices[0].text == expected and expected.strip()
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 10
    assert reply.system_fingerprint.startswith("sha256:")
    stream = await api.completions.create(model=stack.reference_model,
                                          prompt="Tell me about rivers", max_tokens=10, seed=7,
                                          stream=True)
    pieces, reasons = [], []
    async for chunk in stream:
        pieces.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == expected
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}


async def test_chat_streaming_with_usage_equals_unary(stack: StackInfo):
    api = client(stack)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a colour"}]
    unary = await api.chat.completions.create(model=stack.reference_model, messages=messages,
                                              max_completion_tokens=8, seed=4, user="alice")
    assert unary.choices[0].message.role == "assistant"
    assert unary.usage.completion_tokens == 8
    stream = await api.chat.completions.create(
        model=stack.reference_model, messages=messages, max_completion_tokens=8, seed=4,
        user="alice", stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == unary.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


async def test_chat_on_the_real_model_renders_its_template(stack: StackInfo):
    reply = await client(stack).chat.completions.create(
        model=stack.model, messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=4, temperature=0)
    assert reply.choices[0].message.content.strip()
    assert 0 < reply.usage.completion_tokens <= 4
    assert reply.usage.prompt_tokens > 3  # the template's markup around the two words


async def test_models_list_and_get_show_the_registry(stack: StackInfo):
    api = client(stack)
    listed = {model.id: model for model in (await api.models.list()).data}
    assert {stack.model, stack.reference_model} <= set(listed)
    production = listed[stack.reference_model].model_extra["version"]
    assert production.startswith("sha256:")
    pinned = await api.models.retrieve(f"{stack.reference_model}@production")
    assert pinned.model_extra["version"] == production
    with pytest.raises(openai.NotFoundError):
        await api.models.retrieve("no-such-model")


async def test_errors_map_to_the_clients_exception_classes(stack: StackInfo):
    with pytest.raises(openai.AuthenticationError):
        await client(stack, "imk_not-a-real-key").completions.create(
            model=stack.reference_model, prompt="hi", max_tokens=2)
    api = client(stack)
    with pytest.raises(openai.NotFoundError) as missing:
        await api.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert missing.value.body["type"] == "not_found_error"
    with pytest.raises(openai.NotFoundError):  # a refusal keeps its status when streaming too
        await api.chat.completions.create(model="no-such-model", stream=True,
                                          messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as bad:
        await api.chat.completions.create(model=stack.reference_model,
                                          messages=[{"role": "user", "content": "hi"}],
                                          max_completion_tokens=10**9)
    assert bad.value.body["param"] == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError) as unsupported:  # over the gateway's max_choices
        await api.chat.completions.create(model=stack.reference_model,
                                          messages=[{"role": "user", "content": "hi"}], n=9)
    assert unsupported.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as functions:  # deprecated: tools replace it
        await api.chat.completions.create(
            model=stack.reference_model, messages=[{"role": "user", "content": "hi"}],
            functions=[{"name": "f", "parameters": {}}])
    assert functions.value.body["param"] == "functions"


async def test_request_id_is_echoed_and_idempotency_key_replays(stack: StackInfo):
    api = client(stack)
    request_id = f"http-{uuid.uuid4().hex[:12]}"
    key = uuid.uuid4().hex
    headers = {"X-Request-Id": request_id, "Idempotency-Key": key}
    first = await api.completions.with_raw_response.create(
        model=stack.reference_model, prompt="once", max_tokens=6, extra_headers=headers)
    assert first.headers["x-request-id"] == request_id
    again = await api.completions.create(model=stack.reference_model, prompt="once",
                                         max_tokens=6, extra_headers={"Idempotency-Key": key})
    assert again.choices[0].text == first.parse().choices[0].text


async def test_the_timeout_header_is_the_generations_deadline(stack: StackInfo):
    api = client(stack)
    with pytest.raises(openai.APIStatusError) as late:  # ~2 s of decoding, 0.3 s allowed
        await api.completions.create(
            model=stack.reference_model, prompt="take your time", max_tokens=500,
            extra_body={"min_tokens": 500}, extra_headers={"X-Request-Timeout": "0.3"})
    assert late.value.status_code == 504 and late.value.body["code"] == "deadline_exceeded"
    with pytest.raises(openai.BadRequestError) as bad:
        await api.completions.create(model=stack.reference_model, prompt="p", max_tokens=2,
                                     extra_headers={"X-Request-Timeout": "soon"})
    assert bad.value.body["param"] == "X-Request-Timeout"
    with pytest.raises(openai.BadRequestError) as too_long:
        await api.completions.create(model=stack.reference_model, prompt="p", max_tokens=2,
                                     extra_headers={"X-Request-Timeout": "86400"})
    assert too_long.value.body["param"] == "X-Request-Timeout"


async def test_over_quota_is_a_rate_limit_error_with_retry_after(stack: StackInfo):
    _, key = await new_tenant(stack, output_tokens_per_minute=600)  # a burst of 100
    api = client(stack, key)
    reply = await api.completions.create(model=stack.reference_model, prompt="count",
                                         max_tokens=90, extra_body={"min_tokens": 90})
    assert reply.usage.completion_tokens == 90
    with pytest.raises(openai.RateLimitError) as limited:  # ~10 left: 90 must wait ~8 s
        await api.completions.create(model=stack.reference_model, prompt="count", max_tokens=90)
    assert int(limited.value.response.headers["retry-after"]) >= 1


async def wait_engine_cancellations(stack: StackInfo, count: float) -> None:
    """Until the engine has recorded `count` cancelled requests and runs none (the counter and
    the gauge are published apart: both are waited for)."""
    deadline = time.monotonic() + 10
    while True:
        text = engine_metrics(stack)
        if metric(text, "infermesh_engine_requests_total", outcome="cancelled",
                  **reference(stack)) == count and metric(
                text, "nv_trt_llm_request_metrics", request_type="active",
                **reference(stack)) == 0:
            return
        assert time.monotonic() < deadline, f"the engine never recorded the cancellation " \
            f"and went idle:\n{text}"
        await asyncio.sleep(0.1)


async def test_a_unary_client_that_gives_up_cancels_on_the_engine(stack: StackInfo):
    cancelled_before = metric(engine_metrics(stack), "infermesh_engine_requests_total",
                              outcome="cancelled", **reference(stack))
    impatient = openai.AsyncOpenAI(base_url=stack.openai_base_url, api_key=stack.api_key,
                                   max_retries=0, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        await impatient.completions.create(model=stack.reference_model, prompt="a long story",
                                           max_tokens=1000, extra_body={"min_tokens": 1000})
    await wait_engine_cancellations(stack, cancelled_before + 1)  # and the engine is idle


async def test_closing_a_stream_early_cancels_on_the_engine(stack: StackInfo):
    cancelled_before = metric(engine_metrics(stack), "infermesh_engine_requests_total",
                              outcome="cancelled", **reference(stack))
    api = client(stack)
    stream = await api.chat.completions.create(
        model=stack.reference_model, messages=[{"role": "user", "content": "a long story"}],
        max_tokens=1000, seed=5, stream=True)
    seen = 0
    async for _chunk in stream:
        seen += 1
        if seen == 3:
            break
    await stream.close()
    await wait_engine_cancellations(stack, cancelled_before + 1)  # and the engine is idle
    gateway = f"http://{stack.metrics['gateway']}/metrics"
    with urllib.request.urlopen(gateway, timeout=5) as response:
        assert metric(response.read().decode(), "infermesh_gateway_http_disconnects_total",
                      route="chat") >= 1
