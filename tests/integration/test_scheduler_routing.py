"""The scheduler as a real process over real etcd: replica records and load reports written the
way sidecars write them; a replica whose keys vanish or whose load report goes stale stops being
routed to within 2 s; failures reported on Release open its breaker; with two instances, each
Release reaches the instance that routed."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
import uuid
from dataclasses import dataclass

import grpc
import pytest
from prometheus_client import REGISTRY

from deploy.local.stack import service_process, wait_serving
from infermesh.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.common import errors, etcd, status
from services.common.discovery import ServiceDirectory
from services.common.net import free_port
from services.common.prefix import MAX_BLOCKS, prompt_block_hashes
from services.common.processes import ChildProcess
from services.gateway.peers import SchedulerClient
from services.scheduler.client import RouteStream, SchedulerGone
from services.scheduler.outcome import Outcome

pytestmark = pytest.mark.integration
STALE_AFTER_S = 1.5
ROUTED_AWAY_WITHIN_S = 2.0
SLACK_S = 1.0  # a loaded 2-core machine delays the watch and our writes a little


def scheduler_process(etcd_endpoint: str, port: int, log_path) -> ChildProcess:
    return service_process(
        f"scheduler-{uuid.uuid4().hex[:6]}", "services.scheduler", log_path, port,
        {"INFERMESH_ETCD_ENDPOINT": etcd_endpoint, "INFERMESH_ROUTING_POLICY": "least_loaded",
         "INFERMESH_LOAD_STALE_AFTER_S": str(STALE_AFTER_S),
         "INFERMESH_BREAKER_CONSECUTIVE_FAILURES": "2", "INFERMESH_BREAKER_COOLDOWN_S": "60"})


class FakeSidecars:
    """Writes replica records and load reports for a unique model, as sidecars do (a lease
    each), and keeps chosen replicas' reports fresh in the background."""

    def __init__(self, client, model: str):
        self.client = client
        self.model = model
        self.leases: dict[str, object] = {}
        self.reporting: set[str] = set()
        self.vanished: set[str] = set()
        self._task: asyncio.Task | None = None

    async def add(self, rid: str, zone: str = "z") -> None:
        lease = self.leases[rid] = await self.client.lease(10)
        await self.client.put(etcd.Keys.replica(rid).encode(), etcd.encode({
            "schema": 1, "replica_id": rid, "grpc_endpoint": f"127.0.0.1:{free_port()}",
            "zone": zone, "models": [self.model], "healthy": True, "draining": False,
            "kv": {self.model: {"max_blocks": 64, "tokens_per_block": 16}},
        }), lease=lease)
        self.reporting.add(rid)
        await self.report(rid)

    async def report(self, rid: str) -> None:
        await self.client.put(etcd.Keys.load(rid).encode(), etcd.encode({
            "schema": 1, "replica_id": rid, "at": time.time(),
            "models": {self.model: {"kv_max_blocks": 64, "kv_free_blocks": 64, "active": 0,
                                    "waiting": 0, "max": 8}},
        }), lease=self.leases[rid])

    async def vanish(self, rid: str) -> None:
        self.reporting.discard(rid)
        self.vanished.add(rid)
        await self.leases[rid].revoke()

    def start(self) -> None:
        async def keep_reporting() -> None:
            while True:
                for rid in list(self.reporting):
                    if rid in self.reporting:  # not vanished while we wrote the others
                        await self.report(rid)
                await asyncio.sleep(0.25)
        self._task = asyncio.create_task(keep_reporting())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for rid, lease in self.leases.items():
            if rid not in self.vanished:
                await lease.revoke()


async def route(stub, model: str, **fields) -> scheduler_pb2.RouteResponse:
    return await stub.Route(scheduler_pb2.RouteRequest(
        triton_model_name=model, hold=status.seconds_to_duration(30), **fields), timeout=2)


async def routed_set(stub, model: str, n: int = 6) -> set[str]:
    """The replicas `n` concurrent routes go to (their reservations spread them), then released."""
    replies = [await route(stub, model) for _ in range(n)]
    for reply in replies:
        await stub.Release(scheduler_pb2.ReleaseRouteRequest(
            reservation_id=reply.reservation_id, outcome=scheduler_pb2.ROUTE_OUTCOME_OK),
            timeout=2)
    return {reply.replica_id for reply in replies}


