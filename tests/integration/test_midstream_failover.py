"""Mid-stream failover on real parts (issue 22): two Triton replicas (reference engine) with their
sidecars, a real scheduler process, and the gateway's pipeline with its real scheduler client and
Triton adapter. Sixteen streams of 200 tokens, half greedy and half seeded at temperature 0.8;
one replica is SIGKILLed (Triton and sidecar, a lost node) once a stream on it has ~50 tokens.
Every stream completes with the text it has without a failure (the engine's own `complete`),
usage counts each token once, and the audit records of the moved ones say from, to and at which
token. The reference engine, not the torch engine: 16 × 200 tokens of the real model take
minutes on 2 cores (the torch engine's continuation is covered by its unit tests)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from backends.triton.adapter import TritonAdapter
from backends.triton.reference_engine import GenerationRequest as EngineGeneration
from backends.triton.reference_engine import complete, count_tokens
from deploy.local.etcd_server import EtcdServer
from deploy.local.replicas import ReplicaSet, reference_repository
from deploy.local.stack import service_process, wait_serving
from services.common import etcd
from services.common.discovery import ServiceDirectory
from services.common.net import free_port
from services.common.processes import ChildProcess
from services.common.tenancy import TenantPlan
from services.gateway.admission import AdmissionLimits, FairAdmission
from services.gateway.failover import FailoverSettings
from services.gateway.peers import Grant, SchedulerClient
from services.gateway.pipeline import GenerationPipeline, TokenText
from services.gateway.requests import GenerationRequest, Principal, SamplingRequest
from services.gateway.shadow import ShadowTraffic
from services.gateway.validation import Limits
from services.registry.catalog import ModelCatalog
from services.registry.manifest import served_model_name, version_id
from services.registry.rollout import Routing
from tests.fakes import whitespace_tokenizers

pytestmark = pytest.mark.integration
PREFIX = "failover-test"
TOKENS = 200
CUT_AT = 50
MANIFEST = {
    "name": "failover-demo", "description": "failover", "tokenizer": "whitespace",
    "engine": {"kind": "reference", "context_window": 4096, "max_output_tokens": 512,
               "max_batch_size": 32},
    "sampling": {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0, "top_k": 0},
    "cost_per_1k_input_tokens": 0.1, "cost_per_1k_output_tokens": 0.2,
}
MODEL = served_model_name(MANIFEST["name"], version_id(MANIFEST))


class Admission:
    """Records what each generation is charged (its released slot)."""

    def __init__(self) -> None:
        self.charged: dict[str, tuple[int, int]] = {}

    async def acquire_slot(self, tenant, request_id, input_tokens, output_tokens):
        return Grant(slot_id=request_id, max_tokens=output_tokens)

    async def release_slot(self, tenant, slot_id, input_used, output_used):
        assert slot_id not in self.charged, f"{slot_id} released twice"
        self.charged[slot_id] = (input_used, output_used)


class Audit:
    def __init__(self) -> None:
        self.events = []

    def emit(self, event) -> None:
        self.events.append(event)


class ObservedScheduler(SchedulerClient):
    """The real client, remembering the replica each generation was first routed to."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.first_replica: dict[str, str] = {}

    async def route(self, triton_model_name, version_id, request_id, *args, **kwargs):
        route = await super().route(triton_model_name, version_id, request_id, *args, **kwargs)
        self.first_replica.setdefault(request_id, route.replica_id)
        return route


@pytest.fixture(scope="module")
def replicas(etcd_server: EtcdServer, tmp_path_factory) -> Iterator[ReplicaSet]:
    root = tmp_path_factory.mktemp("failover-replicas")
    # 200 tokens take ~3 s: the kill at ~50 comes well inside every stream.
    repository = reference_repository(root / "models", [MODEL], {"decode_step_ms": "12"})
    replica_set = ReplicaSet(root, etcd_server.endpoint, 2, repository, models=[MODEL],
                             zones=("zone-a",), id_prefix=PREFIX)
    replica_set.start()
    try:
        yield replica_set
    finally:
        replica_set.stop()


@pytest.fixture(scope="module")
def scheduler(etcd_server: EtcdServer, tmp_path_factory) -> Iterator[ChildProcess]:
    port = free_port()
    process = service_process(
        "scheduler-failover", "services.scheduler",
        tmp_path_factory.mktemp("failover-scheduler") / "scheduler.log", port,
        {"INFERMESH_ETCD_ENDPOINT": etcd_server.endpoint,
         "INFERMESH_ROUTING_POLICY": "least_loaded"})
    process.start()
    try:
        wait_serving(process, f"127.0.0.1:{port}", time.monotonic() + 30)
        yield process
    finally:
        assert process.stop() == 0, process.log_tail()


