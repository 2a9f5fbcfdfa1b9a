"""Ships the registry's admin audit events from their etcd outbox to the auditor.

Each registry change writes its audit event into `registry/audit-outbox/` in the same etcd
transaction as the change itself, so a committed change always has its event, even when the
auditor is down or this process dies a moment later. This shipper follows the outbox with a
watch, sends what is there over the auditor's `Append` and deletes each event once the auditor
acknowledged it (after fsync). Event ids are deterministic (model + revision), so an event sent
twice — by a retry, or by two registry instances — is stored once (the auditor deduplicates).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aetcd
import grpc
from google.protobuf import timestamp_pb2
from prometheus_client import Counter, Gauge

from infermesh.v1 import auditor_pb2
from services.auditor import client as auditor_client
from services.common import errors, etcd
from services.common.discovery import ServiceDirectory
from services.common.logs import get_logger

log = get_logger(__name__)
SHIPPED = Counter("infermesh_registry_audit_shipped_total",
                  "Admin audit events the auditor acknowledged.")
SHIP_FAILURES = Counter("infermesh_registry_audit_ship_failures_total",
                        "Failed attempts to ship admin audit events (retried).")
PENDING = Gauge("infermesh_registry_audit_pending",
                "Admin audit events in the etcd outbox, not yet acknowledged.")


def _parse(_suffix: str, raw: bytes) -> dict[str, Any]:
    return etcd.decode(raw)


def to_event(record: dict[str, Any]) -> auditor_pb2.AuditEvent:
    at = timestamp_pb2.Timestamp()
    at.FromNanoseconds(int(record["time"] * 1e9))
    return auditor_pb2.AuditEvent(
        event_id=record["event_id"], time=at, source=record["source"],
        admin=auditor_pb2.AdminRecord(
            actor=record["actor"], action=record["action"], target=record["target"],
            before_json=record["before_json"], after_json=record["after_json"],
            reason=record["reason"],
        ),
    )


class AdminAuditShipper:
    def __init__(
        self, client: aetcd.Client, directory: ServiceDirectory, timeout_s: float,
        retry_s: float = 0.5, batch_size: int = 256,
    ):
        self._client = client
        self._directory = directory
        self._timeout_s = timeout_s
        self._retry_s = retry_s
        self._batch_size = batch_size
        self._wake = asyncio.Event()
        self._outbox: etcd.WatchCache[dict[str, Any]] = etcd.WatchCache(
            client, etcd.Keys.registry_audit_outbox, _parse, on_change=self._wake.set
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._outbox.start()
        self._task = asyncio.create_task(self._ship_forever(), name="admin audit shipper")

    async def close(self) -> None:
        """Stops at once: what is pending is durable in the outbox and ships after a restart
        (or from another registry instance)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._outbox.stop()

    async def _ship_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._retry_s * 4):
                    await self._wake.wait()
            self._wake.clear()
            pending = sorted(self._outbox.items.items(), key=lambda kv: kv[1]["time"])
            PENDING.set(len(pending))
            for start in range(0, len(pending), self._batch_size):
                batch = pending[start:start + self._batch_size]
                if not await self._ship(batch):
                    await asyncio.sleep(self._retry_s)
                    self._wake.set()
                    break

    async def _ship(self, batch: list[tuple[str, dict[str, Any]]]) -> bool:
        """True when the auditor acknowledged the batch and the outbox no longer holds it."""
        try:
            await auditor_client.append(self._directory.channel("auditor"),
                                        [to_event(record) for _, record in batch],
                                        self._timeout_s)
        except (grpc.aio.AioRpcError, errors.Unavailable) as exc:
            SHIP_FAILURES.inc()
            log.warning("admin_audit_ship_failed", events=len(batch), error=repr(exc))
            return False
        SHIPPED.inc(len(batch))
        try:
            for suffix, _ in batch:
                await self._client.delete(etcd.Keys.registry_audit_event(suffix).encode())
        except Exception as exc:  # etcd away: shipped again later, stored once by the auditor
            log.warning("admin_audit_outbox_delete_failed", error=repr(exc))
            return False
        return True
