"""What one routing decision costs: in process (the scheduler's `Router.route` over 100 replicas
with fresh load reports, a shared-prefix workload and reservations in flight), as a unary `Route`
+ `Release` round trip to a real scheduler process over loopback gRPC, and as the same over one
`RouteStream` (what gateways use: many decisions per message).

    python -m bench.route_decision [--replicas 100] [--samples 5000]

The in-process figure is the issue's `route_decision_us_p99_100_replicas`; the benchmark calls
`decision_time_us()`. The stream's round trip is what a gateway pays per request, its rate with many
callers what one scheduler process sustains (docs/decisions.md, "Routing on a stream").
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import pathlib
import random
import tempfile
import time
from collections.abc import Awaitable, Callable

import grpc

from bench.gateway_throughput import process_cpu_s
from bench.streaming import percentile
from deploy.local.etcd_server import EtcdServer
from deploy.local.stack import service_process, wait_serving
from infermesh.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.common import etcd, status
from services.common.net import free_port
from services.common.prefix import prompt_block_hashes
from services.common.records import ReplicaRecord
from services.scheduler.candidates import RouteQuery
from services.scheduler.client import RouteStream
from services.scheduler.inventory import LoadReport, ModelLoad, ReplicaInfo
from services.scheduler.outcome import Outcome
from services.scheduler.routing import Policy, Router, RoutingConfig

MODEL = "bench-model"
IN_FLIGHT = 200  # reservations held while measuring (released oldest first)


def _percentiles(samples_s: list[float]) -> dict[str, float]:
    """p50/p90/p99 of `samples_s`, in microseconds."""
    return {f"p{q}": round(percentile(samples_s, q) * 1e6, 1) for q in (50, 90, 99)}


def workload(samples: int, seed: int = 7) -> list[list[int]]:
    """Prompt hash chains: 20 shared system prompts (~2 KB) each with a unique user turn, plus
    one request in four wholly unique."""
    rng = random.Random(seed)
    systems = [f"System prompt {k}: you are assistant number {k}, be precise. " * 36
               for k in range(20)]
    prompts = []
    for n in range(samples):
        user = f"user question {n} about topic {rng.randint(0, 10**6)} " * 8
        prompt = user * 3 if rng.random() < 0.25 else rng.choice(systems) + user
        prompts.append(prompt_block_hashes(prompt))
    return prompts


def fleet(replicas: int, now: float, seed: int = 11) -> tuple[list[ReplicaInfo], dict]:
    rng = random.Random(seed)
    infos = [ReplicaInfo(f"replica-{i:03d}", f"127.0.0.1:{20000 + i}", zone=f"zone-{i % 3}",
                         models=frozenset({MODEL}), healthy=True) for i in range(replicas)]
    loads = {r.replica_id: LoadReport(r.replica_id, now, {MODEL: ModelLoad(
        kv_max_blocks=4096, kv_free_blocks=rng.randint(0, 4096), active=rng.randint(0, 16),
        waiting=rng.randint(0, 8), max=16)}) for r in infos}
    return infos, loads


def decision_time_us(replicas: int = 100, samples: int = 5000,
                     policy: Policy = Policy.KV_AWARE) -> dict[str, dict[str, float]]:
    """p50/p90/p99 microseconds of `Router.route` over `replicas` replicas: `cpu` (the thread's
    CPU time: what a decision costs on a core of its own) and `wall` (includes the time the OS
    gave the core to other processes, which dominates p99 on a busy shared machine)."""
    router = Router(RoutingConfig(policy=policy))
    infos, loads = fleet(replicas, 0.0)
    chains = workload(samples)
    gc.collect()
    gc.freeze()  # as the scheduler does once its caches are loaded (services/scheduler/server.py)
    held: list[str] = []
    wall, cpu = [], []
    now = 0.0
    for n, chain in enumerate(chains):
        now += 0.0005
        if n % 500 == 0:  # a fresh round of load reports every 250 ms
            infos, loads = fleet(replicas, now, seed=n)
        query = RouteQuery(MODEL, 60.0, prompt_tokens=500, prefix_hashes=chain, zone="zone-1")
        started, started_cpu = time.perf_counter(), time.thread_time()
        reservation = router.route(query, infos, loads, now)
        cpu.append(time.thread_time() - started_cpu)
        wall.append(time.perf_counter() - started)
        held.append(reservation.reservation_id)
        if len(held) > IN_FLIGHT:
            router.release(held.pop(0), Outcome.OK, now, infos)
    return {"cpu": _percentiles(cpu), "wall": _percentiles(wall)}


async def _write_fleet(endpoint: str, replicas: int) -> None:
    infos, _loads = fleet(replicas, time.time())
    async with etcd.connect(endpoint, 5.0) as client:
        for info in infos:
            record = ReplicaRecord(info.replica_id, info.grpc_endpoint, zone=info.zone,
                                   models=frozenset({MODEL}), ready=True, healthy=True)
            await client.put(etcd.Keys.replica(info.replica_id).encode(),
                             etcd.encode(record.encode()))


async def _measured(route_once: Callable[[list[int]], Awaitable[float]], pid: int,
                    chains: list[list[int]], warm: list[list[int]],
                    concurrency: int) -> dict[str, float]:
    """`concurrency` callers route every chain once with `route_once` (which returns the route's
    own seconds), after one caller has routed `warm`: latency percentiles, routes/s, and the CPU
    per route of the scheduler (`pid`) and of this process (what routing costs a gateway)."""
    timings: list[float] = []
    queue = list(warm)

    async def caller() -> None:
        while queue:
            timings.append(await route_once(queue.pop()))

    await caller()  # warm the channel or stream
    timings.clear()
    queue = list(chains)
    started, cpu, own_cpu = time.perf_counter(), process_cpu_s(pid), time.process_time()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed, cpu = time.perf_counter() - started, process_cpu_s(pid) - cpu
    own_cpu = time.process_time() - own_cpu
    figures = _percentiles(timings)
    figures["routes_per_s"] = round(len(chains) / elapsed, 1)
    figures["scheduler_cpu_us_per_route"] = round(cpu * 1e6 / len(chains), 1)
    figures["caller_cpu_us_per_route"] = round(own_cpu * 1e6 / len(chains), 1)  # a gateway's
    return figures


def _route_request(chain: list[int]) -> scheduler_pb2.RouteRequest:
    return scheduler_pb2.RouteRequest(
        triton_model_name=MODEL, hold=status.seconds_to_duration(60), prefix_hashes=chain,
        prompt_tokens=500, zone="zone-1")


def _release_request(reply: scheduler_pb2.RouteResponse) -> scheduler_pb2.ReleaseRouteRequest:
    return scheduler_pb2.ReleaseRouteRequest(
        reservation_id=reply.reservation_id, outcome=scheduler_pb2.ROUTE_OUTCOME_OK,
        completion_tokens=50)


async def _round_trips(port: int, pid: int, chains: list[list[int]],
                       concurrency: int) -> dict[str, float]:
    """Unary `Route` then `Release` per request."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)

        async def route_once(chain: list[int]) -> float:
            started = time.perf_counter()
            reply = await stub.Route(_route_request(chain), timeout=5)
            routed_s = time.perf_counter() - started
            await stub.Release(_release_request(reply), timeout=5)
            return routed_s

        return await _measured(route_once, pid, chains, chains, concurrency)


