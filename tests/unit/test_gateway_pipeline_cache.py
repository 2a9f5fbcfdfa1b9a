"""The pipeline with the response cache: a tenant whose plan turns it on gets a repeated
deterministic request from the cache — counted against its request rate, but no tokens, no
slot, no route, no engine, audited as cached — and nobody else does; only an answer to the
request as asked is kept."""

from __future__ import annotations

import asyncio
import dataclasses

from backends.triton.adapter import EngineRequest
from services.common import errors
from services.common.tenancy import TenantPlan
from services.gateway.admission import AdmissionLimits, FairAdmission
from services.gateway.failover import Continuation, FailoverSettings
from services.gateway.pipeline import (
    Finished,
    GenerationPipeline,
    TokenText,
    _answers_in_full,
    _Progress,
)
from services.gateway.requests import GenerationRequest, Principal, SamplingRequest
from services.gateway.response_cache import ResponseCache
from services.gateway.shadow import ShadowTraffic
from services.gateway.validation import Limits
from services.registry.catalog import ModelCatalog
from services.registry.manifest import version_id
from services.registry.rollout import Routing
from tests.fakes import whitespace_tokenizers
from tests.unit.test_gateway_route_outcomes import MANIFEST, Admission, Engine, ReplicaRouting

CACHING = TenantPlan(response_cache=True)


class CountingAdmission(Admission):
    def __init__(self) -> None:
        self.acquired = self.charged = 0
        self.over_rate = False

    async def acquire_slot(self, tenant, request_id, input_tokens, output_tokens):
        self.acquired += 1
        return await super().acquire_slot(tenant, request_id, input_tokens, output_tokens)

    async def charge_request(self, tenant):
        if self.over_rate:
            raise errors.ResourceExhausted("rpm: 60 requests per minute", reason="rpm")
        self.charged += 1


class Audit:
    def __init__(self) -> None:
        self.records = []

    def emit(self, event) -> None:
        self.records.append(event.generation)


def pipeline(admission: CountingAdmission, audit: Audit) -> GenerationPipeline:
    catalog = ModelCatalog()
    vid = version_id(MANIFEST)
    catalog.rebuild({f"demo/versions/{vid}": {"version_id": vid, "manifest": MANIFEST},
                     "demo/routing": Routing(revision=1, production=vid).to_record()})
    routing, engine = ReplicaRouting(["up"]), Engine()
    return GenerationPipeline(
        catalog, admission, routing, engine, audit, Limits(), FairAdmission(AdmissionLimits()),
        shadow=ShadowTraffic(routing, engine, max_in_flight=1, timeout_s=5.0),
        tokenizers=whitespace_tokenizers(), source="gateway/test",
        response_cache=ResponseCache())


async def ask(p: GenerationPipeline, tenant: str, plan: TenantPlan, request_id: str,
              **sampling) -> tuple[str, Finished]:
    pieces = []

    async def send(event) -> None:
        if isinstance(event, TokenText):
            pieces.append(event.text)

    finished = await p.run(Principal(tenant, "k", "user", plan), GenerationRequest(
        request_id=request_id, model="demo", prompt="hello there",
        sampling=SamplingRequest(max_tokens=3, **sampling)), send)
    await p.drain_background()
    return "".join(pieces), finished


async def test_a_repeat_is_a_free_audited_hit_for_its_tenant_only():
    admission, audit = CountingAdmission(), Audit()
    p = pipeline(admission, audit)
    text, first = await ask(p, "a", CACHING, "r1", temperature=0.0)
    again_text, again = await ask(p, "a", CACHING, "r2", temperature=0.0)
    assert again_text == text == "t1 t2 t3 " and again.cached and not first.cached
    assert (again.prompt_tokens, again.completion_tokens) == (
        first.prompt_tokens, first.completion_tokens)
    assert admission.acquired == 1  # the hit took no slot and no tokens
    assert [r.cached for r in audit.records] == [False, True]
    _, other = await ask(p, "b", CACHING, "r3", temperature=0.0)
    assert not other.cached and admission.acquired == 2
    # Seeded requests are cached too; sampled ones without a seed, and plans without the
    # cache, never are.
    await ask(p, "a", CACHING, "r4", temperature=0.9, seed=5)
    assert (await ask(p, "a", CACHING, "r5", temperature=0.9, seed=5))[1].cached
    await ask(p, "a", CACHING, "r6", temperature=0.9)
    assert not (await ask(p, "a", CACHING, "r7", temperature=0.9))[1].cached
    await ask(p, "c", TenantPlan(), "r8", temperature=0.0)
    assert not (await ask(p, "c", TenantPlan(), "r9", temperature=0.0))[1].cached


