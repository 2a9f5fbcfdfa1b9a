"""Several choices for one request (OpenAI's `n`): each choice is a generation of its own — its
own engine sequence, admission and quota charge, route and audit record — run side by side, and
reported to the front as one generation whose events carry the choice's index.

Choice i of a seeded request runs with seed + i (mod 2^64), so the same request gives the same n
choices on every repeat; an unseeded sampled request gives n independent draws; a greedy one n
equal texts (as OpenAI's). Usage counts the prompt once and sums the completions. The first
choice that fails fails the request (its error is the answer, as one generation's would be).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
from collections.abc import Awaitable, Callable

from services.common import errors
from services.gateway.pipeline import (
    CANCEL_REPORT_TIMEOUT_S,
    Accepted,
    ChoiceEnd,
    Event,
    Finished,
    Send,
    TokenText,
)
from services.gateway.requests import FIELD_LIMITS, GenerationRequest

__all__ = ["choice_request", "merge", "run_choices"]

RunOne = Callable[[GenerationRequest, Send], Awaitable[Finished]]
UINT64 = 2**64


def choice_request(request: GenerationRequest, index: int) -> GenerationRequest:
    """Choice `index`'s own request: n=1, seed + index, its own request id (`<id>-<index>`) and
    idempotency key (derived, so a retry of the whole request replays every choice)."""
    sampling = request.sampling
    suffix = f"-{index}"
    id_chars = FIELD_LIMITS["request_id"].chars
    key = request.idempotency_key
    return dataclasses.replace(
        request,
        request_id=request.request_id[:id_chars - len(suffix)] + suffix,
        idempotency_key=(hashlib.sha256(key.encode()).hexdigest()[:64] + suffix) if key else "",
        sampling=dataclasses.replace(
            sampling, n=1,
            seed=None if sampling.seed is None else (sampling.seed + index) % UINT64))


def merge(request_id: str, results: list[Finished]) -> Finished:
    """The request's one `Finished`: the first failed choice's, else every choice's end, the
    prompt counted once and the completions summed."""
    failed = next((r for r in results
                   if r.error is not None or r.finish_reason in ("cancelled", "deadline")), None)
    first = results[0]
    return Finished(
        request_id=request_id,
        finish_reason=failed.finish_reason if failed else first.finish_reason,
        model_version=first.model_version,
        prompt_tokens=first.prompt_tokens,
        completion_tokens=sum(r.completion_tokens for r in results),
        queue_s=max(r.queue_s for r in results),
        ttft_s=min((r.ttft_s for r in results if r.ttft_s), default=0.0),
        total_s=max(r.total_s for r in results),
        error=failed.error if failed else None,
        cached=all(r.cached for r in results),
        moves=sum(r.moves for r in results),
        continuation_exact=all(r.continuation_exact for r in results),
        choices=tuple(ChoiceEnd(i, r.finish_reason, r.completion_tokens)
                      for i, r in enumerate(results)),
    )


async def run_choices(run_one: RunOne, request: GenerationRequest, send: Send,
                      max_choices: int) -> Finished:
    """Runs `request.sampling.n` choices through `run_one` (one generation each) and reports
    them through `send` as one generation: one Accepted, TokenText tagged with the index, one
    Finished. n above `max_choices` (the gateway's setting) is INVALID_ARGUMENT naming `n`."""
    n = request.sampling.n
    if not 1 <= n <= max_choices:
        raise errors.InvalidArgument(
            "params.n", f"must be in [1, {max_choices}] (the gateway's max_choices), got {n}")
    if n == 1:
        return await run_one(request, send)
    accepted = False

    def tagged(index: int) -> Send:
        async def forward(event: Event) -> None:
            nonlocal accepted
            if isinstance(event, Accepted) and not accepted:
                accepted = True
                await send(dataclasses.replace(event, request_id=request.request_id))
            elif isinstance(event, TokenText):
                await send(dataclasses.replace(event, request_id=request.request_id,
                                               index=index))
            # each choice's Finished is held: the request has one, sent below
        return forward

    tasks = [asyncio.create_task(run_one(choice_request(request, i), tagged(i)))
             for i in range(n)]
    try:
        results = list(await asyncio.gather(*tasks))
    except asyncio.CancelledError:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CANCEL_REPORT_TIMEOUT_S):
                await send(Finished(request.request_id, "cancelled"))
        raise
    finished = merge(request.request_id, results)
    await send(finished)
    return finished
