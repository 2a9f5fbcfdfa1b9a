"""Issue 18's sampling features over the real stack with the official `openai` client: log
probabilities from the real model's distribution, penalties and logit_bias, their bounds;
every answer checked against OpenAI's published OpenAPI document."""

from __future__ import annotations

import json

import openai
import pytest

from deploy.local.stack import StackInfo
from infermesh.v1 import inference_pb2, inference_pb2_grpc
from tests.e2e.test_openai_schema import _api, _sse_payloads
from tests.e2e.test_tenants_and_quotas import new_tenant
from tests.e2e.test_torch_engine import generate
from tests.openai_schema import validate

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


async def test_streamed_greedy_logprobs_put_the_chosen_token_on_top(stack: StackInfo):
    """The real model, greedy: each chosen token's log probability is the largest of the three
    the engine reports at its step (it is their first), all from one softmax."""
    async with _api(stack).chat.completions.with_streaming_response.create(
            model=stack.model, messages=QUESTION, max_tokens=8, temperature=0, stream=True,
            logprobs=True, top_logprobs=3) as streamed:
        chunks = await _sse_payloads(streamed)
    entries, text = [], ""
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
        for choice in chunk["choices"]:
            text += choice["delta"].get("content") or ""
            if choice["logprobs"]:
                entries.extend(choice["logprobs"]["content"])
    assert len(entries) == 8, entries
    for entry in entries:
        top = entry["top_logprobs"]
        assert len(top) == 3 and entry["logprob"] <= 0
        assert top[0]["token"] == entry["token"]
        assert entry["logprob"] == pytest.approx(max(t["logprob"] for t in top))
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert sum(2.718281828 ** t["logprob"] for t in top) <= 1.0001
        assert bytes(entry["bytes"]).decode(errors="replace") == entry["token"]
    assert "".join(e["token"] for e in entries) == text


async def test_penalties_change_the_real_models_text_deterministically(stack: StackInfo):
    """gRPC, greedy, a prompt that invites repeating itself: the penalties change the text, the
    same way twice; a unary answer carries one log probability per token when asked."""
    prompt = "Paris, Paris, Paris, Paris, Paris,"
    params = {"max_tokens": 6, "temperature": 0.0}
    plain = await generate(stack, prompt=prompt,
                           params=inference_pb2.SamplingParams(**params, logprobs=True))
    assert len(plain.logprobs) == plain.usage.completion_tokens > 0
    assert all(not lp.top_logprobs and lp.logprob <= 0 for lp in plain.logprobs)
    penalized = inference_pb2.SamplingParams(
        **params, frequency_penalty=2.0, presence_penalty=2.0, repetition_penalty=1.5)
    first, second = [await generate(stack, prompt=prompt, params=penalized) for _ in range(2)]
    assert first.text == second.text != plain.text, (plain.text, first.text)
    assert "Paris" not in first.text


async def test_bounds_are_refused_with_a_400_naming_the_parameter(stack: StackInfo):
    api = _api(stack)
    chat = {"model": stack.model, "messages": QUESTION, "max_tokens": 2}
    for extra, param in (({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                         ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
                         ({"logit_bias": {"49152": 1}}, "logit_bias"),
                         ({"frequency_penalty": 2.5}, "frequency_penalty")):
        with pytest.raises(openai.BadRequestError) as refused:
            await api.chat.completions.create(**chat, **extra)
        body = refused.value.response.json()
        validate("ErrorResponse", body)
        assert body["error"]["param"] == param, body
    with pytest.raises(openai.BadRequestError) as refused:
        await api.completions.create(model=stack.model, prompt="hi", max_tokens=2, logprobs=6)
    assert refused.value.response.json()["error"]["param"] == "logprobs"
    completion = await api.completions.with_raw_response.create(
        model=stack.reference_model, prompt="hi", max_tokens=3, logprobs=2)
    payload = json.loads(completion.text)
    validate("CreateCompletionResponse", payload)
    logprobs = payload["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == 3 and all(len(top) == 2 for top in logprobs["top_logprobs"])


async def test_a_repeated_greedy_request_is_a_cache_hit_for_its_tenant_only(stack: StackInfo):
    """Two tenants whose plans turn the response cache on: the second identical temperature-0
    request of one is answered from the cache (usage says so, the text is the same), the other
    tenant's first is not; a sampled request without a seed never is."""
    _, key_a = await new_tenant(stack, response_cache=True)
    _, key_b = await new_tenant(stack, response_cache=True)
    chat = {"model": stack.reference_model, "messages": QUESTION, "max_tokens": 6,
            "temperature": 0}

    async def ask(key: str, **extra) -> dict:
        api = openai.AsyncOpenAI(base_url=stack.openai_base_url, api_key=key, max_retries=0,
                                 timeout=60)
        reply = json.loads((await api.chat.completions.with_raw_response.create(
            **{**chat, **extra})).text)
        validate("CreateChatCompletionResponse", reply)
        return reply

    first, again = await ask(key_a), await ask(key_a)
    assert "prompt_tokens_details" not in first["usage"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"][
        "prompt_tokens"] > 0
    assert again["choices"][0]["message"] == first["choices"][0]["message"]
    other = await ask(key_b)
    assert "prompt_tokens_details" not in other["usage"]
    assert other["choices"][0]["message"] == first["choices"][0]["message"]
    for _ in range(2):
        sampled = await ask(key_a, temperature=0.8)
        assert "prompt_tokens_details" not in sampled["usage"]


async def test_three_seeded_choices_are_the_same_three_on_repeat(stack: StackInfo):
    """n=3 with a seed: three choices (choice i runs with seed + i), the same three again;
    usage counts the prompt once; streamed chunks carry each choice's index."""
    api = _api(stack)
    ask = {"model": stack.reference_model, "messages": QUESTION, "max_tokens": 5, "seed": 41,
           "temperature": 0.8, "n": 3}
    replies = [json.loads((await api.chat.completions.with_raw_response.create(**ask)).text)
               for _ in range(2)]
    for reply in replies:
        validate("CreateChatCompletionResponse", reply)
    first, again = ([c["message"]["content"] for c in reply["choices"]] for reply in replies)
    assert first == again and len(set(first)) == 3
    assert [c["index"] for c in replies[0]["choices"]] == [0, 1, 2]
    assert replies[0]["usage"]["completion_tokens"] == 15
    single = json.loads((await api.chat.completions.with_raw_response.create(
        **{**ask, "n": 1, "seed": 42})).text)
    assert single["choices"][0]["message"]["content"] == first[1]  # choice 1 is seed + 1
    assert replies[0]["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]
    async with api.chat.completions.with_streaming_response.create(
            **ask, stream=True) as streamed:
        chunks = await _sse_payloads(streamed)
    texts = ["", "", ""]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["delta"].get("content") or ""
    assert texts == first
    async with stack.channel() as channel:
        over_grpc = await inference_pb2_grpc.InferenceStub(channel).Generate(
            inference_pb2.GenerateRequest(
                model=stack.reference_model, messages=inference_pb2.Messages(
                    messages=[inference_pb2.ChatMessage(**m) for m in QUESTION]),
                params=inference_pb2.SamplingParams(max_tokens=5, seed=41, temperature=0.8,
                                                    n=3)),
            metadata=(("authorization", f"Bearer {stack.api_key}"),), timeout=60)
    assert [c.text for c in over_grpc.choices] == first and over_grpc.text == first[0]
    assert over_grpc.usage.completion_tokens == 15
    with pytest.raises(openai.BadRequestError) as refused:
        await api.chat.completions.create(**{**ask, "n": 9})
    assert refused.value.response.json()["error"]["param"] == "n"