async def wait_routed_only(stub, model: str, expected: set[str], within_s: float) -> float:
    """Seconds until every route goes to `expected`; fails past `within_s`."""
    started = time.monotonic()
    while True:
        chosen = await routed_set(stub, model)
        elapsed = time.monotonic() - started
        if chosen == expected:
            return elapsed
        assert elapsed < within_s, f"still routed to {chosen} after {elapsed:.2f} s"
        await asyncio.sleep(0.05)


@pytest.fixture
async def scheduler(etcd_server, tmp_path):
    port = free_port()
    process = scheduler_process(etcd_server.endpoint, port, tmp_path / "scheduler.log")
    process.start()
    try:
        await asyncio.to_thread(wait_serving, process, f"127.0.0.1:{port}",
                                time.monotonic() + 20)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield scheduler_pb2_grpc.SchedulerStub(channel)
    finally:
        assert process.stop() == 0, process.log_tail()


@pytest.fixture
async def sidecars(etcd_server):
    async with etcd.connect(etcd_server.endpoint, 5.0) as client:
        fakes = FakeSidecars(client, f"routing-it-{uuid.uuid4().hex[:8]}")
        try:
            yield fakes
        finally:
            await fakes.close()


async def test_vanished_or_silent_replicas_stop_receiving_routes(scheduler, sidecars):
    model = sidecars.model
    a, b, c = (f"{model}-{x}" for x in "abc")
    for rid in (a, b, c):
        await sidecars.add(rid)
    sidecars.start()
    await wait_routed_only(scheduler, model, {a, b, c}, within_s=5)  # the watch caught up

    await sidecars.vanish(c)  # its lease revoked: record and report gone
    await wait_routed_only(scheduler, model, {a, b}, within_s=ROUTED_AWAY_WITHIN_S + SLACK_S)

    sidecars.reporting.discard(b)  # alive in etcd, but its load reports stop
    silent_since = time.monotonic()
    await wait_routed_only(scheduler, model, {a},
                           within_s=ROUTED_AWAY_WITHIN_S + SLACK_S
                           - (time.monotonic() - silent_since))
    listing = await scheduler.ListReplicas(scheduler_pb2.ListReplicasRequest(), timeout=2)
    mine = {r.replica_id: r for r in listing.replicas if r.replica_id.startswith(model)}
    assert set(mine) == {a, b}
    assert mine[a].load_fresh and not mine[b].load_fresh and mine[b].load_reported
    assert mine[a].loads[0].kv_max_blocks == 64 and mine[a].loads[0].max == 8

    sidecars.reporting.add(b)  # reports again: back in rotation
    await wait_routed_only(scheduler, model, {a, b}, within_s=5)


async def test_failures_released_open_the_replicas_breaker(scheduler, sidecars):
    model = sidecars.model
    a, b = f"{model}-a", f"{model}-b"
    for rid in (a, b):
        await sidecars.add(rid)
    sidecars.start()
    await wait_routed_only(scheduler, model, {a, b}, within_s=5)
    for _ in range(2):
        reply = await route(scheduler, model, exclude_replicas=[b])
        assert reply.replica_id == a
        released = await scheduler.Release(scheduler_pb2.ReleaseRouteRequest(
            reservation_id=reply.reservation_id,
            outcome=scheduler_pb2.ROUTE_OUTCOME_FAILED_BEFORE_FIRST_TOKEN), timeout=2)
        assert released.released
    assert await routed_set(scheduler, model) == {b}
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await route(scheduler, model, exclude_replicas=[b])
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "circuit breaker" in refused.value.details()
    listing = await scheduler.ListReplicas(scheduler_pb2.ListReplicasRequest(), timeout=2)
    states = {r.replica_id: r.breaker for r in listing.replicas if r.replica_id in (a, b)}
    assert states == {a: scheduler_pb2.BREAKER_STATE_OPEN, b: scheduler_pb2.BREAKER_STATE_CLOSED}


