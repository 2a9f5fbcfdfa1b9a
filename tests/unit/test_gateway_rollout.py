"""The pipeline's model resolution over in-memory peers: the canary arm answers the assigned
callers, and a shadow copy never reaches the client, takes no quota and is not audited."""

from __future__ import annotations

import asyncio
import copy

from prometheus_client import REGISTRY

from backends.triton.adapter import EngineChunk, EngineRequest
from services.common.tenancy import TenantPlan
from services.gateway.admission import AdmissionLimits, FairAdmission
from services.gateway.choices import run_choices
from services.gateway.peers import Grant, Route
from services.gateway.pipeline import Accepted, Finished, GenerationPipeline, TokenText
from services.gateway.requests import GenerationRequest, Principal, SamplingRequest
from services.gateway.shadow import ShadowTraffic
from services.gateway.validation import Limits
from services.registry.catalog import ModelCatalog
from services.registry.manifest import served_model_name, version_id
from services.registry.rollout import Routing
from tests.fakes import whitespace_tokenizers

MANIFEST = {
    "name": "demo", "description": "production", "tokenizer": "whitespace",
    "engine": {"kind": "reference", "context_window": 4096, "max_output_tokens": 1024,
               "max_batch_size": 8},
    "sampling": {"max_tokens": 8, "temperature": 0.7, "top_p": 0.95, "top_k": 0},
    "cost_per_1k_input_tokens": 0.1, "cost_per_1k_output_tokens": 0.2,
}
SHADOW = dict(copy.deepcopy(MANIFEST), description="shadow")
PROD_ENGINE = served_model_name("demo", version_id(MANIFEST))
SHADOW_ENGINE = served_model_name("demo", version_id(SHADOW))
PRINCIPAL = Principal("acme", "k1", "user", TenantPlan())


