"""The Auditor gRPC servicer: turns streamed events into durable batches, and verifies the chain.

All file I/O (writes, fsync, verification) runs in worker threads through `asyncio.to_thread`;
the event loop only decodes, validates and waits. One `asyncio.Lock` admits one batch at a
time, which keeps the chain in order and the threads from queueing up behind the file lock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import json_format
from prometheus_client import Counter, Gauge, Histogram

from infermesh.v1 import auditor_pb2, auditor_pb2_grpc
from services.auditor import chain
from services.auditor.settings import AuditorSettings
from services.common import errors, status
from services.common.logs import get_logger
from services.common.runtime import ServiceContext, ServiceParts

log = get_logger(__name__)

EVENTS_APPENDED = Counter(
    "infermesh_auditor_events_appended_total", "Audit events written to the log and fsynced."
)
EVENTS_DUPLICATE = Counter(
    "infermesh_auditor_events_duplicate_total",
    "Audit events dropped because their event_id was recently stored (client retries).",
)
BATCH_EVENTS = Histogram(
    "infermesh_auditor_fsync_batch_events", "Records written per fsync (group commit size).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
COMMIT_SECONDS = Histogram(
    "infermesh_auditor_fsync_seconds", "Time to write one batch and fsync it, lock wait excluded.",
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
LAST_SEQUENCE = Gauge("infermesh_auditor_last_sequence", "Sequence number of the durable head.")


def event_to_dict(event: auditor_pb2.AuditEvent) -> dict[str, Any]:
    """The JSON stored in a record: proto field names, default values left out (proto3 JSON)."""
    return json_format.MessageToDict(event, preserving_proto_field_name=True)


class AuditorServicer(auditor_pb2_grpc.AuditorServicer):
    def __init__(self, audit_log: chain.AuditLog, settings: AuditorSettings):
        self._log = audit_log
        self._settings = settings
        self._write_lock = asyncio.Lock()
        LAST_SEQUENCE.set(audit_log.head.sequence)

    async def Append(
        self,
        request_iterator: AsyncIterator[auditor_pb2.AuditEvent],
        context: grpc.aio.ServicerContext,
    ) -> auditor_pb2.AppendResponse:
        """Writes batches as they fill and acknowledges after the last one is fsynced.

        On an error the call fails, but batches written before it stay in the log; a client
        that retries the whole call is deduplicated by event_id.
        """
        try:
            appended, last_sequence = await self._append(request_iterator)
        except errors.MeshError as exc:
            await status.abort(context, exc)
            raise  # not reached: abort raises
        return auditor_pb2.AppendResponse(appended=appended, last_sequence=last_sequence)

    async def Verify(
        self, request: auditor_pb2.VerifyRequest, context: grpc.aio.ServicerContext
    ) -> auditor_pb2.VerifyResponse:
        """Re-walks the file up to the durable head, and checks the file still ends there."""
        head = self._log.head
        try:
            result = await asyncio.to_thread(chain.verify, self._log.path, limit_bytes=head.size)
        except OSError as exc:
            await status.abort(context, errors.Internal(f"cannot read the audit log: {exc}"))
            raise  # not reached: abort raises
        if result.ok and (result.records, result.last_hash) != (head.sequence, head.hash):
            # The chain is intact but shorter (or different) than what this process wrote and
            # acknowledged: the tail was cut off or replaced on disk.
            result = chain.VerifyResult(
                ok=False,
                records=result.records,
                first_bad_sequence=result.records + 1,
                problem=(
                    f"the file ends at record {result.records}, but record {head.sequence} "
                    "was acknowledged (the tail was cut off or replaced)"
                ),
                last_hash=result.last_hash,
            )
        if not result.ok:
            log.error("audit_verify_failed", first_bad_sequence=result.first_bad_sequence,
                      problem=result.problem)
        return auditor_pb2.VerifyResponse(
            ok=result.ok, records=result.records,
            first_bad_sequence=result.first_bad_sequence, problem=result.problem,
        )

    async def _append(
        self, request_iterator: AsyncIterator[auditor_pb2.AuditEvent]
    ) -> tuple[int, int]:
        appended = 0
        last_sequence = self._log.head.sequence
        batch: list[dict[str, Any]] = []
        index = 0
        try:
            async with asyncio.timeout(self._settings.append_timeout_s):
                async for event in request_iterator:
                    record = event_to_dict(event)
                    try:
                        chain.check_event(record)
                    except errors.InvalidArgument as exc:
                        raise errors.InvalidArgument.relayed(
                            exc.field, f"{exc.message} (event {index} of the stream)"
                        ) from None
                    batch.append(record)
                    index += 1
                    if len(batch) >= self._settings.batch_max_events:
                        written, last_sequence = await self._commit(batch)
                        appended += written
                        batch = []
                if batch:
                    written, last_sequence = await self._commit(batch)
                    appended += written
        except TimeoutError:
            raise errors.DeadlineExceeded(
                f"an Append stream may stay open at most {self._settings.append_timeout_s}s"
            ) from None
        return appended, last_sequence

    async def _commit(self, batch: list[dict[str, Any]]) -> tuple[int, int]:
        """Makes one batch durable; returns (records written, last sequence)."""
        try:
            async with asyncio.timeout(self._settings.write_timeout_s):
                async with self._write_lock:
                    started = time.perf_counter()
                    result = await asyncio.to_thread(self._log.append_batch, batch)
                    elapsed = time.perf_counter() - started
        except TimeoutError:
            # The thread may still finish the write; a retried call is then deduplicated.
            raise errors.Unavailable(
                f"the audit log write took longer than {self._settings.write_timeout_s}s",
                retry_after_s=1.0,
            ) from None
        if result.appended:
            COMMIT_SECONDS.observe(elapsed)
            BATCH_EVENTS.observe(result.appended)
            EVENTS_APPENDED.inc(result.appended)
        if result.duplicates:
            EVENTS_DUPLICATE.inc(result.duplicates)
        LAST_SEQUENCE.set(result.last_sequence)
        return result.appended, result.last_sequence


async def setup(ctx: ServiceContext) -> ServiceParts:
    """Opens the log (recovering a torn tail) before the server listens, closes it after."""
    settings = ctx.settings
    if not isinstance(settings, AuditorSettings):
        raise TypeError("the auditor needs AuditorSettings")
    audit_log = await asyncio.to_thread(
        chain.AuditLog.open, settings.log_path, dedupe_window=settings.dedupe_window
    )
    auditor_pb2_grpc.add_AuditorServicer_to_server(AuditorServicer(audit_log, settings), ctx.server)

    async def cleanup() -> None:
        await asyncio.to_thread(audit_log.close)

    return ServiceParts(
        [auditor_pb2.DESCRIPTOR.services_by_name["Auditor"].full_name], cleanup=cleanup
    )
