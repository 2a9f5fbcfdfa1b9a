"""`meshctl generate`: one generation through the gateway, printed as it arrives."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from infermesh.v1 import inference_pb2, inference_pb2_grpc


@dataclass
class GenerationResult:
    text: str
    final: inference_pb2.Final | None
    error_code: str = ""
    error_message: str = ""


def sampling(max_tokens: int | None, temperature: float | None, seed: int | None):
    params = inference_pb2.SamplingParams()
    if max_tokens is not None:
        params.max_tokens = max_tokens
    if temperature is not None:
        params.temperature = temperature
    if seed is not None:
        params.seed = seed
    return params


def generation_input(text: str, chat: bool) -> dict:
    """The request's input: `text` as a raw prompt, or as one user message of a chat (which the
    gateway renders with the model's chat template)."""
    if chat:
        return {"messages": inference_pb2.Messages(
            messages=[inference_pb2.ChatMessage(role="user", content=text)])}
    return {"prompt": text}


async def stream_generation(
    gateway: str, api_key: str, model: str, prompt: str, params: inference_pb2.SamplingParams,
    cancel_after: int | None = None, out=sys.stdout, chat: bool = False,
) -> GenerationResult:
    """Streams over `GenerateStream`, writing text to `out`; sends Cancel after `cancel_after`
    Tokens frames."""
    request_id = uuid.uuid4().hex
    send_queue: asyncio.Queue[inference_pb2.ClientFrame | None] = asyncio.Queue()
    await send_queue.put(inference_pb2.ClientFrame(start=inference_pb2.GenerateRequest(
        request_id=request_id, model=model, params=params, **generation_input(prompt, chat))))

    async def frames() -> AsyncIterator[inference_pb2.ClientFrame]:
        while (frame := await send_queue.get()) is not None:
            yield frame

    pieces: list[str] = []
    tokens_seen = 0
    async with grpc.aio.insecure_channel(gateway) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        call = stub.GenerateStream(frames(), metadata=(("authorization", f"Bearer {api_key}"),))
        try:
            async for frame in call:
                kind = frame.WhichOneof("frame")
                if kind == "tokens":
                    pieces.append(frame.tokens.text)
                    out.write(frame.tokens.text)
                    out.flush()
                    tokens_seen += 1
                    if cancel_after is not None and tokens_seen == cancel_after:
                        await send_queue.put(inference_pb2.ClientFrame(
                            cancel=inference_pb2.Cancel(request_id=request_id)))
                elif kind == "final":
                    await send_queue.put(None)
                    return GenerationResult("".join(pieces), frame.final)
        except grpc.aio.AioRpcError as exc:
            return GenerationResult("".join(pieces), None, exc.code().name, exc.details() or "")
        finally:
            await send_queue.put(None)
    return GenerationResult("".join(pieces), None, "UNAVAILABLE", "the stream ended without Final")


async def unary_generation(
    gateway: str, api_key: str, model: str, prompt: str, params: inference_pb2.SamplingParams,
    chat: bool = False,
) -> tuple[inference_pb2.GenerateResponse | None, str, str]:
    async with grpc.aio.insecure_channel(gateway) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        try:
            reply = await stub.Generate(
                inference_pb2.GenerateRequest(model=model, params=params,
                                              **generation_input(prompt, chat)),
                metadata=(("authorization", f"Bearer {api_key}"),),
            )
            return reply, "", ""
        except grpc.aio.AioRpcError as exc:
            return None, exc.code().name, exc.details() or ""
