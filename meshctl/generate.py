"""`meshctl generate`: one generation through the gateway, printed as it arrives — a thin layer
over the Python SDK (`infermesh_client`) that hands `meshctl` the protobuf shapes it prints."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from infermesh_client import NO_RETRIES, AsyncClient, Generation, InfermeshError, Message

from infermesh.v1 import inference_pb2
from services.common import tls


@dataclass
class GenerationResult:
    text: str
    final: inference_pb2.Final | None
    error_code: str = ""
    error_message: str = ""
    retry_after_s: float | None = None  # the refusal's RetryInfo delay, when it had one


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
        return {"messages": [Message(role="user", content=text)]}
    return {"prompt": text}


def _sampling_arguments(params: inference_pb2.SamplingParams) -> dict:
    return {name: getattr(params, name) for name in ("max_tokens", "temperature", "seed")
            if params.HasField(name)}


def _client(gateway: str, api_key: str, mesh_tls: tls.MeshTls | None) -> AsyncClient:
    # The CLI reports a refusal as it comes (no waiting on the server's retry delay).
    return AsyncClient(gateway, api_key, tls=mesh_tls is not None,
                       root_certificates=mesh_tls.ca if mesh_tls else None, retry=NO_RETRIES)


def _timings(generation: Generation) -> inference_pb2.Timings:
    timings = inference_pb2.Timings()
    for name, seconds in (("queue", generation.timings.queue),
                          ("time_to_first_token", generation.timings.time_to_first_token),
                          ("total", generation.timings.total)):
        getattr(timings, name).FromNanoseconds(round(seconds * 1e9))
    return timings


def _final(generation: Generation, error: InfermeshError | None = None) -> inference_pb2.Final:
    final = inference_pb2.Final(
        request_id=generation.request_id,
        finish_reason=inference_pb2.FinishReason.Value(generation.finish_reason.upper()),
        usage=inference_pb2.Usage(prompt_tokens=generation.usage.prompt_tokens,
                                  completion_tokens=generation.usage.completion_tokens),
        timings=_timings(generation), model_version=generation.model_version)
    if error is not None:
        final.error.code = error.code
        final.error.message = error.message
        final.error.field = error.field
        if error.retry_after is not None:
            final.error.retry_after.FromNanoseconds(round(error.retry_after * 1e9))
    return final


async def stream_generation(
    gateway: str, api_key: str, model: str, prompt: str, params: inference_pb2.SamplingParams,
    cancel_after: int | None = None, out=sys.stdout, chat: bool = False,
    mesh_tls: tls.MeshTls | None = None,
) -> GenerationResult:
    """Streams over `GenerateStream`, writing text to `out`; sends Cancel after `cancel_after`
    Tokens frames. `mesh_tls`: what verifies the gateway (`meshctl.config.tls_for`)."""
    pieces: list[str] = []
    async with _client(gateway, api_key, mesh_tls) as client:
        stream = client.stream(model, **generation_input(prompt, chat),
                               **_sampling_arguments(params))
        try:
            async with stream:
                async for delta in stream:
                    if delta.result is not None:
                        return GenerationResult("".join(pieces), _final(delta.result))
                    pieces.append(delta.text)
                    out.write(delta.text)
                    out.flush()
                    if cancel_after is not None and len(pieces) == cancel_after:
                        await stream.cancel()
        except InfermeshError as exc:
            if exc.generation is not None:  # the generation's own Final, with its error
                return GenerationResult("".join(pieces), _final(exc.generation, exc))
            return GenerationResult("".join(pieces), None, exc.code, exc.message,
                                    exc.retry_after)
    return GenerationResult("".join(pieces), None, "UNAVAILABLE", "the stream ended without Final")


async def unary_generation(
    gateway: str, api_key: str, model: str, prompt: str, params: inference_pb2.SamplingParams,
    chat: bool = False, mesh_tls: tls.MeshTls | None = None,
) -> tuple[inference_pb2.GenerateResponse | None, str, str, float | None]:
    """The reply, or None with the error's code, message and retry delay (None: not given)."""
    async with _client(gateway, api_key, mesh_tls) as client:
        try:
            generation = await client.generate(model, **generation_input(prompt, chat),
                                               **_sampling_arguments(params))
        except InfermeshError as exc:
            return None, exc.code, exc.message, exc.retry_after
    final = _final(generation)
    return inference_pb2.GenerateResponse(
        request_id=final.request_id, model_version=final.model_version, text=generation.text,
        finish_reason=final.finish_reason, usage=final.usage, timings=final.timings), "", "", None
