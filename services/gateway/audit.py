"""Audit events from the gateway: queued in memory and shipped to the auditor in batches.

Emitting never blocks or fails a generation. When the queue is full the event is dropped and
counted (`infermesh_gateway_audit_dropped_total`); a batch the auditor did not acknowledge is
sent again. A durable on-disk spool is the auditor issue's next step (docs/decisions.md).
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
from prometheus_client import Counter

from infermesh.v1 import auditor_pb2, auditor_pb2_grpc
from services.common import errors
from services.common.discovery import ServiceDirectory
from services.common.logs import get_logger

log = get_logger(__name__)
DROPPED = Counter("infermesh_gateway_audit_dropped_total", "Audit events dropped: queue full.")
REFUSED = Counter("infermesh_gateway_audit_refused_total", "Audit events the auditor refused.")
SHIPPED = Counter("infermesh_gateway_audit_shipped_total", "Audit events acknowledged.")


class AuditEmitter:
    def __init__(
        self, directory: ServiceDirectory, timeout_s: float, capacity: int = 10_000,
        batch_size: int = 256, retry_s: float = 0.5,
    ):
        self._directory = directory
        self._timeout_s = timeout_s
        self._queue: asyncio.Queue[auditor_pb2.AuditEvent] = asyncio.Queue(capacity)
        self._batch_size = batch_size
        self._retry_s = retry_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._ship(), name="audit shipper")

    def emit(self, event: auditor_pb2.AuditEvent) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            DROPPED.inc()

    async def close(self, flush_timeout_s: float = 5.0) -> None:
        """Ships what is queued (up to `flush_timeout_s`), then stops."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(flush_timeout_s):
                while not self._queue.empty():
                    await asyncio.sleep(0.05)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _ship(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            while True:
                try:
                    stub = auditor_pb2_grpc.AuditorStub(self._directory.channel("auditor"))
                    await stub.Append(iter(batch), timeout=self._timeout_s)
                    SHIPPED.inc(len(batch))
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                        # Sending it again cannot succeed; keep the shipper moving.
                        log.error("audit_batch_refused", events=len(batch), error=exc.details())
                        REFUSED.inc(len(batch))
                        break
                    log.warning("audit_ship_failed", events=len(batch), error=repr(exc))
                    await asyncio.sleep(self._retry_s)
                except errors.Unavailable as exc:  # no auditor registered right now
                    log.warning("audit_ship_failed", events=len(batch), error=exc.message)
                    await asyncio.sleep(self._retry_s)
