"""A lost replica, end to end on real parts: two Triton servers (reference engine) with their
sidecars, a real scheduler process, and the gateway's pipeline with its real scheduler client and
Triton adapter. Right after replica-0 is killed the scheduler still routes to it (its last load
report is fresh); the generation fails before its first token, is retried on replica-1 and
completes, the failed attempt is released as such; soon after, replica-0 is not routed at all."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from backends.triton.adapter import TritonAdapter
from deploy.local.etcd_server import EtcdServer
from deploy.local.replicas import ReplicaSet, reference_repository
from deploy.local.stack import service_process, wait_serving
from services.common import etcd
from services.common.discovery import ServiceDirectory
from services.common.net import free_port
from services.common.processes import ChildProcess
from services.common.tenancy import TenantPlan
from services.gateway.admission import AdmissionLimits, FairAdmission
from services.gateway.peers import Grant, SchedulerClient
from services.gateway.pipeline import GenerationPipeline, TokenText
from services.gateway.requests import GenerationRequest, Principal, SamplingRequest
from services.gateway.shadow import ShadowTraffic
from services.gateway.validation import Limits
from services.registry.catalog import ModelCatalog
from services.registry.manifest import served_model_name, version_id
from services.registry.rollout import Routing
from services.scheduler.outcome import Outcome
from tests.fakes import whitespace_tokenizers

pytestmark = pytest.mark.integration
PREFIX = "retry-test"
MANIFEST = {
    "name": "retry-demo", "description": "retry", "tokenizer": "whitespace",
    "engine": {"kind": "reference", "context_window": 4096, "max_output_tokens": 64,
               "max_batch_size": 8},
    "sampling": {"max_tokens": 4, "temperature": 0.7, "top_p": 0.95, "top_k": 0},
    "cost_per_1k_input_tokens": 0.1, "cost_per_1k_output_tokens": 0.2,
}
MODEL = served_model_name(MANIFEST["name"], version_id(MANIFEST))  # the version's own engine


class Admission:
    """Admission is not under test: every request gets its slot."""

    async def acquire_slot(self, tenant, request_id, input_tokens, output_tokens):
        return Grant(slot_id=request_id, max_tokens=output_tokens)

    async def release_slot(self, tenant, slot_id, input_used, output_used):
        return None


class NoAudit:
    def emit(self, event) -> None:
        return None


class ObservedScheduler(SchedulerClient):
    """The real client, remembering which replicas it was routed to and how each went."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.routed: list[str] = []
        self.released: dict[str, Outcome] = {}
        self.replica_of: dict[str, str] = {}

    async def route(self, *args, **kwargs):
        route = await super().route(*args, **kwargs)
        self.routed.append(route.replica_id)
        self.replica_of[route.reservation_id] = route.replica_id
        return route

    async def release_route(self, reservation_id, outcome=Outcome.UNREPORTED,
                            completion_tokens=0):
        self.released[self.replica_of[reservation_id]] = outcome
        await super().release_route(reservation_id, outcome, completion_tokens)


@pytest.fixture(scope="module")
def replicas(etcd_server: EtcdServer, tmp_path_factory) -> Iterator[ReplicaSet]:
    root = tmp_path_factory.mktemp("retry-replicas")
    repository = reference_repository(root / "models", [MODEL], {"decode_step_ms": "5"})
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
        "scheduler-retry", "services.scheduler",
        tmp_path_factory.mktemp("retry-scheduler") / "scheduler.log", port,
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
        catalog.rebuild({f"retry-demo/versions/{vid}": {"version_id": vid, "manifest": MANIFEST},
                         "retry-demo/routing": Routing(revision=1, production=vid).to_record()})
        pipeline = GenerationPipeline(
            catalog, Admission(), routing, adapter, NoAudit(), Limits(),
            FairAdmission(AdmissionLimits()),
            shadow=ShadowTraffic(routing, adapter, max_in_flight=1, timeout_s=5.0),
            tokenizers=whitespace_tokenizers(),
            source="gateway/retry-test",
        )
        try:
            yield pipeline, routing
        finally:
            await pipeline.drain_background()
            await routing.close()
            await adapter.close()
            await directory.close()


async def generate(pipeline: GenerationPipeline, request_id: str):
    events = []

    async def send(event) -> None:
        events.append(event)

    request = GenerationRequest(request_id=request_id, model="retry-demo",
                                prompt="Tell me about routing. " * 8,
                                sampling=SamplingRequest(max_tokens=4))
    finished = await pipeline.run(Principal("acme", "k1", "user", TenantPlan()), request, send)
    await pipeline.drain_background()
    return "".join(e.text for e in events if isinstance(e, TokenText)), finished


async def test_a_killed_replica_is_retried_elsewhere_then_dropped(replicas, gateway_parts):
    pipeline, routing = gateway_parts
    dead, alive = f"{PREFIX}-0", f"{PREFIX}-1"
    # Both idle: least_loaded ties go to the lowest id, the replica about to die.
    await asyncio.to_thread(replicas.kill, dead)
    text, finished = await generate(pipeline, "after-kill")
    assert finished.finish_reason == "length" and text, finished
    assert routing.routed == [dead, alive]
    assert routing.released == {dead: Outcome.FAILED_BEFORE_FIRST_TOKEN, alive: Outcome.OK}

    # Its load report stopped with it: within 2 s (+ slack on a busy machine) routes avoid it.
    deadline = time.monotonic() + 3.0
    while True:
        routing.routed.clear()
        _, finished = await generate(pipeline, f"later-{time.monotonic()}")
        if routing.routed == [alive]:
            break
        assert time.monotonic() < deadline, f"still routed to {routing.routed}"
        await asyncio.sleep(0.1)
    assert finished.finish_reason == "length"
