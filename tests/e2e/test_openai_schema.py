"""Every answer of the OpenAI HTTP API, success and error, unary and streamed, validates
against OpenAI's published OpenAPI document (the pinned subset in `tests/data`)."""

from __future__ import annotations

import json

import openai
import pytest

from deploy.local.stack import StackInfo
from tests.openai_schema import validate

pytestmark = pytest.mark.integration


def _api(stack: StackInfo) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.openai_base_url, api_key=stack.api_key,
                              max_retries=0, timeout=60)


async def _sse_payloads(response) -> list[dict]:
    payloads = []
    async for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            payloads.append(json.loads(line.removeprefix("data: ")))
    return payloads


async def test_generations_models_and_errors_validate(stack: StackInfo):
    api = _api(stack)
    chat = {"model": stack.reference_model, "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}]}
    unary = await api.chat.completions.with_raw_response.create(**chat)
    validate("CreateChatCompletionResponse", json.loads(unary.text))
    async with api.chat.completions.with_streaming_response.create(
            **chat, stream=True, stream_options={"include_usage": True}) as streamed:
        chunks = await _sse_payloads(streamed)
    assert len(chunks) >= 3
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)

    completion = {"model": stack.reference_model, "max_tokens": 4, "prompt": "hi"}
    unary = await api.completions.with_raw_response.create(**completion)
    validate("CreateCompletionResponse", json.loads(unary.text))
    async with api.completions.with_streaming_response.create(
            **completion, stream=True) as streamed:
        chunks = await _sse_payloads(streamed)
    # OpenAI itself streams legacy completions with `finish_reason: null` until the last
    # chunk, which its document does not allow: only the last chunk is held to it.
    validate("CreateCompletionResponse", chunks[-1])

    validate("ListModelsResponse", json.loads((await api.models.with_raw_response.list()).text))
    validate("Model", json.loads(
        (await api.models.with_raw_response.retrieve(stack.reference_model)).text))

    with pytest.raises(openai.BadRequestError) as refused:
        await api.chat.completions.create(**{**chat, "max_tokens": -1})
    validate("ErrorResponse", refused.value.response.json())
    with pytest.raises(openai.NotFoundError) as missing:
        await api.chat.completions.create(**{**chat, "model": "no-such-model"})
    validate("ErrorResponse", missing.value.response.json())
