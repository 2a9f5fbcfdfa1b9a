"""Ships the registry's admin audit events from their etcd outbox to the auditor.

Each registry change writes its audit event into `registry/audit-outbox/` in the same etcd
transaction as the change itself, so a committed change always has its event, even when the
auditor is down or this process dies a moment later. This shipper follows the outbox with a
watch, sends what is there over the auditor's `Append` and deletes each event once the auditor
acknowledged it (after fsync). Event ids are deterministic (model + revision), so an event sent
twice — by a retry, or by two registry instances — is stored once (the auditor deduplicates).

Events are bounded (`events.bound_event`: long `before_json`, `reason`, … are cut, and say so)
and batches cut by bytes, so a batch always fits one `Append` message. An event that still
cannot be stored — the auditor refuses it as invalid, or its outbox record is malformed — is
moved to `registry/audit-dead-letter/` in one etcd transaction and counted, never retried for
ever in front of the events behind it.
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
from services.auditor.events import bound_event
from services.common import errors, etcd
from services.common.discovery import ServiceDirectory
from services.common.logs import get_logger

log = get_logger(__name__)
SHIPPED = Counter("infermesh_registry_audit_shipped_total",
                  "Admin audit events the auditor acknowledged.")
SHIP_FAILURES = Counter("infermesh_registry_audit_ship_failures_total",
                        "Failed attempts to ship admin audit events (retried).")
DEAD_LETTERED = Counter(
    "infermesh_registry_audit_dead_lettered_total",
    "Admin audit events moved to registry/audit-dead-letter/ instead of shipped, by reason: "
    "refused (the auditor called the event invalid), malformed (an unreadable outbox record).",
    ["reason"])
PENDING = Gauge("infermesh_registry_audit_pending",
                "Admin audit events in the etcd outbox, not yet acknowledged.")


DEAD_LETTER_PREFIX = etcd.ROOT + "registry/audit-dead-letter/"
BATCH_BYTES = 1 << 20  # well under gRPC's 4 MiB message limit


def _parse(_suffix: str, raw: bytes) -> dict[str, Any]:
    return etcd.decode(raw)


def to_event(record: dict[str, Any]) -> auditor_pb2.AuditEvent:
    """The event of an outbox record, bounded; KeyError/TypeError/ValueError when malformed."""
    at = timestamp_pb2.Timestamp()
    at.FromNanoseconds(int(record["time"] * 1e9))
    return bound_event(auditor_pb2.AuditEvent(
        event_id=record["event_id"], time=at, source=record["source"],
        admin=auditor_pb2.AdminRecord(
            actor=record["actor"], action=record["action"], target=record["target"],
            before_json=record["before_json"], after_json=record["after_json"],
            reason=record["reason"],
        ),
    ))


def cut_batches(
    events: list[tuple[str, auditor_pb2.AuditEvent]], max_events: int, max_bytes: int,
) -> list[list[tuple[str, auditor_pb2.AuditEvent]]]:
    """Consecutive batches of at most `max_events` events and `max_bytes` bytes (an event
    larger than `max_bytes` alone, which bounded events never are)."""
    batches: list[list[tuple[str, auditor_pb2.AuditEvent]]] = []
    size = 0
    for item in events:
        event_bytes = item[1].ByteSize()
        if not batches or len(batches[-1]) >= max_events or size + event_bytes > max_bytes:
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += event_bytes
    return batches


class AdminAuditShipper:
    def __init__(
        self, client: aetcd.Client, directory: ServiceDirectory, timeout_s: float,
        retry_s: float = 0.5, batch_size: int = 256, batch_bytes: int = BATCH_BYTES,
    ):
        self._client = client
        self._directory = directory
        self._timeout_s = timeout_s
        self._retry_s = retry_s
        self._batch_size = batch_size
        self._batch_bytes = batch_bytes
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
            pending = sorted(self._outbox.items.items(), key=lambda kv: kv[1].get("time", 0))
            PENDING.set(len(pending))
            events: list[tuple[str, auditor_pb2.AuditEvent]] = []
            for suffix, record in pending:
                try:
                    events.append((suffix, to_event(record)))
                except (KeyError, TypeError, ValueError) as exc:
                    log.error("admin_audit_record_malformed", key=suffix, error=repr(exc))
                    await self._dead_letter(suffix, record, "malformed")
            for batch in cut_batches(events, self._batch_size, self._batch_bytes):
                if not await self._ship(batch):
                    await asyncio.sleep(self._retry_s)
                    self._wake.set()
                    break

    async def _ship(self, batch: list[tuple[str, auditor_pb2.AuditEvent]]) -> bool:
        """True when the auditor acknowledged the batch (or set aside what it refused) and the
        outbox no longer holds it."""
        try:
            await auditor_client.append(self._directory.channel("auditor"),
                                        [event for _, event in batch], self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                return self._failed(batch, exc)
            return await self._ship_one_by_one(batch)
        except errors.Unavailable as exc:
            return self._failed(batch, exc)
        SHIPPED.inc(len(batch))
        return await self._delete([suffix for suffix, _ in batch])

    async def _ship_one_by_one(self, batch: list[tuple[str, auditor_pb2.AuditEvent]]) -> bool:
        """After a refused batch: each event alone; the ones refused go to the dead letters."""
        for suffix, event in batch:
            try:
                await auditor_client.append(self._directory.channel("auditor"), [event],
                                            self._timeout_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    return self._failed([(suffix, event)], exc)
                log.error("admin_audit_event_refused", event_id=event.event_id,
                          error=exc.details())
                if not await self._dead_letter(suffix, self._outbox.items.get(suffix, {}),
                                               "refused"):
                    return False
                continue
            except errors.Unavailable as exc:
                return self._failed([(suffix, event)], exc)
            SHIPPED.inc()
            if not await self._delete([suffix]):
                return False
        return True

    @staticmethod
    def _failed(batch: list[Any], exc: Exception) -> bool:
        SHIP_FAILURES.inc()
        log.warning("admin_audit_ship_failed", events=len(batch), error=repr(exc))
        return False

    async def _delete(self, suffixes: list[str]) -> bool:
        try:
            async with asyncio.timeout(self._timeout_s):
                for suffix in suffixes:
                    await self._client.delete(etcd.Keys.registry_audit_event(suffix).encode())
        except Exception as exc:  # etcd away: shipped again later, stored once by the auditor
            log.warning("admin_audit_outbox_delete_failed", error=repr(exc))
            return False
        return True

    async def _dead_letter(self, suffix: str, record: dict[str, Any], reason: str) -> bool:
        """Moves one outbox record to the dead letters (one transaction); False if etcd failed."""
        tx = self._client.transactions
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._client.transaction(
                    compare=[],
                    success=[tx.put((DEAD_LETTER_PREFIX + suffix).encode(),
                                    etcd.encode({"reason": reason, "record": record})),
                             tx.delete(etcd.Keys.registry_audit_event(suffix).encode())],
                    failure=[])
        except Exception as exc:  # etcd away: tried again on the next pass
            log.warning("admin_audit_dead_letter_failed", key=suffix, error=repr(exc))
            return False
        DEAD_LETTERED.labels(reason).inc()
        return True
