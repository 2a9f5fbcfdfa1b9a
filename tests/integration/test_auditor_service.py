"""The auditor as a real process: append over gRPC, verify, etcd registration, clean SIGTERM,
and a record edited on disk caught both offline (`chain.verify`) and by a restarted auditor."""

from __future__ import annotations

import asyncio
import os
import pathlib
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.local.etcd_server import EtcdServer
from infermesh.v1 import auditor_pb2, auditor_pb2_grpc
from services.auditor import chain
from services.common import etcd, status
from services.common.net import LOOPBACK, free_port
from services.common.processes import ChildProcess

pytestmark = pytest.mark.integration

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
AUDITOR_SERVICE = auditor_pb2.DESCRIPTOR.services_by_name["Auditor"].full_name
RPC_TIMEOUT_S = 10.0


class Auditor:
    """One `python -m services.auditor` child on free loopback ports."""

    def __init__(self, etcd_endpoint: str, data_dir: pathlib.Path, log_path: pathlib.Path):
        self.instance_id = f"test-auditor-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.metrics_port = free_port()
        env = dict(
            os.environ,
            INFERMESH_ETCD_ENDPOINT=etcd_endpoint,
            INFERMESH_PORT=str(self.port),
            INFERMESH_METRICS_PORT=str(self.metrics_port),
            INFERMESH_INSTANCE_ID=self.instance_id,
            INFERMESH_SHUTDOWN_GRACE_S="5",
            INFERMESH_AUDITOR_DATA_DIR=str(data_dir),
            INFERMESH_AUDITOR_BATCH_MAX_EVENTS="8",  # so one call spans several fsyncs
        )
        self.process = ChildProcess(
            "auditor", [sys.executable, "-m", "services.auditor"], log_path, env=env, cwd=REPO_ROOT
        )
        self.key = etcd.Keys.service("auditor", self.instance_id)

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    async def start(self, timeout_s: float = 30.0) -> None:
        """Starts the child and returns once gRPC health says the Auditor service is SERVING."""
        self.process.start()
        deadline = time.monotonic() + timeout_s
        async with grpc.aio.insecure_channel(self.endpoint) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if not self.process.alive():
                    pytest.fail(f"auditor exited during start:\n{self.process.log_tail()}")
                try:
                    reply = await health.Check(
                        health_pb2.HealthCheckRequest(service=AUDITOR_SERVICE), timeout=1.0
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    self.process.stop()
                    pytest.fail(f"auditor not SERVING in {timeout_s}s:\n{self.process.log_tail()}")
                await asyncio.sleep(0.1)

    async def stop(self) -> int | None:
        """SIGTERM (then SIGKILL after a grace), off the event loop; returns the exit code."""
        return await asyncio.to_thread(self.process.stop, 15.0)


def audit_event(n: int, **overrides: object) -> auditor_pb2.AuditEvent:
    fields: dict[str, object] = {
        "event_id": f"ev-{n:04d}",
        "request_id": f"req-{n}",
        "source": "gateway-test",
        "generation": auditor_pb2.GenerationRecord(
            tenant="acme", model="llama", prompt_tokens=n, completion_tokens=2 * n,
            finish_reason="stop", ttft_ms=12.5,
        ),
    }
    fields.update(overrides)
    event = auditor_pb2.AuditEvent(**fields)  # type: ignore[arg-type]
    event.time.GetCurrentTime()
    return event


async def stream(numbers: Iterator[int] | range) -> AsyncIterator[auditor_pb2.AuditEvent]:
    """Events trickling in, as a gateway's spooler would send them."""
    for n in numbers:
        yield audit_event(n)
        await asyncio.sleep(0)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=5) as response:
        return response.read().decode()


async def test_auditor_service_end_to_end(etcd_server: EtcdServer, tmp_path: pathlib.Path) -> None:
    data_dir = tmp_path / "data"
    log_path = data_dir / chain.LOG_FILE_NAME
    client = etcd.connect(etcd_server.endpoint, 2.0)
    auditor = Auditor(etcd_server.endpoint, data_dir, tmp_path / "auditor-1.log")
    try:
        await auditor.start()
        async with grpc.aio.insecure_channel(auditor.endpoint) as channel:
            stub = auditor_pb2_grpc.AuditorStub(channel)

            reply = await stub.Append(stream(range(1, 21)), timeout=RPC_TIMEOUT_S)
            assert (reply.appended, reply.last_sequence) == (20, 20)

            # Two writers at once: the chain stays in order and every event lands once.
            first, second = await asyncio.gather(
                stub.Append(stream(range(21, 31)), timeout=RPC_TIMEOUT_S),
                stub.Append(stream(range(31, 41)), timeout=RPC_TIMEOUT_S),
            )
            assert first.appended + second.appended == 20
            assert max(first.last_sequence, second.last_sequence) == 40

            # A client retrying a call whose ack it lost: acknowledged, stored once.
            reply = await stub.Append(stream(range(1, 6)), timeout=RPC_TIMEOUT_S)
            assert (reply.appended, reply.last_sequence) == (0, 40)

            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Append(
                    iter([audit_event(100), audit_event(101, event_id="")]), timeout=RPC_TIMEOUT_S
                )
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert status.from_rpc_error(raised.value).field == "event_id"

            verified = await stub.Verify(auditor_pb2.VerifyRequest(), timeout=RPC_TIMEOUT_S)
            assert (verified.ok, verified.records, verified.first_bad_sequence) == (True, 40, -1)

        registration = await client.get(auditor.key.encode())
        assert registration is not None, "the auditor did not register in etcd"
        assert etcd.decode(registration.value)["endpoint"] == auditor.endpoint

        metrics = await asyncio.to_thread(scrape, auditor.metrics_port)
        assert "infermesh_auditor_events_appended_total 40.0" in metrics
        assert "infermesh_auditor_events_duplicate_total 5.0" in metrics
        assert "infermesh_auditor_fsync_batch_events_count" in metrics
    finally:
        exit_code = await auditor.stop()
    assert exit_code == 0, auditor.process.log_tail()
    assert await client.get(auditor.key.encode()) is None, "registration outlived the process"

    # After the run the chain verifies offline, as `meshctl audit verify` does it.
    result = chain.verify(log_path)
    assert (result.ok, result.records) == (True, 40), chain.format_result(result)

    # Someone edits record 17 on disk: offline verification names it …
    content = log_path.read_bytes().splitlines(keepends=True)
    assert b'"prompt_tokens":17' in content[16]
    content[16] = content[16].replace(b'"prompt_tokens":17', b'"prompt_tokens":1')
    log_path.write_bytes(b"".join(content))
    result = chain.verify(log_path)
    assert (result.ok, result.first_bad_sequence) == (False, 17), chain.format_result(result)

    # … and so does a restarted auditor, which keeps appending after the intact head.
    restarted = Auditor(etcd_server.endpoint, data_dir, tmp_path / "auditor-2.log")
    try:
        await restarted.start()
        async with grpc.aio.insecure_channel(restarted.endpoint) as channel:
            stub = auditor_pb2_grpc.AuditorStub(channel)
            reply = await stub.Append(stream(range(41, 43)), timeout=RPC_TIMEOUT_S)
            assert (reply.appended, reply.last_sequence) == (2, 42)
            verified = await stub.Verify(auditor_pb2.VerifyRequest(), timeout=RPC_TIMEOUT_S)
            assert (verified.ok, verified.records, verified.first_bad_sequence) == (False, 16, 17)
            assert "does not match its hash" in verified.problem
    finally:
        exit_code = await restarted.stop()
        await client.close()
    assert exit_code == 0, restarted.process.log_tail()
