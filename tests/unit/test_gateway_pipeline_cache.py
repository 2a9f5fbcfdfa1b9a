"""The pipeline with the response cache: a tenant whose plan turns it on gets a repeated
deterministic request from the cache — no admission, no route, no engine, audited as cached —
and nobody else does."""

from __future__ import annotations

from services.common.tenancy import TenantPlan
from services.gateway.admission import AdmissionLimits, FairAdmission
from services.gateway.pipeline import Finished, GenerationPipeline, TokenText
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
        self.acquired = 0

    async def acquire_slot(self, tenant, request_id, input_tokens, output_tokens):
        self.acquired += 1
        return await super().acquire_slot(tenant, request_id, input_tokens, output_tokens)


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
    assert admission.acquired == 1  # the hit was not admitted: not charged
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
