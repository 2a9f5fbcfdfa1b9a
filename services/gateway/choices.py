"""Several choices for one request (OpenAI's `n`): each choice is a generation of its own — its
own engine sequence, admission and quota charge, route and audit record — run side by side, and
reported to the front as one generation whose events carry the choice's index.

Choice i of a seeded request runs with seed + i (mod 2^64), so the same request gives the same n
choices on every repeat; an unseeded sampled request gives n independent draws; a greedy one n
equal texts (as OpenAI's). Usage counts the prompt once and sums the completions. The first
choice that fails fails the request (its error is the answer, as one generation's would be) and
stops the others. Each choice's audit record carries the client's request id and its index.
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
from services.gateway.requests import FIELD_LIMITS, ChoiceOf, GenerationRequest

__all__ = ["check_request_id", "choice_request", "merge", "run_choices"]

RunOne = Callable[[GenerationRequest, Send], Awaitable[Finished]]
UINT64 = 2**64


def choice_request(request: GenerationRequest, index: int) -> GenerationRequest:
    """Choice `index`'s own request: n=1, seed + index, its own request id (`<id>-<index>`, the
    client's id whole: `check_request_id` leaves it room) and idempotency key (derived, so a
    retry of the whole request replays every choice)."""
    sampling = request.sampling
    suffix = f"-{index}"
    key = request.idempotency_key
    return dataclasses.replace(
        request,
        request_id=request.request_id + suffix,
        idempotency_key=(hashlib.sha256(key.encode()).hexdigest()[:64] + suffix) if key else "",
        sampling=dataclasses.replace(
            sampling, n=1,
            seed=None if sampling.seed is None else (sampling.seed + index) % UINT64),
        choice=ChoiceOf(request.request_id, index, sampling.n))


def check_request_id(request: GenerationRequest) -> None:
    """A request for n > 1 choices leaves room in its id for the choices' suffix (`-<n-1>`):
    ids are never cut, so no two choices' ids can be one. INVALID_ARGUMENT names request_id."""
    room = FIELD_LIMITS["request_id"].chars - len(f"-{request.sampling.n - 1}")
    if len(request.request_id) > room:
        raise errors.InvalidArgument(
            "request_id", f"must be at most {room} characters with n={request.sampling.n} "
            f"(each choice runs as <request_id>-<index>), got {len(request.request_id)}")


def _failed(result: Finished) -> bool:
    return result.error is not None or result.finish_reason in ("cancelled", "deadline")


def merge(request_id: str, results: list[Finished], failed: Finished | None = None) -> Finished:
    """The request's one `Finished`: the failed choice's (`failed`, else the first failed one),
    else every choice's end, the prompt counted once and the completions summed."""
    failed = failed or next((r for r in results if _failed(r)), None)
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


async def _stop(tasks: list[asyncio.Task[Finished]]) -> None:
    """Cancels the choices still running and waits (bounded) for their cleanups to run."""
    running = [task for task in tasks if not task.done()]
    for task in running:
        task.cancel()
    if running:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CANCEL_REPORT_TIMEOUT_S):
                await asyncio.wait(running)


async def run_choices(run_one: RunOne, request: GenerationRequest, send: Send,
                      max_choices: int) -> Finished:
    """Runs `request.sampling.n` choices through `run_one` (one generation each) and reports
    them through `send` as one generation: one Accepted, TokenText tagged with the index, one
    Finished. n above `max_choices` (the gateway's setting) is INVALID_ARGUMENT naming `n`.

    As a task group: the first choice that fails (an error, a deadline) or raises stops the
    others, and every choice has ended (its releases and audit record made) before the
    request's Finished goes out or its exception propagates; a cancelled request likewise."""
    n = request.sampling.n
    if not 1 <= n <= max_choices:
        raise errors.InvalidArgument(
            "params.n", f"must be in [1, {max_choices}] (the gateway's max_choices), got {n}")
    if n == 1:
        return await run_one(request, send)
    check_request_id(request)
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

    choices = [choice_request(request, i) for i in range(n)]
    tasks = [asyncio.create_task(run_one(choice, tagged(i))) for i, choice in enumerate(choices)]
    failed: Finished | None = None
    try:
        pending = set(tasks)
        while pending and failed is None:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=tasks.index):
                if task.cancelled():
                    continue  # only this function cancels a choice
                if (exc := task.exception()) is not None:
                    await _stop(tasks)
                    raise exc
                if _failed(task.result()):
                    failed = failed or task.result()
        await _stop(tasks)
    except asyncio.CancelledError:
        await _stop(tasks)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CANCEL_REPORT_TIMEOUT_S):
                await send(Finished(request.request_id, "cancelled"))
        raise
    results = [task.result() if task.done() and not task.cancelled() and not task.exception()
               else Finished(choice.request_id, "cancelled")
               for task, choice in zip(tasks, choices, strict=True)]
    finished = merge(request.request_id, results, failed)
    await send(finished)
    return finished
