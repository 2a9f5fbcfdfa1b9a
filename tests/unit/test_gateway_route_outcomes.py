"""The pipeline's routing over in-memory peers: it sends the prompt's prefix hashes and length,
retries a replica that fails before the first token on another one, and releases every route
with how it went (what the scheduler's breakers and demand meter read)."""

from __future__ import annotations

import asyncio

from backends.triton.adapter import EngineChunk
from services.common import errors
from services.common.kv_blocks import prompt_blocks, word_token_ids
from services.common.prefix import prompt_block_hashes
from services.common.tenancy import TenantPlan
from services.gateway.admission import AdmissionLimits, FairAdmission
from services.gateway.peers import Grant, Route
from services.gateway.pipeline import GenerationPipeline, TokenText
from services.gateway.requests import GenerationRequest, Principal, SamplingRequest
from services.gateway.shadow import ShadowTraffic
from services.gateway.validation import Limits
from services.registry.catalog import ModelCatalog
from services.registry.manifest import version_id
from services.registry.rollout import Routing
from services.scheduler.outcome import Outcome
from tests.fakes import whitespace_tokenizers

MANIFEST = {
    "name": "demo", "description": "production", "tokenizer": "whitespace",
    "engine": {"kind": "reference", "context_window": 4096, "max_output_tokens": 1024,
               "max_batch_size": 8},
    "sampling": {"max_tokens": 3, "temperature": 0.7, "top_p": 0.95, "top_k": 0},
    "cost_per_1k_input_tokens": 0.1, "cost_per_1k_output_tokens": 0.2,
}
PRINCIPAL = Principal("acme", "k1", "user", TenantPlan())
PROMPT = "You are a helpful assistant who always answers briefly and politely. " * 6


class Admission:
    async def acquire_slot(self, tenant, request_id, input_tokens, output_tokens):
        return Grant(slot_id="slot", max_tokens=output_tokens)

    async def release_slot(self, tenant, slot_id, input_used, output_used):
        return None

    async def charge_request(self, tenant):
        return None


class ReplicaRouting:
    """Routes to the first replica not excluded; records routes and releases."""

    def __init__(self, replicas: list[str]):
        self.replicas = replicas
        self.routes: list[dict] = []
        self.releases: list[tuple[str, Outcome, int]] = []

    async def route(self, triton_model_name, version_id, request_id, hold_s, exclude, *,
                    prefix_hashes=(), prompt_tokens=0, kv_blocks=((), 0)):
        self.routes.append({"exclude": list(exclude), "prefix_hashes": list(prefix_hashes),
                            "kv_blocks": kv_blocks,
                            "prompt_tokens": prompt_tokens})
        replica = next(r for r in self.replicas if r not in exclude)
        return Route(replica, replica, f"res-{replica}")

    async def release_route(self, reservation_id, outcome=Outcome.UNREPORTED,
                            completion_tokens=0):
        self.releases.append((reservation_id, outcome, completion_tokens))


