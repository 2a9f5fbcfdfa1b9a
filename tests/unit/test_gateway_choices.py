"""Several choices (n): one generation each, seed + i, reported as one generation."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from services.common import errors
from services.gateway.choices import choice_request, run_choices
from services.gateway.pipeline import Accepted, Finished, TokenText
from services.gateway.requests import GenerationRequest, SamplingRequest


def request(n: int, seed: int | None = 7, key: str = "", request_id: str = "r" * 126
            ) -> GenerationRequest:
    return GenerationRequest(request_id, "m", prompt="p", idempotency_key=key,
                             sampling=SamplingRequest(n=n, seed=seed, temperature=0.9))


def test_each_choice_has_its_own_seed_id_and_key_within_the_limits():
    choices = [choice_request(request(3, key="k" * 128), i) for i in range(3)]
    assert [c.sampling.seed for c in choices] == [7, 8, 9]
    assert all(c.sampling.n == 1 and len(c.request_id) == 128 for c in choices)
    assert len({c.request_id for c in choices}) == len({c.idempotency_key for c in choices}) == 3
    assert [(c.choice.request_id, c.choice.index, c.choice.count) for c in choices] == [
        ("r" * 126, i, 3) for i in range(3)]
    assert choice_request(request(2, seed=2**64 - 1), 1).sampling.seed == 0
    assert choice_request(request(2, seed=None), 1).sampling.seed is None


async def test_choice_ids_never_collide_and_a_too_long_id_is_refused_naming_it():
    """The client's id is kept whole (never cut to make room for the suffix), so two long ids
    sharing a prefix give different choices; an id with no room left is refused."""
    a, b = ("x" * 125 + "a", "x" * 125 + "b")
    assert {choice_request(request(2, request_id=a), 1).request_id,
            choice_request(request(2, request_id=b), 1).request_id} == {a + "-1", b + "-1"}

    async def run_one(one: GenerationRequest, send) -> Finished:
        raise AssertionError("no choice runs")

    async def send(event) -> None:
        return None

    with pytest.raises(errors.InvalidArgument) as refused:
        await run_choices(run_one, request(2, request_id="x" * 127), send, max_choices=16)
    assert refused.value.field == "request_id" and "at most 126 characters" in \
        refused.value.message
    with pytest.raises(errors.InvalidArgument):  # n = 11: "-10" needs three characters
        await run_choices(run_one, request(11, request_id="x" * 126), send, max_choices=16)


async def test_choices_run_side_by_side_and_report_as_one_generation():
    started: list[GenerationRequest] = []

    async def run_one(one: GenerationRequest, send) -> Finished:
        started.append(one)
        index = int(one.request_id.rsplit("-", 1)[1])
        await send(Accepted(one.request_id, "sha256:v"))
        await asyncio.sleep(0.01 * (3 - index))
        for _ in range(index + 1):
            await send(TokenText(one.request_id, f"t{index}"))
        finished = Finished(one.request_id, "length" if index else "stop", "sha256:v",
                            prompt_tokens=5, completion_tokens=index + 1)
        await send(finished)
        return finished

    events = []

    async def send(event) -> None:
        events.append(event)

    finished = await run_choices(run_one, request(3), send, max_choices=4)
    assert len(started) == 3
    assert [type(e) for e in events].count(Accepted) == 1
    assert [type(e) for e in events].count(Finished) == 1 and events[-1] is finished
    assert all(e.request_id == "r" * 126 for e in events)
    texts = [(e.index, e.text) for e in events if isinstance(e, TokenText)]
    assert sorted(texts) == [(0, "t0"), (1, "t1"), (1, "t1"), (2, "t2"), (2, "t2"), (2, "t2")]
    assert (finished.prompt_tokens, finished.completion_tokens) == (5, 6)  # prompt once
    assert [(c.index, c.finish_reason) for c in finished.choices] == [
        (0, "stop"), (1, "length"), (2, "length")]


async def test_a_failed_choice_fails_the_request_and_n_is_bounded():
    async def run_one(one: GenerationRequest, send) -> Finished:
        failed = one.request_id.endswith("-1")
        return Finished(one.request_id, "error" if failed else "stop",
                        error=errors.ResourceExhausted("over quota") if failed else None)

    async def send(event) -> None:
        return None

    finished = await run_choices(run_one, request(2), send, max_choices=2)
    assert finished.finish_reason == "error" and finished.error.code == "RESOURCE_EXHAUSTED"
    with pytest.raises(errors.InvalidArgument) as refused:
        await run_choices(run_one, request(3), send, max_choices=2)
    assert refused.value.field == "params.n" and "max_choices" in refused.value.message
    single = dataclasses.replace(request(1), request_id="one")
    assert (await run_choices(run_one, single, send, max_choices=2)).request_id == "one"


class Choices:
    """Choice 1 ends as `ending` says after a moment; the others run until cancelled, and
    record that their cleanup ran."""

    def __init__(self, ending: str) -> None:
        self.ending = ending
        self.cleaned: list[int] = []

    async def run_one(self, one: GenerationRequest, send) -> Finished:
        index = one.choice.index
        try:
            if index != 1:
                await asyncio.sleep(60)
            await asyncio.sleep(0.01)
            if self.ending == "raise":
                raise RuntimeError("a bug in choice 1")
            return Finished(one.request_id, "error", error=errors.Internal("choice 1 broke"))
        finally:
            await asyncio.sleep(0)  # a cleanup that awaits, as the pipeline's do
            self.cleaned.append(index)


async def test_a_failed_choice_stops_its_siblings_and_waits_for_their_cleanups():
    choices, events = Choices("error"), []

    async def send(event) -> None:
        events.append(event)

    async with asyncio.timeout(5):
        finished = await run_choices(choices.run_one, request(3), send, max_choices=4)
    assert finished.finish_reason == "error" and finished.error.code == "INTERNAL"
    assert sorted(choices.cleaned) == [0, 1, 2]  # every choice ended before the answer
    assert [c.finish_reason for c in finished.choices] == ["cancelled", "error", "cancelled"]
    assert events == [finished]


async def test_a_choice_that_raises_stops_its_siblings_and_the_exception_propagates():
    choices = Choices("raise")

    async def send(event) -> None:
        return None

    async with asyncio.timeout(5):
        with pytest.raises(RuntimeError, match="a bug in choice 1"):
            await run_choices(choices.run_one, request(3), send, max_choices=4)
    assert sorted(choices.cleaned) == [0, 1, 2]


async def test_a_cancelled_request_reports_cancelled_after_its_choices_ended():
    cleaned: list[int] = []
    seen_at_final: list[list[int]] = []

    async def send(event) -> None:
        if isinstance(event, Finished):
            seen_at_final.append(sorted(cleaned))

    async def never_ending(one: GenerationRequest, sink) -> Finished:
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0)  # a cleanup that awaits
            cleaned.append(one.choice.index)
        raise AssertionError("cancelled before")

    task = asyncio.create_task(run_choices(never_ending, request(2), send, max_choices=4))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen_at_final == [[0, 1]]
