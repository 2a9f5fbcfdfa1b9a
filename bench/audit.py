"""Durable appends to the auditor: events/s and acknowledgement latency at 1, 8 and 64 writers.

Each writer keeps one `Append` stream open with one batch of `BATCH_EVENTS` events in flight: it
sends a batch and waits for its acknowledgement, which the auditor sends only after the batch is
fsynced (group commit merges the batches of all writers into one fsync). The latency of an
acknowledgement is timed from handing the batch to gRPC to reading its ack. The load runs
against the embedded stack's own auditor (its default settings, its data directory on this
machine's disk) from a separate client process, once the streaming benchmarks are done. Only
mesh services may append, so the client presents the stack's mesh token the way they do (the
interceptors of `services/common/discovery.py`).

`python -m bench.audit` runs it alone: its own etcd and auditor (default settings, a fresh mesh
token) in a temporary directory, and prints the same figures as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import secrets
import tempfile
import time
import uuid
from dataclasses import dataclass

import grpc

from bench.pools import client_pool
from bench.streaming import percentile
from deploy.local.etcd_server import EtcdServer
from deploy.local.stack import service_process, wait_serving
from infermesh.v1 import auditor_pb2, auditor_pb2_grpc
from services.common import tls
from services.common.discovery import mesh_token_interceptors
from services.common.net import LOOPBACK, free_port

BATCH_EVENTS = 64
LEVELS = (1, 8, 64)
GENERATION = auditor_pb2.GenerationRecord(
    tenant="bench", key_id="0123456789ab", model="demo-chat", model_version="sha256:" + "ab" * 32,
    prompt_tokens=128, completion_tokens=64, finish_reason="stop", queue_ms=1.5, ttft_ms=12.25,
    total_ms=640.0, client_address="ipv4:127.0.0.1:50000", replica_id="replica-0",
)


async def _writer(stub: auditor_pb2_grpc.AuditorStub, name: str, until: float,
                  latencies: list[float]) -> int:
    call = stub.Append(timeout=until - time.perf_counter() + 30)
    appended = 0
    for index in range(10**9):
        if time.perf_counter() >= until:
            break
        events = [auditor_pb2.AuditEvent(event_id=f"{name}-{index}-{n}",
                                         request_id=f"{name}-{index}-{n}", source="gateway/bench",
                                         generation=GENERATION)
                  for n in range(BATCH_EVENTS)]
        started = time.perf_counter()
        await call.write(auditor_pb2.AppendRequest(events=events))
        ack = await call.read()
        latencies.append(time.perf_counter() - started)
        appended += ack.appended
    await call.done_writing()
    if await call.read() != grpc.aio.EOF or await call.code() != grpc.StatusCode.OK:
        raise RuntimeError(f"the Append stream ended badly: {await call.details()}")
    return appended


async def _level(endpoint: str, writer: Writer, writers: int, duration_s: float
                 ) -> tuple[int, float, list[float]]:
    latencies: list[float] = []
    run = uuid.uuid4().hex[:8]
    interceptors = mesh_token_interceptors(writer.mesh_token) if writer.mesh_token else None
    async with tls.channel(endpoint, "auditor", writer.mesh_tls,
                           interceptors=interceptors) as channel:
        stub = auditor_pb2_grpc.AuditorStub(channel)
        started = time.perf_counter()
        counts = await asyncio.gather(*(
            _writer(stub, f"bench-{run}-c{writers}-w{n}", started + duration_s, latencies)
            for n in range(writers)))
        elapsed = time.perf_counter() - started
    return sum(counts), elapsed, latencies


@dataclass(frozen=True)
class Writer:
    """How the bench proves it may append, as a gateway does: the gateway's certificate, or in
    plaintext development the mesh token ("" for an auditor without one)."""

    mesh_tls: tls.MeshTls | None
    mesh_token: str = ""


def client_process(endpoint: str, writer: Writer, writers: int, duration_s: float
                   ) -> tuple[int, float, list[float]]:
    """Runs in a pool process, so the client's CPU is not the auditor's event loop."""
    return asyncio.run(_level(endpoint, writer, writers, duration_s))


def run(endpoint: str, writer: Writer, levels: tuple[int, ...] = LEVELS,
        duration_s: float = 5.0, warmup_s: float = 0.5) -> dict[str, float]:
    figures: dict[str, float] = {}
    with client_pool(1) as pool:
        # Warm up: connect, first fsyncs.
        pool.submit(client_process, endpoint, writer, 1, warmup_s).result()
        for writers in levels:
            events, elapsed, latencies = pool.submit(
                client_process, endpoint, writer, writers, duration_s).result()
            rate = events / elapsed
            figures[f"audit_durable_events_per_s_c{writers}"] = round(rate)
            figures[f"audit_ack_p50_ms_c{writers}"] = round(percentile(latencies, 50) * 1000, 2)
            figures[f"audit_ack_p99_ms_c{writers}"] = round(percentile(latencies, 99) * 1000, 2)
            print(f"audit  writers={writers:3d}  {rate:9.0f} durable events/s  ack p50 "
                  f"{figures[f'audit_ack_p50_ms_c{writers}']:7.2f} ms  p99 "
                  f"{figures[f'audit_ack_p99_ms_c{writers}']:7.2f} ms  "
                  f"({BATCH_EVENTS} events per batch)", flush=True)
    figures["audit_durable_events_per_s"] = max(
        figures[f"audit_durable_events_per_s_c{writers}"] for writers in levels)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration-s", type=float, default=5.0, help="Per level.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="infermesh-bench-audit-") as state:
        root = pathlib.Path(state)
        etcd_server = EtcdServer(root / "etcd", root / "etcd.log")
        etcd_server.start()
        port = free_port()
        mesh_token = secrets.token_urlsafe(32)
        auditor = service_process(
            "auditor", "services.auditor", root / "auditor.log", port,
            {"INFERMESH_ETCD_ENDPOINT": etcd_server.endpoint,
             "INFERMESH_AUDITOR_DATA_DIR": str(root / "auditor"),
             "INFERMESH_MESH_TOKEN": mesh_token,
             "INFERMESH_TLS_MODE": "plaintext-development"})
        try:
            auditor.start()
            wait_serving(auditor, f"{LOOPBACK}:{port}", time.monotonic() + 60)
            figures = run(f"{LOOPBACK}:{port}", Writer(None, mesh_token),
                          duration_s=args.duration_s)
        finally:
            auditor.stop()
            etcd_server.stop()
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