async def _stream_round_trips(port: int, pid: int, chains: list[list[int]],
                              concurrency: int) -> dict[str, float]:
    """As `_round_trips`, over one `RouteStream` (the gateway's client): Release queued after
    each route, as a gateway does."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream = RouteStream(channel, write_timeout_s=5.0)

        async def route_once(chain: list[int]) -> float:
            started = time.perf_counter()
            reply = await stream.route(_route_request(chain), 5.0)
            routed_s = time.perf_counter() - started
            stream.release(_release_request(reply))
            return routed_s

        figures = await _measured(route_once, pid, chains,
                                  chains[: max(1, len(chains) // 10)], concurrency)
        await stream.close(timeout_s=5.0)
    return figures


def rpc_round_trip_us(replicas: int = 100, samples: int = 2000,
                      concurrency: tuple[int, ...] = (1, 16), stream_samples: int = 20000,
                      stream_concurrency: tuple[int, ...] = (1, 16, 64),
                      ) -> dict[str, dict[str, float]]:
    """Route latency over loopback gRPC to a real scheduler process (Release after each, as a
    gateway does), sequential and with concurrent callers: unary `Route` + `Release`, then the
    same over one `RouteStream`; with the scheduler process's CPU time per route (from the
    kernel: what one core of it sustains, whatever else the machine runs) and the caller's (what
    routing costs a gateway; the workload's hashing is done before)."""
    chains = workload(samples)
    stream_chains = workload(stream_samples, seed=8)
    with tempfile.TemporaryDirectory(prefix="infermesh-route-bench-") as tmp:
        root = pathlib.Path(tmp)
        server = EtcdServer(root / "etcd", root / "etcd.log")
        server.start()
        port = free_port()
        scheduler = service_process(
            "scheduler-bench", "services.scheduler", root / "scheduler.log", port,
            {"INFERMESH_TLS_MODE": "plaintext-development",
             "INFERMESH_ETCD_ENDPOINT": server.endpoint, "INFERMESH_LOG_LEVEL": "warning"})
        try:
            asyncio.run(_write_fleet(server.endpoint, replicas))
            scheduler.start()
            wait_serving(scheduler, f"127.0.0.1:{port}", time.monotonic() + 30)
            figures = {f"concurrency_{c}": asyncio.run(_round_trips(port, scheduler.pid, chains, c))
                       for c in concurrency}
            figures.update(
                (f"stream_concurrency_{c}",
                 asyncio.run(_stream_round_trips(  # one at a time: as many as the unary run
                     port, scheduler.pid, stream_chains if c > 1 else stream_chains[:samples],
                     c)))
                for c in stream_concurrency)
            return figures
        finally:
            scheduler.stop()
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--replicas", type=int, default=100)
    parser.add_argument("--samples", type=int, default=5000)
    args = parser.parse_args()
    figures = {
        "in_process_us": {p.value: decision_time_us(args.replicas, args.samples, p)
                          for p in Policy},
        "route_rpc_us": rpc_round_trip_us(args.replicas, min(args.samples, 2000)),
    }
    kv_aware = figures["in_process_us"][Policy.KV_AWARE.value]
    figures["route_decision_us_p99_100_replicas"] = kv_aware["cpu"]["p99"]
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
