"""The OpenAI-compatible API through the libraries applications use on top of the `openai`
client — LangChain's `ChatOpenAI` and LiteLLM's `completion` — over the real stack: the same text
gRPC returns for the same seed, streaming and not, and refusals as each library's own errors."""

from __future__ import annotations

import os

# LiteLLM fetches a price list from GitHub on import unless told to use its bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm
import pytest
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI

from deploy.local.stack import StackInfo
from infermesh.v1 import inference_pb2
from tests.e2e.test_openai_api import grpc_text

pytestmark = pytest.mark.integration

SYSTEM, QUESTION = "Be brief.", "Tell me about harbours."


async def grpc_chat_text(stack: StackInfo, seed: int, max_tokens: int) -> str:
    return await grpc_text(
        stack, model=stack.reference_model,
        messages=inference_pb2.Messages(messages=[
            inference_pb2.ChatMessage(role="system", content=SYSTEM),
            inference_pb2.ChatMessage(role="user", content=QUESTION)]),
        params=inference_pb2.SamplingParams(max_tokens=max_tokens, seed=seed))


async def test_langchain_chat_openai_invokes_and_streams(stack: StackInfo):
    expected = await grpc_chat_text(stack, seed=5, max_tokens=10)
    chat = ChatOpenAI(base_url=stack.openai_base_url, api_key=stack.api_key,
                      model=stack.reference_model, max_tokens=10, seed=5, max_retries=0,
                      timeout=60)
    messages = [SystemMessage(SYSTEM), HumanMessage(QUESTION)]
    reply = await chat.ainvoke(messages)
    assert reply.content == expected
    assert reply.response_metadata["finish_reason"] == "length"
    assert reply.usage_metadata["output_tokens"] == 10
    streamed = "".join([chunk.content async for chunk in chat.astream(messages)])
    assert streamed == expected


async def test_litellm_completes_streams_and_maps_errors(stack: StackInfo):
    expected = await grpc_chat_text(stack, seed=6, max_tokens=9)
    common = {"api_base": stack.openai_base_url, "api_key": stack.api_key, "max_retries": 0,
              "messages": [{"role": "system", "content": SYSTEM},
                           {"role": "user", "content": QUESTION}]}
    model = f"openai/{stack.reference_model}"  # LiteLLM's "any OpenAI-compatible server"
    reply = await litellm.acompletion(model=model, max_tokens=9, seed=6, **common)
    assert reply.choices[0].message.content == expected
    assert reply.usage.completion_tokens == 9
    stream = await litellm.acompletion(model=model, max_tokens=9, seed=6, stream=True, **common)
    assert "".join([c.choices[0].delta.content or "" async for c in stream]) == expected
    with pytest.raises(litellm.NotFoundError):
        await litellm.acompletion(model="openai/no-such-model", max_tokens=2, **common)
    with pytest.raises(litellm.AuthenticationError):
        await litellm.acompletion(model=model, max_tokens=2, **{**common, "api_key": "imk_nope"})
    with pytest.raises(litellm.BadRequestError, match=r"max_completion_tokens|max_tokens"):
        await litellm.acompletion(model=model, max_tokens=10**9, **common)