@pytest.fixture
async def gateway_parts(etcd_server, replicas, scheduler) -> AsyncIterator[tuple]:
    async with etcd.connect(etcd_server.endpoint, 5.0) as client:
        await replicas.wait_registered(client, models=[MODEL])
        directory = ServiceDirectory(client, None)
        await directory.start()
        adapter = TritonAdapter(None)
        routing = ObservedScheduler(directory, 2.0, zone="zone-a")
        catalog = ModelCatalog()
        vid = version_id(MANIFEST)
        catalog.rebuild({f"failover-demo/versions/{vid}": {"version_id": vid,
                                                           "manifest": MANIFEST},
                         "failover-demo/routing": Routing(revision=1, production=vid).to_record()})
        admission, audit = Admission(), Audit()
        pipeline = GenerationPipeline(
            catalog, admission, routing, adapter, audit, Limits(),
            FairAdmission(AdmissionLimits()),
            shadow=ShadowTraffic(routing, adapter, max_in_flight=1, timeout_s=5.0),
            tokenizers=whitespace_tokenizers(), source="gateway/failover-test",
            failover=FailoverSettings(max_moves=2, stall_s=5.0),
        )
        try:
            yield pipeline, routing, admission, audit
        finally:
            await pipeline.drain_background()
            await routing.close()
            await adapter.close()
            await directory.close()


def _request(n: int) -> GenerationRequest:
    seeded = n % 2 == 1
    return GenerationRequest(
        request_id=f"stream-{n}", model="failover-demo",
        prompt=f"Stream {n}: tell me a long story about the harbour and the hills.",
        sampling=SamplingRequest(max_tokens=TOKENS, min_tokens=TOKENS,
                                 temperature=0.8 if seeded else 0.0,
                                 seed=1000 + n if seeded else None))


def _uncut_text(request: GenerationRequest) -> str:
    """What the engine sends without a failure: the reference engine's seed is 0 unless set."""
    return complete(EngineGeneration(0, request.prompt or "", TOKENS, request.sampling.seed or 0,
                                     min_tokens=TOKENS)).text


async def test_streams_cut_mid_way_by_a_killed_replica_complete_uncut_elsewhere(
        replicas, gateway_parts):
    pipeline, routing, admission, audit = gateway_parts
    requests = [_request(n) for n in range(16)]
    texts: dict[str, list[str]] = {r.request_id: [] for r in requests}
    arrivals: dict[str, list[float]] = {r.request_id: [] for r in requests}

    def sender(request_id: str):
        async def send(event) -> None:
            if isinstance(event, TokenText):
                texts[request_id].append(event.text)
                arrivals[request_id].append(time.monotonic())
        return send

    principal = Principal("acme", "k1", "user", TenantPlan())
    async with asyncio.timeout(60):
        runs = [asyncio.create_task(pipeline.run(principal, r, sender(r.request_id)))
                for r in requests]
        while "stream-0" not in routing.first_replica or len(texts["stream-0"]) < CUT_AT:
            await asyncio.sleep(0.005)
        victim = routing.first_replica["stream-0"]
        killed_at = time.monotonic()
        await asyncio.to_thread(replicas.kill, victim)
        finished = await asyncio.gather(*runs)
        await pipeline.drain_background()

    moved = {r.request_id for r in requests if routing.first_replica[r.request_id] == victim}
    assert "stream-0" in moved
    for request, final in zip(requests, finished, strict=True):
        rid = request.request_id
        assert final.finish_reason == "length" and final.error is None, (rid, final)
        assert "".join(texts[rid]) == _uncut_text(request), rid
        assert final.completion_tokens == TOKENS
        assert final.prompt_tokens == count_tokens(request.prompt or "")
        assert admission.charged[rid] == (final.prompt_tokens, TOKENS)
        assert final.moves == (1 if rid in moved else 0) and final.continuation_exact
    records = {e.request_id: e.generation for e in audit.events}
    alive = next(r.replica_id for r in replicas.replicas if r.replica_id != victim)
    for rid in moved:
        [move] = records[rid].moves
        assert (move.from_replica, move.to_replica) == (victim, alive)
        assert 0 < move.at_token < TOKENS
        assert records[rid].replica_id == alive and records[rid].completion_tokens == TOKENS
    assert not any(records[r.request_id].moves for r in requests if r.request_id not in moved)
    # The pause each moved stream saw: its last text before the kill to its first after.
    pauses = [min(t for t in arrivals[rid] if t > killed_at)
              - max(t for t in arrivals[rid] if t <= killed_at) for rid in moved]
    assert max(pauses) < 5.0, pauses
