"""A real auditor process for the integration tests, and the events they append."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import time
import uuid

import pytest

from deploy.local.stack import service_process, wait_serving
from infermesh.v1 import auditor_pb2
from services.common import etcd
from services.common.net import LOOPBACK, free_port


class Auditor:
    """One `python -m services.auditor` child on free loopback ports."""

    def __init__(self, etcd_endpoint: str, data_dir: pathlib.Path, log_path: pathlib.Path,
                 **env: str):
        self.instance_id = f"test-auditor-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.metrics_port = free_port()
        variables = {
            "INFERMESH_ETCD_ENDPOINT": etcd_endpoint,
            "INFERMESH_METRICS_PORT": str(self.metrics_port),
            "INFERMESH_SHUTDOWN_GRACE_S": "5",
            "INFERMESH_AUDITOR_DATA_DIR": str(data_dir),
            "INFERMESH_AUDITOR_CHECKPOINT_INTERVAL_S": "0.2",
            "INFERMESH_AUDITOR_SEGMENT_MAX_BYTES": "65536",  # several segments in every test
            **env,
        }
        self.process = service_process(self.instance_id, "services.auditor", log_path,
                                       self.port, variables)
        self.key = etcd.Keys.service("auditor", self.instance_id)

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    async def start(self, timeout_s: float = 30.0) -> None:
        """Starts the child and returns once gRPC health says SERVING (stopped if it never does)."""
        self.process.start()
        try:
            await asyncio.to_thread(wait_serving, self.process, self.endpoint,
                                    time.monotonic() + timeout_s)
        except (RuntimeError, TimeoutError) as exc:
            self.process.stop()
            pytest.fail(str(exc))

    async def stop(self) -> int | None:
        """SIGTERM (then SIGKILL after a grace), off the event loop; returns the exit code."""
        return await asyncio.to_thread(self.process.stop, 15.0)

    async def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        os.kill(self.process.pid, signal.SIGKILL)
        await asyncio.to_thread(self.process.process.wait, 10)


def audit_event(n: int, tenant: str = "acme", **overrides: object) -> auditor_pb2.AuditEvent:
    fields: dict[str, object] = {
        "event_id": f"ev-{n:06d}",
        "request_id": f"req-{n}",
        "source": "gateway-test",
        "generation": auditor_pb2.GenerationRecord(
            tenant=tenant, model="llama", prompt_tokens=n, completion_tokens=2 * n,
            finish_reason="stop", ttft_ms=12.5,
        ),
    }
    fields.update(overrides)
    event = auditor_pb2.AuditEvent(**fields)  # type: ignore[arg-type]
    event.time.GetCurrentTime()
    return event
