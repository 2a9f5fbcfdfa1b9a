"""Mid-stream failover over in-memory peers: a replica that breaks or stalls after its first token
hands the generation to another one, which continues from the token ids delivered; the client
gets the uncut text, usage counts each token once, every route is released with how it went."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from backends.triton.adapter import EngineChunk, EngineRequest
from services.common import errors
from services.gateway.failover import Continuation, FailoverSettings, seeded_to_move
from services.gateway.pipeline import Finished, GenerationPipeline, TokenText
from services.gateway.requests import GenerationRequest, SamplingRequest
from services.gateway.server import encode_final
from services.scheduler.outcome import Outcome
from tests.unit.test_gateway_route_outcomes import (
    MANIFEST,
    PRINCIPAL,
    PROMPT,
    ReplicaRouting,
    pipeline,
)

TOKENS = 12


class Engine:
    """Token i is "w{i} " with id 100 + i, one chunk each; a continuation starts after its
    continue_ids. "dying-N" breaks after N tokens, "stalling-N" goes silent after N."""

    def __init__(self) -> None:
        self.requests: dict[str, EngineRequest] = {}

    async def generate(self, endpoint, request):
        self.requests[endpoint] = request
        start = len(request.continue_ids)
        assert list(request.continue_ids) == [100 + i for i in range(start)]
        end = start + request.max_tokens
        for i in range(start, end):
            kind, _, after = endpoint.partition("-")
            if after and i - start == int(after):
                if kind == "dying":
                    raise errors.Unavailable(f"replica {endpoint} went away")
                await asyncio.sleep(60)
            yield EngineChunk(f"w{i} ", 5 + start, i - start + 1, i == end - 1,
                              token_ids=(100 + i,))


async def generate(p: GenerationPipeline, max_tokens: int = TOKENS):
    events = []

    async def send(event) -> None:
        events.append(event)

    request = GenerationRequest(request_id="r1", model="demo", prompt=PROMPT,
                                sampling=SamplingRequest(max_tokens=max_tokens))
    finished = await p.run(PRINCIPAL, request, send)
    await p.drain_background()
    return "".join(e.text for e in events if isinstance(e, TokenText)), finished


def failover_pipeline(routing, **settings):
    p = pipeline(routing, Engine())
    p._failover = FailoverSettings(**settings)
    return p


async def test_a_replica_that_breaks_mid_stream_hands_the_generation_on():
    routing = ReplicaRouting(["dying-4", "dying-3", "healthy"])
    text, finished = await generate(failover_pipeline(routing))
    assert text == "".join(f"w{i} " for i in range(TOKENS))
    assert finished.finish_reason == "length" and finished.error is None
    assert finished.completion_tokens == TOKENS and finished.prompt_tokens == 5
    assert finished.moves == 2 and finished.continuation_exact
    assert [r["exclude"] for r in routing.routes] == [[], ["dying-4"], ["dying-4", "dying-3"]]
    assert sorted(routing.releases) == [
        ("res-dying-3", Outcome.FAILED_AFTER_FIRST_TOKEN, 3),
        ("res-dying-4", Outcome.FAILED_AFTER_FIRST_TOKEN, 4),
        ("res-healthy", Outcome.OK, 5)]


async def test_moves_are_bounded():
    routing = ReplicaRouting(["dying-4", "dying-3", "healthy"])
    text, finished = await generate(failover_pipeline(routing, max_moves=1))
    assert finished.finish_reason == "error" and finished.error.code == "UNAVAILABLE"
    assert text == "".join(f"w{i} " for i in range(7)) and finished.completion_tokens == 7


async def test_a_stalled_replica_is_left_after_the_stall_timeout():
    routing = ReplicaRouting(["stalling-2", "healthy"])
    async with asyncio.timeout(5):
        text, finished = await generate(failover_pipeline(routing, stall_s=0.2))
    assert text == "".join(f"w{i} " for i in range(TOKENS)) and finished.moves == 1
    assert ("res-stalling-2", Outcome.FAILED_AFTER_FIRST_TOKEN, 2) in routing.releases


async def test_a_replica_lost_after_its_last_token_ends_the_generation_without_a_move():
    routing = ReplicaRouting(["dying-4", "healthy"])
    text, finished = await generate(failover_pipeline(routing), max_tokens=4)
    assert text == "w0 w1 w2 w3 " and finished.finish_reason == "length"
    assert len(routing.routes) == 1


@pytest.mark.parametrize(("temperature", "seed", "position_sampling", "draws_own_seed", "exact"), [
    (0.0, None, False, True, True), (0.8, 7, False, True, False), (0.8, 7, True, True, True),
    (0.8, None, True, True, False), (0.8, None, True, False, True)])
def test_a_moved_sampled_generation_is_exact_only_with_a_seed_and_position_derived_sampling(
        temperature, seed, position_sampling, draws_own_seed, exact):
    original = EngineRequest("m", "r", "p", max_tokens=8, temperature=temperature, seed=seed,
                             return_output_ids=True)
    continuation = Continuation(original, FailoverSettings(), position_sampling, draws_own_seed)
    continuation.received(EngineChunk("a b ", 1, 2, False, token_ids=(1, 2)))
    assert continuation.may_move() and continuation.exact
    moved = continuation.move("r0")
    assert moved.continue_ids == (1, 2) and moved.max_tokens == 6
    assert continuation.exact is exact


def test_structured_output_never_moves():
    original = EngineRequest("m", "r", "p", max_tokens=8, return_output_ids=True,
                             guided_decoding_guide_type="json")
    continuation = Continuation(original, FailoverSettings(), True)
    continuation.received(EngineChunk("{", 1, 1, False, token_ids=(1,)))
    assert not continuation.may_move()


def test_without_an_id_per_token_nothing_can_move():
    original = EngineRequest("m", "r", "p", max_tokens=8, return_output_ids=True)
    continuation = Continuation(original, FailoverSettings(), True)
    continuation.received(EngineChunk("a b ", 1, 2, False, token_ids=(1,)))
    assert not continuation.may_move()


def test_the_final_frame_carries_the_moves_only_when_there_were_some():
    moved = encode_final(Finished("r", "length", moves=2, continuation_exact=False))
    assert moved.failover.moves == 2 and not moved.failover.continuation_exact
    assert not encode_final(Finished("r", "length")).HasField("failover")


class OneReplica(ReplicaRouting):
    async def route(self, triton_model_name, version_id, request_id, hold_s, exclude, **kwargs):
        if set(self.replicas) <= set(exclude):
            self.routes.append({"exclude": list(exclude)})
            raise errors.Unavailable("no replica left")
        return await super().route(triton_model_name, version_id, request_id, hold_s, exclude,
                                   **kwargs)


async def test_a_stalled_replica_takes_the_continuation_back_when_no_other_can():
    """Silence is not death: with no other replica, the continuation goes back to it."""
    engine = Engine()
    stalls = {"n": 0}
    original = engine.generate

    async def stalls_once(endpoint, request):
        stalls["n"] += 1
        async for chunk in original("stalling-2" if stalls["n"] == 1 else endpoint, request):
            yield chunk

    engine.generate = stalls_once
    routing = OneReplica(["only"])
    p = pipeline(routing, engine)
    p._failover = FailoverSettings(stall_s=0.2)
    async with asyncio.timeout(5):
        text, finished = await generate(p)
    assert text == "".join(f"w{i} " for i in range(TOKENS)) and finished.moves == 1
    assert [r["exclude"] for r in routing.routes] == [[], ["only"], []]


@pytest.mark.parametrize(("kind", "drawn"), [("torch", True), ("reference", False)])
async def test_an_unseeded_sampled_generation_gets_one_seed_before_it_moves(kind, drawn):
    """The torch engine would draw its own seed, another on each replica: the gateway draws one
    first, so the continuation makes the original's draws (exact). The reference engine's
    unseeded draws are seed 0's on every replica: nothing is drawn, and the move is exact too."""
    engine = Engine()
    manifest = {**MANIFEST, "engine": {**MANIFEST["engine"], "kind": kind}}
    p = pipeline(ReplicaRouting(["dying-4", "healthy"]), engine, manifest)
    events = []

    async def send(event) -> None:
        events.append(event)

    request = GenerationRequest(request_id="r1", model="demo", prompt=PROMPT,
                                sampling=SamplingRequest(max_tokens=TOKENS, temperature=0.8))
    finished = await p.run(PRINCIPAL, request, send)
    await p.drain_background()
    seeds = {endpoint: sent.seed for endpoint, sent in engine.requests.items()}
    assert (seeds["dying-4"] is not None) is drawn and seeds["healthy"] == seeds["dying-4"]
    assert finished.moves == 1 and finished.continuation_exact