class Degrading(CountingAdmission):
    """Grants fewer output tokens than asked: the plan's degraded cap under pressure."""

    async def acquire_slot(self, tenant, request_id, input_tokens, output_tokens):
        grant = await super().acquire_slot(tenant, request_id, input_tokens, output_tokens)
        return dataclasses.replace(grant, max_tokens=output_tokens - 1)


async def test_an_answer_cut_short_by_a_degraded_grant_is_not_kept_for_the_full_request():
    admission, audit = Degrading(), Audit()
    p = pipeline(admission, audit)
    _, first = await ask(p, "a", CACHING, "r1", temperature=0.0)
    assert first.finish_reason == "length"
    _, again = await ask(p, "a", CACHING, "r2", temperature=0.0)
    assert not again.cached and admission.acquired == 2


def test_only_a_generation_that_answers_the_request_in_full_is_kept():
    """Not one cut short by its grant, nor a sampled one whose move could not continue the
    same draw (an exact move, or a greedy one, is the same answer)."""
    def progress(temperature: float, moved: bool, position_sampling: bool,
                 shortened: bool = False) -> _Progress:
        continuation = Continuation(
            EngineRequest("m", "r", "p", max_tokens=4, temperature=temperature, seed=1),
            FailoverSettings(), position_sampling)
        if moved:
            continuation.move("replica-a")
        return _Progress(arrived=0.0, continuation=continuation, shortened=shortened)

    assert _answers_in_full(_Progress(arrived=0.0))
    assert _answers_in_full(progress(0.9, moved=False, position_sampling=False))
    assert _answers_in_full(progress(0.9, moved=True, position_sampling=True))
    assert _answers_in_full(progress(0.0, moved=True, position_sampling=False))
    assert not _answers_in_full(progress(0.9, moved=True, position_sampling=False))
    assert not _answers_in_full(progress(0.0, moved=False, position_sampling=True,
                                         shortened=True))


async def test_a_failed_generation_is_not_kept():
    admission, audit = CountingAdmission(), Audit()
    p = pipeline(admission, audit)
    p._routing.replicas = ["refusing"]
    _, first = await ask(p, "a", CACHING, "r1", temperature=0.0)
    assert first.finish_reason == "error"
    p._routing.replicas = ["up"]
    _, again = await ask(p, "a", CACHING, "r2", temperature=0.0)
    assert not again.cached and again.finish_reason == "length"


async def test_a_hit_counts_against_the_request_rate_and_its_replay_has_the_deadline():
    admission, audit = CountingAdmission(), Audit()
    p = pipeline(admission, audit)
    await ask(p, "a", CACHING, "r1", temperature=0.0)
    assert (await ask(p, "a", CACHING, "r2", temperature=0.0))[1].cached
    assert (admission.acquired, admission.charged) == (1, 1)  # a request, no tokens or slot
    admission.over_rate = True
    _, refused = await ask(p, "a", CACHING, "r3", temperature=0.0)
    assert refused.finish_reason == "error" and refused.error.code == "RESOURCE_EXHAUSTED"
    admission.over_rate = False

    async def stuck(event) -> None:  # a client that reads nothing
        if isinstance(event, TokenText):
            await asyncio.sleep(60)

    finished = await p.run(Principal("a", "k", "user", CACHING), GenerationRequest(
        request_id="r4", model="demo", prompt="hello there", timeout_s=0.05,
        sampling=SamplingRequest(max_tokens=3, temperature=0.0)), stuck)
    assert finished.finish_reason == "deadline" and finished.cached