def shadow_count(version: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("infermesh_gateway_shadow_generations_total",
                                     {"model": "demo", "version": version, "outcome": outcome}) or 0


class CountingAdmission:
    def __init__(self) -> None:
        self.acquired: list[str] = []

    async def acquire_slot(self, tenant, request_id, input_tokens, output_tokens):
        self.acquired.append(request_id)
        return Grant(slot_id=f"slot-{request_id}", max_tokens=output_tokens)

    async def release_slot(self, tenant, slot_id, input_used, output_used):
        return None


class RecordingRouting:
    def __init__(self) -> None:
        self.routed: list[tuple[str, str]] = []

    async def route(self, triton_model_name, version_id, request_id, hold_s, exclude, *,
                    prefix_hashes=(), prompt_tokens=0, kv_blocks=((), 0)):
        self.routed.append((triton_model_name, request_id))
        return Route("replica-0", triton_model_name, f"res-{request_id}")

    async def release_route(self, reservation_id, outcome=None, completion_tokens=0):
        return None


class NamedEngine:
    """Says which engine answered, so text from the wrong version would show."""

    def __init__(self) -> None:
        self.requests: list[EngineRequest] = []
        self.unfinished = 0  # streams closed before their final chunk (the request cancelled)

    async def generate(self, endpoint: str, request: EngineRequest):
        self.requests.append(request)
        finished = False
        try:
            for count in range(1, 4):
                yield EngineChunk(f"{endpoint}-{count} ", 2, count, count == 3)
            finished = True
        finally:
            self.unfinished += not finished


class ListAudit:
    def __init__(self) -> None:
        self.events = []

    def emit(self, event) -> None:
        self.events.append(event)


def build(routing: Routing, shadow_in_flight: int = 4, manifest: dict = MANIFEST):
    catalog = ModelCatalog()
    versions = {version_id(m): m for m in (manifest, SHADOW)}
    catalog.rebuild({
        **{f"demo/versions/{vid}": {"version_id": vid, "manifest": m}
           for vid, m in versions.items()},
        "demo/routing": routing.to_record(),
    })
    admission, router, engine, audit = (CountingAdmission(), RecordingRouting(), NamedEngine(),
                                        ListAudit())
    shadow = ShadowTraffic(router, engine, max_in_flight=shadow_in_flight, timeout_s=5.0)
    pipeline = GenerationPipeline(
        catalog, admission, router, engine, audit, Limits(), FairAdmission(AdmissionLimits()),
        shadow=shadow, tokenizers=whitespace_tokenizers(),
        source="gateway/test",
    )
    return pipeline, admission, router, engine, audit, shadow


async def run(pipeline: GenerationPipeline, model: str, request_id: str, user: str = "u"):
    events = []

    async def send(event) -> None:
        events.append(event)

    request = GenerationRequest(request_id=request_id, model=model, prompt="hello there",
                                sampling=SamplingRequest(max_tokens=3), user=user)
    finished = await pipeline.run(PRINCIPAL, request, send)
    return events, finished


async def test_shadow_copy_never_reaches_the_client_and_is_not_billed():
    production, shadow_id = version_id(MANIFEST), version_id(SHADOW)
    pipeline, admission, _router, engine, audit, shadow = build(
        Routing(revision=2, production=production, shadow=shadow_id, shadow_rate=1.0))
    before = shadow_count(shadow_id, "ok")
    events, finished = await run(pipeline, "demo", "r1")
    async with asyncio.timeout(5):
        while shadow_count(shadow_id, "ok") == before:
            await asyncio.sleep(0.01)
    text = "".join(e.text for e in events if isinstance(e, TokenText))
    assert text == f"{PROD_ENGINE}-1 {PROD_ENGINE}-2 {PROD_ENGINE}-3 "
    assert [e.model_version for e in events if isinstance(e, Accepted | Finished)] == \
        [production, production]
    assert finished.finish_reason == "length"
    # The shadow engine ran the same prompt, under its own request id, after the user's Final.
    assert [r.triton_model_name for r in engine.requests] == [PROD_ENGINE, SHADOW_ENGINE]
    assert engine.requests[1].request_id == "r1.shadow"
    assert engine.requests[1].prompt == engine.requests[0].prompt
    # Only the user's generation took quota and was audited.
    assert admission.acquired == ["r1"]
    assert [e.generation.model_version for e in audit.events] == [production]
    await shadow.close()


async def test_shadow_is_dropped_when_busy_and_skipped_for_pins_and_failures():
    production, shadow_id = version_id(MANIFEST), version_id(SHADOW)
    pipeline, _, _router, engine, _, shadow = build(
        Routing(revision=2, production=production, shadow=shadow_id, shadow_rate=1.0),
        shadow_in_flight=0)
    dropped = shadow_count(shadow_id, "dropped_busy")
    await run(pipeline, "demo", "r2")
    assert shadow_count(shadow_id, "dropped_busy") == dropped + 1
    await run(pipeline, f"demo@{production}", "r3")  # a pinned request is never copied
    await run(pipeline, "demo@production", "r4")
    assert shadow_count(shadow_id, "dropped_busy") == dropped + 1
    assert [r.triton_model_name for r in engine.requests] == [PROD_ENGINE] * 3
    await shadow.close()


async def test_canary_answers_its_callers_and_pins_are_honoured():
    production, canary = version_id(MANIFEST), version_id(SHADOW)
    pipeline, *_ , shadow = build(
        Routing(revision=2, production=production, canary=canary, canary_weight_percent=50))
    served = {}
    for user in ("ann", "bob", "cy", "dee", "eve", "fay", "gus", "hal"):
        _, finished = await run(pipeline, "demo", f"r-{user}", user)
        _, again = await run(pipeline, "demo", f"r-{user}-2", user)
        assert again.model_version == finished.model_version  # sticky
        served[user] = finished.model_version
    assert set(served.values()) == {production, canary}
    _, pinned = await run(pipeline, "demo@canary", "r-pin", "ann")
    assert pinned.model_version == canary
    _, unknown = await run(pipeline, "demo@previous", "r-prev")
    assert unknown.finish_reason == "error" and unknown.error.code == "NOT_FOUND"
    await shadow.close()


async def test_a_blocked_phrase_ends_the_generation_unsent():
    guarded = dict(copy.deepcopy(MANIFEST), safety={"blocked_phrases": ["-2"]})
    engine_name = served_model_name("demo", version_id(guarded))
    pipeline, _, _, engine, audit, shadow = build(
        Routing(revision=1, production=version_id(guarded)), manifest=guarded)
    events, finished = await run(pipeline, "demo", "r-safety")
    text = "".join(e.text for e in events if isinstance(e, TokenText))
    assert text == f"{engine_name}-1 {engine_name}"
    assert finished.finish_reason == "content_filter" and finished.error is None
    assert engine.unfinished == 1  # the engine request was cancelled, not read to its end
    assert audit.events[0].generation.finish_reason == "content_filter"
    await shadow.close()


async def test_n_choices_are_audited_under_the_clients_id_and_shadowed_once():
    production, shadow_id = version_id(MANIFEST), version_id(SHADOW)
    pipeline, _admission, _router, engine, audit, shadow = build(
        Routing(revision=2, production=production, shadow=shadow_id, shadow_rate=1.0))
    request = GenerationRequest(request_id="r1", model="demo", prompt="hello there",
                                sampling=SamplingRequest(max_tokens=3, n=2, seed=1))

    async def send(event) -> None:
        return None

    finished = await run_choices(lambda one, sink: pipeline.run(PRINCIPAL, one, sink), request,
                                 send, max_choices=4)
    assert finished.finish_reason == "length"
    async with asyncio.timeout(5):
        while len(engine.requests) < 3:
            await asyncio.sleep(0.01)
    await shadow.close()
    # Each choice is a generation of its own id; one shadow copy for the request.
    assert sorted(r.request_id for r in engine.requests) == ["r1-0", "r1-0.shadow", "r1-1"]
    records = sorted((e.request_id, e.generation.choice_index, e.generation.choice_count)
                     for e in audit.events)
    assert records == [("r1", 0, 2), ("r1", 1, 2)]