class Engine:
    """Replica "down" is unreachable; "flaky" fails after its first chunk; "slow" never ends;
    "refusing" answers every request with an error of the engine's (a request it cannot run);
    "gated" waits for `gate` before its first chunk."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()

    async def generate(self, endpoint, request):
        if endpoint == "down":
            raise errors.Unavailable("replica down is unreachable")
        if endpoint == "refusing":
            raise errors.InvalidArgument.relayed(
                "prompt", "the engine cannot run this request: the prompt needs 90 KV blocks")
        if endpoint == "gated":
            await self.gate.wait()
        for count in range(1, 4):
            if endpoint == "slow" and count == 2:
                await asyncio.sleep(60)
            yield EngineChunk(f"t{count} ", 5, count, count == 3)
            if endpoint == "flaky":
                raise errors.Unavailable("replica flaky went away")


def pipeline(routing: ReplicaRouting, engine: Engine | None = None,
             manifest: dict = MANIFEST) -> GenerationPipeline:
    catalog = ModelCatalog()
    vid = version_id(manifest)
    catalog.rebuild({f"demo/versions/{vid}": {"version_id": vid, "manifest": manifest},
                     "demo/routing": Routing(revision=1, production=vid).to_record()})
    engine = engine or Engine()
    return GenerationPipeline(
        catalog, Admission(), routing, engine, _NoAudit(), Limits(),
        FairAdmission(AdmissionLimits()),
        shadow=ShadowTraffic(routing, engine, max_in_flight=1, timeout_s=5.0),
        tokenizers=whitespace_tokenizers(), source="gateway/test",
    )


class _NoAudit:
    def emit(self, event) -> None:
        return None


async def generate(p: GenerationPipeline, principal: Principal = PRINCIPAL):
    events = []

    async def send(event) -> None:
        events.append(event)

    request = GenerationRequest(request_id="r1", model="demo", prompt=PROMPT,
                                sampling=SamplingRequest(max_tokens=3))
    finished = await p.run(principal, request, send)
    await p.drain_background()
    return events, finished


async def test_a_failure_before_the_first_token_is_retried_elsewhere_and_reported():
    routing = ReplicaRouting(["down", "up"])
    p = pipeline(routing)
    events, finished = await generate(p)
    assert finished.finish_reason == "length" and finished.error is None
    assert "".join(e.text for e in events if isinstance(e, TokenText)) == "t1 t2 t3 "
    assert [r["exclude"] for r in routing.routes] == [[], ["down"]]
    assert routing.routes[0]["prefix_hashes"] == prompt_block_hashes(PROMPT)
    # The prompt's KV blocks as the reference engine hashes them (64 words a block), each try.
    kv_blocks = (tuple(prompt_blocks(word_token_ids(PROMPT.split()), 64)), 64)
    assert len(kv_blocks[0]) == 1
    assert [r["kv_blocks"] for r in routing.routes] == [kv_blocks, kv_blocks]
    assert routing.routes[0]["prompt_tokens"] > 0
    assert sorted(routing.releases) == [
        ("res-down", Outcome.FAILED_BEFORE_FIRST_TOKEN, 0), ("res-up", Outcome.OK, 3)]


async def test_an_isolated_tenants_route_hashes_are_salted_whatever_the_engine():
    """Review finding (issue 19): the route's KV block hashes were salted only for an engine
    that takes a cache salt, so an isolated tenant's route followed other tenants' blocks on one
    that does not. Salted with the tenant's own salt, they match only its own blocks."""
    routing = ReplicaRouting(["up"])
    manifest = {**MANIFEST, "engine": {**MANIFEST["engine"], "kind": "saltless"}}
    isolated = Principal("acme", "k1", "user", TenantPlan(isolate_prefix_cache=True))
    _, finished = await generate(pipeline(routing, manifest=manifest), isolated)
    assert finished.error is None
    salted = tuple(prompt_blocks(word_token_ids(PROMPT.split()), 64, "acme"))
    assert routing.routes[0]["kv_blocks"] == (salted, 64)
    assert routing.routes[0]["prefix_hashes"] == prompt_block_hashes(PROMPT, "acme")
    assert salted != tuple(prompt_blocks(word_token_ids(PROMPT.split()), 64))


async def test_a_failed_attempt_is_released_before_the_retry_ends():
    """The dead replica's breaker hears of it at once, not when the other replica finishes."""
    engine = Engine()
    engine.gate.clear()
    routing = ReplicaRouting(["down", "gated"])
    task = asyncio.create_task(generate(pipeline(routing, engine)))
    async with asyncio.timeout(5):
        while not routing.releases:
            await asyncio.sleep(0.01)
    assert routing.releases == [("res-down", Outcome.FAILED_BEFORE_FIRST_TOKEN, 0)]
    assert not task.done()  # the retry is still streaming
    engine.gate.set()
    async with asyncio.timeout(5):
        _, finished = await task
    assert finished.error is None
    assert routing.releases[1:] == [("res-gated", Outcome.OK, 3)]


async def test_an_error_the_engine_reports_about_the_request_says_nothing_of_the_replica():
    routing = ReplicaRouting(["refusing", "up"])
    _, finished = await generate(pipeline(routing))
    assert finished.finish_reason == "error" and finished.error.code == "INVALID_ARGUMENT"
    assert len(routing.routes) == 1  # not retried: another replica would refuse it too
    assert routing.releases == [("res-refusing", Outcome.UNREPORTED, 0)]


async def test_a_failure_after_the_first_token_is_not_retried():
    routing = ReplicaRouting(["flaky", "up"])
    _, finished = await generate(pipeline(routing))
    assert finished.finish_reason == "error" and finished.error.code == "UNAVAILABLE"
    assert len(routing.routes) == 1
    assert routing.releases == [("res-flaky", Outcome.FAILED_AFTER_FIRST_TOKEN, 1)]


async def test_a_cancelled_generation_says_nothing_against_its_replica():
    routing = ReplicaRouting(["slow"])
    p = pipeline(routing)
    task = asyncio.create_task(generate(p))
    async with asyncio.timeout(5):
        while not routing.routes:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await p.drain_background()
    assert routing.releases == [("res-slow", Outcome.CANCELLED, 1)]
