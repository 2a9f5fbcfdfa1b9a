"""`meshctl generate`: one generation through the gateway, printed as it arrives — a thin layer
over the Python SDK's `AsyncClient` (`meshctl.client` gives it meshctl's endpoint, key and
TLS)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import typer
from infermesh_client import AsyncClient, Generation, InfermeshError, Message, Unavailable


@dataclass
class GenerationResult:
    text: str
    generation: Generation | None  # how it finished (None: it never reached its Final)
    error: InfermeshError | None = None  # what ended it in error, if anything did


def sampling(max_tokens: int | None, temperature: float | None,
             seed: int | None) -> dict[str, Any]:
    """The SDK's sampling arguments for the flags given."""
    given = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
    return {name: value for name, value in given.items() if value is not None}


def generation_input(text: str, chat: bool) -> dict[str, Any]:
    """The request's input: `text` as a raw prompt, or as one user message of a chat (which the
    gateway renders with the model's chat template)."""
    if chat:
        return {"messages": [Message(role="user", content=text)]}
    return {"prompt": text}


def print_final(generation: Generation) -> None:
    """How it finished, on stderr (stdout carries the text alone)."""
    typer.echo("")
    typer.echo(
        f"finish_reason={generation.finish_reason} "
        f"prompt_tokens={generation.usage.prompt_tokens} "
        f"completion_tokens={generation.usage.completion_tokens} "
        f"ttft_ms={generation.timings.time_to_first_token * 1000:.1f} "
        f"model_version={generation.model_version}",
        err=True,
    )


async def stream_generation(
    client_options: dict[str, Any], model: str, prompt: str, params: dict[str, Any],
    cancel_after: int | None = None, out=sys.stdout, chat: bool = False,
) -> GenerationResult:
    """Streams over `GenerateStream`, writing text to `out`; sends Cancel after `cancel_after`
    Tokens frames. `client_options`: the SDK client's (`meshctl.client`)."""
    pieces: list[str] = []
    async with AsyncClient(**client_options) as client:
        stream = client.stream(model, **generation_input(prompt, chat), **params)
        try:
            async with stream:
                async for delta in stream:
                    if delta.result is not None:
                        return GenerationResult("".join(pieces), delta.result)
                    pieces.append(delta.text)
                    out.write(delta.text)
                    out.flush()
                    if cancel_after is not None and len(pieces) == cancel_after:
                        await stream.cancel()
        except InfermeshError as exc:  # with the generation's own Final, when it had one
            return GenerationResult("".join(pieces), exc.generation, exc)
    return GenerationResult("".join(pieces), None,
                            Unavailable("the stream ended without Final"))


async def unary_generation(client_options: dict[str, Any], model: str, prompt: str,
                           params: dict[str, Any], chat: bool = False) -> Generation:
    """The whole generation (the unary `Generate`); raises the SDK's `InfermeshError`."""
    async with AsyncClient(**client_options) as client:
        return await client.generate(model, **generation_input(prompt, chat), **params)