def test_a_seed_is_drawn_only_for_a_sampled_request_without_one_that_may_move():
    sampled = EngineRequest("m", "r", "p", max_tokens=8, temperature=0.8)
    assert seeded_to_move(sampled, FailoverSettings(), True).seed is not None
    for request, settings, position_sampling, *draws_own_seed in [
            (dataclasses.replace(sampled, seed=5), FailoverSettings(), True),
            (dataclasses.replace(sampled, temperature=0.0), FailoverSettings(), True),
            (sampled, FailoverSettings(max_moves=0), True),
            (sampled, FailoverSettings(), False),
            (sampled, FailoverSettings(max_moves=1), True, False),
            (dataclasses.replace(sampled, guided_decoding_guide_type="json"),
             FailoverSettings(), True)]:
        assert seeded_to_move(request, settings, position_sampling, *draws_own_seed) == request


async def test_a_continuation_on_a_replica_that_never_answers_is_moved_on_unjudged():
    """A continuation's timer runs from its start: a move to a hung replica costs
    first_chunk_s, not the request's whole deadline; busy is not broken, so its breaker is not
    charged."""
    routing = ReplicaRouting(["dying-4", "stalling-0", "healthy"])
    async with asyncio.timeout(5):
        text, finished = await generate(
            failover_pipeline(routing, stall_s=0.2, first_chunk_s=0.3))
    assert text == "".join(f"w{i} " for i in range(TOKENS)) and finished.moves == 2
    assert ("res-stalling-0", Outcome.UNREPORTED, 0) in routing.releases


async def test_a_continuation_slower_than_stall_s_to_its_first_chunk_is_not_moved_again():
    """A busy replica's prefill of the prompt and the moved tokens may outlast stall_s: within
    first_chunk_s the continuation completes there."""
    engine = Engine()
    original = engine.generate

    async def slow_to_continue(endpoint, request):
        if request.continue_ids:
            await asyncio.sleep(0.4)  # queued and prefilling: past stall_s
        async for chunk in original(endpoint, request):
            yield chunk

    engine.generate = slow_to_continue
    routing = ReplicaRouting(["dying-4", "busy", "healthy"])
    p = pipeline(routing, engine)
    p._failover = FailoverSettings(stall_s=0.2, first_chunk_s=2.0)
    async with asyncio.timeout(5):
        text, finished = await generate(p)
    assert text == "".join(f"w{i} " for i in range(TOKENS)) and finished.moves == 1
    assert ("res-busy", Outcome.OK, TOKENS - 4) in routing.releases