async def test_route_fields_are_validated(scheduler):
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await route(scheduler, "m", prefix_hashes=list(range(300)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prefix_hashes" in refused.value.details()


async def test_each_release_reaches_the_scheduler_instance_that_routed(etcd_server, sidecars,
                                                                        tmp_path):
    """Two scheduler instances: the gateway's client sends a prompt to the instance its first
    block hashes to, and its Release to the same instance, so no reservation is left held."""
    model = sidecars.model
    for rid in (f"{model}-a", f"{model}-b"):
        await sidecars.add(rid)
    sidecars.start()
    ports = [free_port(), free_port()]
    processes = [scheduler_process(etcd_server.endpoint, port, tmp_path / f"scheduler-{port}.log")
                 for port in ports]
    for process in processes:
        process.start()
    try:
        for process, port in zip(processes, ports, strict=True):
            await asyncio.to_thread(wait_serving, process, f"127.0.0.1:{port}",
                                    time.monotonic() + 20)
        async with etcd.connect(etcd_server.endpoint, 5.0) as client:
            directory = ServiceDirectory(client, None)
            await directory.start()
            try:
                wanted = {f"127.0.0.1:{port}" for port in ports}
                async with asyncio.timeout(10):
                    while not wanted <= set(directory.endpoints("scheduler")):
                        await asyncio.sleep(0.05)
                scheduler = SchedulerClient(directory, 2.0)
                routes = []
                for n in range(24):  # both instances get some (all on one: 2 in 2^24)
                    prompt = f"conversation {n}: " + "a shared system prompt. " * 10
                    routes.append(await scheduler.route(
                        model, "", f"r{n}", 30.0, [],
                        prefix_hashes=prompt_block_hashes(prompt), prompt_tokens=10))
                held = await in_flight(ports, model)
                assert sum(held) == 24 and all(held)
                for route_ in routes:
                    await scheduler.release_route(route_.reservation_id, Outcome.OK, 5)
                await scheduler.close()  # writes the releases queued, waits for the streams' end
                assert await in_flight(ports, model) == [0, 0]
                # One instance dies; its registration outlives it for the lease TTL. Routes
                # whose prefixes it owned go to the next instance in rendezvous order.
                failovers = REGISTRY.get_sample_value(
                    "infermesh_gateway_scheduler_failovers_total") or 0.0
                os.kill(processes[0].pid, signal.SIGKILL)
                assert f"127.0.0.1:{ports[0]}" in directory.endpoints("scheduler")
                for n in range(24):
                    prompt = f"conversation {n}: " + "a shared system prompt. " * 10
                    route_ = await scheduler.route(
                        model, "", f"after-{n}", 30.0, [],
                        prefix_hashes=prompt_block_hashes(prompt), prompt_tokens=10)
                    await scheduler.release_route(route_.reservation_id, Outcome.OK, 5)
                assert (REGISTRY.get_sample_value("infermesh_gateway_scheduler_failovers_total")
                        or 0.0) > failovers
                # Its registration gone, the stream to it is closed at the next route.
                gone = f"127.0.0.1:{ports[0]}"
                for kv in await client.get_prefix(f"{etcd.Keys.services}scheduler/".encode()):
                    if etcd.decode(kv.value)["endpoint"] == gone:
                        await client.delete(kv.key)
                async with asyncio.timeout(5):
                    while gone in directory.endpoints("scheduler"):
                        await asyncio.sleep(0.05)
                route_ = await scheduler.route(model, "", "after-leaving", 30.0, [],
                                               prefix_hashes=[1], prompt_tokens=10)
                await scheduler.release_route(route_.reservation_id, Outcome.OK, 5)
                assert set(scheduler._streams) == {f"127.0.0.1:{ports[1]}"}
                await scheduler.close()
                assert await in_flight(ports[1:], model) == [0]
            finally:
                await directory.close()
    finally:
        processes[0].stop()  # killed above (or, if the test failed first, stopped here)
        assert processes[1].stop() == 0, processes[1].log_tail()


async def wait_in_flight(ports: list[int], model: str, expected: list[int],
                         within_s: float = 2.0) -> None:
    async with asyncio.timeout(within_s):
        while await in_flight(ports, model) != expected:
            await asyncio.sleep(0.02)


async def in_flight(ports: list[int], model: str) -> list[int]:
    """Reservations each scheduler instance holds on this test's replicas."""
    counts = []
    for port in ports:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            listing = await scheduler_pb2_grpc.SchedulerStub(channel).ListReplicas(
                scheduler_pb2.ListReplicasRequest(), timeout=2)
        counts.append(sum(r.in_flight for r in listing.replicas if r.replica_id.startswith(model)))
    return counts


@dataclass
class StreamedScheduler:
    """One real scheduler routing a model of two replicas, and a channel to it."""

    model: str
    port: int
    process: ChildProcess
    channel: grpc.aio.Channel


@pytest.fixture
async def streamed(etcd_server, sidecars, tmp_path):
    model = sidecars.model
    for rid in (f"{model}-a", f"{model}-b"):
        await sidecars.add(rid)
    sidecars.start()
    port = free_port()
    process = scheduler_process(etcd_server.endpoint, port, tmp_path / "scheduler.log")
    process.start()
    try:
        await asyncio.to_thread(wait_serving, process, f"127.0.0.1:{port}", time.monotonic() + 20)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield StreamedScheduler(model, port, process, channel)
    finally:
        process.stop()


async def test_route_stream_carries_routes_refusals_and_late_releases(streamed):
    """A gateway's RouteStream to a real scheduler: a burst of concurrent routes is answered
    (each its own result), a refusal is the scheduler's verdict (not "gone"), a route given up
    on is released when its result comes, and a killed scheduler fails what is waiting as gone."""
    model, port, channel = streamed.model, streamed.port, streamed.channel
    stream = RouteStream(channel, write_timeout_s=2.0)
    request = scheduler_pb2.RouteRequest(triton_model_name=model,
                                         hold=status.seconds_to_duration(30))
    replies = await asyncio.gather(*(stream.route(request, 5.0) for _ in range(200)))
    assert len({r.reservation_id for r in replies}) == 200
    assert await in_flight([port], model) == [200]
    for reply in replies:
        stream.release(scheduler_pb2.ReleaseRouteRequest(
            reservation_id=reply.reservation_id, outcome=scheduler_pb2.ROUTE_OUTCOME_OK))
    await wait_in_flight([port], model, [0])
    with pytest.raises(errors.Unavailable) as refused:
        await stream.route(scheduler_pb2.RouteRequest(
            triton_model_name="no-such-model", hold=status.seconds_to_duration(30)), 5.0)
    assert not isinstance(refused.value, SchedulerGone)
    assert "serves the model" in refused.value.message
    with pytest.raises(errors.InvalidArgument) as invalid:
        await stream.route(scheduler_pb2.RouteRequest(
            triton_model_name=model, hold=status.seconds_to_duration(30),
            prefix_hashes=range(300)), 5.0)
    assert invalid.value.field == "prefix_hashes"
    given_up = [asyncio.ensure_future(stream.route(request, 5.0)) for _ in range(20)]
    await asyncio.sleep(0)  # queued, then abandoned before any result
    for route_ in given_up:
        route_.cancel()
    # Answered after those 20 (one stream, in order): they were reserved by then, and
    # are released as their results come, leaving this one.
    await stream.route(request, 5.0)
    await wait_in_flight([port], model, [1])
    await stream.close(timeout_s=2.0)
    # Streams past their age take no new routes: each retired one still answers the
    # routes it carries and takes their releases.
    aging = RouteStream(channel, write_timeout_s=2.0, max_age_s=0.0)
    replies = [await aging.route(request, 5.0) for _ in range(10)]
    replies += await asyncio.gather(*(aging.route(request, 5.0) for _ in range(40)))
    for reply in replies:
        aging.release(scheduler_pb2.ReleaseRouteRequest(
            reservation_id=reply.reservation_id, outcome=scheduler_pb2.ROUTE_OUTCOME_OK))
    await wait_in_flight([port], model, [1])  # the one routed above, before these
    os.kill(streamed.process.pid, signal.SIGKILL)
    with pytest.raises(SchedulerGone):
        await aging.route(request, 5.0)
    await aging.close(timeout_s=2.0)


async def test_a_burst_of_long_prompts_is_cut_into_messages_and_close_writes_releases(streamed):
    """2,000 routes of 256 prefix blocks each (~5 MB serialized, over gRPC's 4 MiB receive
    limit in one message) queued at once are all answered on one stream; their releases, queued
    just before `close`, reach the scheduler before close returns."""
    model, port, channel = streamed.model, streamed.port, streamed.channel
    stream = RouteStream(channel, write_timeout_s=5.0)
    requests = [scheduler_pb2.RouteRequest(
        triton_model_name=model, hold=status.seconds_to_duration(30),
        prefix_hashes=[random.getrandbits(64) for _ in range(MAX_BLOCKS)])
        for _ in range(2000)]
    assert sum(r.ByteSize() for r in requests) > 4 * 1024 * 1024
    replies = await asyncio.gather(*(stream.route(r, 20.0) for r in requests))
    assert len({r.reservation_id for r in replies}) == 2000
    assert await in_flight([port], model) == [2000]
    for reply in replies:
        stream.release(scheduler_pb2.ReleaseRouteRequest(
            reservation_id=reply.reservation_id, outcome=scheduler_pb2.ROUTE_OUTCOME_OK))
    await stream.close(timeout_s=10.0)
    assert await in_flight([port], model) == [0]
    with pytest.raises(SchedulerGone):  # closed: it takes no more routes
        await stream.route(requests[0], 5.0)
    assert streamed.process.stop() == 0, streamed.process.log_tail()
