"""The Auditor gRPC service: a thin layer over the log (`store.py`), its reader and verifier.

Appends from every open stream meet in one `GroupCommitter`, which writes whatever batches
are waiting with one fsync (group commit) in a worker thread, so the event loop never blocks
on the disk and throughput grows with the number of writers instead of collapsing. Each batch
is acknowledged, in stream order, only once it is durable.

Background tasks sign a checkpoint every `checkpoint_interval_s` (when the log grew) and
publish it to etcd (`CheckpointWitness`), and drop segments past retention. Reads (Query,
proofs, Verify) authenticate the caller's API key: admin keys see every tenant, other keys
only their own tenant's generation events.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import functools
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import aetcd
import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf import json_format, timestamp_pb2
from prometheus_client import Counter, Gauge, Histogram

from infermesh.v1 import auditor_pb2, auditor_pb2_grpc
from services.auditor import index, reader, verify
from services.auditor.checkpoints import (
    CHECKPOINT_KEY,
    PUBLIC_KEYS_PREFIX,
    Checkpoint,
    Signer,
)
from services.auditor.events import check_batch, check_sources, event_to_dict
from services.auditor.records import Record
from services.auditor.settings import AuditorSettings
from services.auditor.store import AppendResult, AuditLog, LogCorrupted
from services.common import errors, etcd, status
from services.common.auth import Authenticator, Principal
from services.common.callers import PLAINTEXT_MESH, mesh_caller
from services.common.frames import add_servicer
from services.common.logs import get_logger
from services.common.runtime import ServiceContext, ServiceParts
from services.common.tenancy import parse_key, parse_tenant

log = get_logger(__name__)
T = TypeVar("T")

EVENTS_APPENDED = Counter(
    "infermesh_auditor_events_appended_total", "Audit events written to the log and fsynced."
)
EVENTS_DUPLICATE = Counter(
    "infermesh_auditor_events_duplicate_total",
    "Audit events dropped because their event_id was recently stored (client retries).",
)
GROUP_EVENTS = Histogram(
    "infermesh_auditor_fsync_batch_events", "Records written per fsync (group commit size).",
    buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384),
)
COMMIT_SECONDS = Histogram(
    "infermesh_auditor_fsync_seconds", "Time to convert, write and fsync one group.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
ACK_SECONDS = Histogram(
    "infermesh_auditor_ack_seconds", "A batch's arrival to its durable acknowledgement.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
LAST_SEQUENCE = Gauge("infermesh_auditor_last_sequence", "Sequence number of the durable head.")
CHECKPOINTS = Counter("infermesh_auditor_checkpoints_total", "Checkpoints signed into the log.")
INDEX_INTERVAL_S = 10.0  # how soon a rotated segment gets its query index
PUBLISHED_SIZE = Gauge(
    "infermesh_auditor_checkpoint_published_size", "Tree size of the checkpoint in etcd."
)
PUBLISH_FAILURES = Counter(
    "infermesh_auditor_checkpoint_publish_failures_total",
    "Checkpoints that could not be published to etcd (retried on the next tick).",
)
SEGMENTS_DROPPED = Counter(
    "infermesh_auditor_segments_dropped_total", "Segments deleted by retention."
)
READS = Counter("infermesh_auditor_reads_total", "Read RPCs answered, by method and outcome.",
                ["method", "code"])


class GroupCommitter:
    """Merges the batches waiting from every stream into one append (one fsync)."""

    def __init__(self, audit_log: AuditLog, max_events: int, timeout_s: float):
        self._log = audit_log
        self._max_events = max_events
        self._timeout_s = timeout_s
        self._waiting: collections.deque[
            tuple[list[auditor_pb2.AuditEvent], asyncio.Future[AppendResult]]
        ] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit group commit")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for _events, future in self._waiting:
            if not future.done():
                future.set_exception(errors.Unavailable("the auditor is stopping"))
        self._waiting.clear()

    async def commit(self, events: list[auditor_pb2.AuditEvent]) -> AppendResult:
        """Returns once `events` are durable; Unavailable after `timeout_s` (the write may
        still land: a retry is deduplicated)."""
        future: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        self._waiting.append((events, future))
        self._wake.set()
        try:
            async with asyncio.timeout(self._timeout_s):
                return await asyncio.shield(future)
        except TimeoutError:
            future.add_done_callback(_consume)
            raise errors.Unavailable(
                f"the audit log write took longer than {self._timeout_s}s", retry_after_s=1.0
            ) from None

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                group, count = [], 0
                while self._waiting and (not group or count + len(self._waiting[0][0])
                                         <= self._max_events):
                    entry = self._waiting.popleft()
                    group.append(entry)
                    count += len(entry[0])
                try:
                    results = await asyncio.to_thread(self._write, [e for e, _ in group])
                except Exception as exc:
                    error = exc if isinstance(exc, errors.MeshError) else errors.Internal(
                        f"appending to the audit log failed: {exc!r}")
                    log.error("audit_group_commit_failed", events=count, error=repr(exc))
                    outcomes: list[AppendResult | errors.MeshError] = [error] * len(group)
                else:
                    outcomes = list(results)
                for (_events, future), outcome in zip(group, outcomes, strict=True):
                    if future.done():
                        continue
                    if isinstance(outcome, errors.MeshError):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)

    def _write(self, batches: list[list[auditor_pb2.AuditEvent]]) -> list[AppendResult]:
        """Worker thread: converts, appends and fsyncs the group; splits the result by batch."""
        started = time.perf_counter()
        before = self._log.head.sequence
        events = [event_to_dict(event) for batch in batches for event in batch]
        result = self._log.append(events)
        COMMIT_SECONDS.observe(time.perf_counter() - started)
        if result.appended:
            GROUP_EVENTS.observe(result.appended)
            EVENTS_APPENDED.inc(result.appended)
        if result.duplicates:
            EVENTS_DUPLICATE.inc(result.duplicates)
        LAST_SEQUENCE.set(result.last_sequence)
        split, start = [], 0
        for batch in batches:
            sequences = result.sequences[start:start + len(batch)]
            start += len(batch)
            appended = sum(1 for seq in sequences if seq > before)
            split.append(AppendResult(sequences, appended, len(batch) - appended,
                                      max(sequences)))
        return split


class CheckpointWitness:
    """Publishes the public key and the newest checkpoint to etcd, where rewriting the
    auditor's disk does not reach. One key per signing key: `audit/checkpoint/<key id>`."""

    def __init__(self, client: aetcd.Client, signer: Signer):
        self._client = client
        self._signer = signer
        self.key = f"{CHECKPOINT_KEY}/{signer.key_id}"
        self.published_size = -1

    async def publish_key(self) -> None:
        await self._client.put(f"{PUBLIC_KEYS_PREFIX}{self._signer.key_id}".encode(),
                               etcd.encode(self._signer.public_record()))

    async def published(self) -> Checkpoint | None:
        current = await self._client.get(self.key.encode())
        if current is None:
            return None
        return Checkpoint.from_record(json.loads(current.value))

    async def publish(self, checkpoint: Checkpoint) -> None:
        """Moves etcd's checkpoint forward, never back (compare-and-swap on its revision)."""
        current = await self._client.get(self.key.encode())
        if current is not None:
            published = Checkpoint.from_record(json.loads(current.value))
            if published.size > checkpoint.size:
                raise errors.FailedPrecondition(
                    f"etcd holds a checkpoint of {published.size} records, ahead of this "
                    f"log's {checkpoint.size}: the log lost acknowledged records")
            compare = [self._client.transactions.mod(self.key.encode()) == current.mod_revision]
        else:
            compare = [self._client.transactions.version(self.key.encode()) == 0]
        value = etcd.encode(checkpoint.to_record(with_hints=False))
        succeeded, _ = await self._client.transaction(
            compare=compare, success=[self._client.transactions.put(self.key.encode(), value)],
            failure=[],
        )
        if not succeeded:
            raise errors.FailedPrecondition("the checkpoint in etcd changed under us; retrying")
        self.published_size = checkpoint.size
        PUBLISHED_SIZE.set(checkpoint.size)


class _ReadSlot:
    """A read's place among its tenant's: given back once the read has returned *and* every
    scan it started in a read thread has ended."""

    def __init__(self, loop: asyncio.AbstractEventLoop, release: Callable[[], None]):
        self._loop = loop
        self._release = release
        self._running = 0
        self._closed = False
        self._released = False

    def track(self, work: concurrent.futures.Future[Any]) -> None:
        self._running += 1
        work.add_done_callback(lambda _work: self._loop.call_soon_threadsafe(self._ended))

    def _ended(self) -> None:
        self._running -= 1
        self._maybe_release()

    def close(self) -> None:
        self._closed = True
        self._maybe_release()

    def _maybe_release(self) -> None:
        if self._closed and not self._running and not self._released:
            self._released = True
            self._release()


_current_slot: contextvars.ContextVar[_ReadSlot | None] = contextvars.ContextVar(
    "audit_read_slot", default=None)


class AuditorServicer(auditor_pb2_grpc.AuditorServicer):
    def __init__(
        self, audit_log: AuditLog, committer: GroupCommitter, authenticator: Authenticator,
        keys: dict[str, Ed25519PublicKey], settings: AuditorSettings,
    ):
        self._log = audit_log
        self.keys = keys
        self._committer = committer
        self._auth = authenticator
        self._settings = settings
        # Reads scan files: in their own threads, never queued with group commit's writes.
        self._reads = concurrent.futures.ThreadPoolExecutor(
            settings.read_workers, thread_name_prefix="audit-read")
        self._reads_by_tenant: collections.Counter[str] = collections.Counter()
        LAST_SEQUENCE.set(audit_log.head.sequence)

    async def _in_reads(self, function: Callable[..., T], *args: Any) -> T:
        """`function` in a read thread. Inside a read slot, the slot is held until the thread
        is done, even when the call gave up on it (a deadline cannot stop a running scan)."""
        work = self._reads.submit(function, *args)
        slot = _current_slot.get()
        if slot is not None:
            slot.track(work)
        return await asyncio.wrap_future(work)

    @contextlib.contextmanager
    def _read_slot(self, principal: Principal):
        """One of the tenant's `max_reads_per_tenant` concurrent reads, or RESOURCE_EXHAUSTED:
        all of a tenant's keys share them, and a read counts until its scan has ended."""
        tenant = principal.tenant_id
        if self._reads_by_tenant[tenant] >= self._settings.max_reads_per_tenant:
            raise errors.ResourceExhausted(
                f"tenant {tenant} already runs {self._settings.max_reads_per_tenant} audit "
                "reads; wait for one to finish", retry_after_s=1.0, reason="audit_reads")
        self._reads_by_tenant[tenant] += 1
        slot = _ReadSlot(asyncio.get_running_loop(), lambda: self._release_read(tenant))
        token = _current_slot.set(slot)
        try:
            yield
        finally:
            _current_slot.reset(token)
            slot.close()

    def _release_read(self, tenant: str) -> None:
        self._reads_by_tenant[tenant] -= 1
        if not self._reads_by_tenant[tenant]:
            del self._reads_by_tenant[tenant]

    def close_reads(self) -> None:
        self._reads.shutdown(wait=False, cancel_futures=True)

    async def Append(
        self, request_iterator: AsyncIterator[auditor_pb2.AppendRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[auditor_pb2.AppendAck]:
        """Reads batches as they come (up to `max_inflight_batches` waiting on the disk) and
        acknowledges each, in order, once durable. A bad batch ends the stream with
        INVALID_ARGUMENT; the batches before it stay stored (and acknowledged if already due).
        Which services may write is `callers.CALLERS`; each event's `source` must name the
        caller's own kind (with TLS: plaintext development has no identities to tie it to).
        """
        caller = mesh_caller()
        inflight: asyncio.Queue[Any] = asyncio.Queue(self._settings.max_inflight_batches)
        reading = asyncio.create_task(self._read_batches(
            request_iterator, inflight, None if caller in (None, PLAINTEXT_MESH) else caller))
        try:
            async with asyncio.timeout(self._settings.append_timeout_s):
                while (item := await inflight.get()) is not None:
                    if isinstance(item, errors.MeshError):
                        raise item
                    arrived, commit = item
                    result = await commit
                    ACK_SECONDS.observe(time.perf_counter() - arrived)
                    yield auditor_pb2.AppendAck(appended=result.appended,
                                                duplicates=result.duplicates,
                                                last_sequence=result.last_sequence)
        except TimeoutError:
            await status.abort(context, errors.DeadlineExceeded(
                f"an Append stream may stay open at most {self._settings.append_timeout_s}s"))
        except errors.MeshError as exc:
            await status.abort(context, exc)
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
            while not inflight.empty():  # batches already submitted still land; nobody waits
                item = inflight.get_nowait()
                if isinstance(item, tuple):
                    item[1].add_done_callback(_consume)

    async def _read_batches(
        self, request_iterator: AsyncIterator[auditor_pb2.AppendRequest], inflight: asyncio.Queue,
        caller_kind: str | None,
    ) -> None:
        index = 0
        try:
            async for request in request_iterator:
                try:
                    check_batch(request, self._settings.batch_max_events,
                                self._settings.max_event_bytes)
                    if caller_kind is not None:
                        check_sources(request, caller_kind)
                except errors.InvalidArgument as exc:
                    await inflight.put(errors.InvalidArgument.relayed(
                        exc.field, f"{exc.message} (batch {index} of the stream)"))
                    return
                except errors.PermissionDenied as exc:
                    await inflight.put(exc)
                    return
                commit = asyncio.ensure_future(self._committer.commit(list(request.events)))
                await inflight.put((time.perf_counter(), commit))
                index += 1
        except grpc.aio.AioRpcError:
            pass  # the client went away; what it sent so far is handled
        await inflight.put(None)

    async def Verify(
        self, request: auditor_pb2.VerifyRequest, context: grpc.aio.ServicerContext
    ) -> auditor_pb2.VerifyResponse:
        """Re-walks the log up to the durable head, and checks it still ends there."""
        async def run(principal: Principal) -> auditor_pb2.VerifyResponse:
            _require_admin(principal)
            view = await self._in_reads(self._log.view)
            result = await self._in_reads(functools.partial(
                verify.verify, self._log.data_dir, keys=self.keys, view=view,
                up_to=view.head.sequence))
            if result.ok and result.last_sequence != view.head.sequence:
                result = dataclasses.replace(
                    result, ok=False, first_bad_sequence=result.last_sequence + 1,
                    problem=(f"the log ends at record {result.last_sequence}, but record "
                             f"{view.head.sequence} was acknowledged (the tail was cut off)"))
            if not result.ok:
                log.error("audit_verify_failed", first_bad_sequence=result.first_bad_sequence,
                          problem=result.problem)
            return auditor_pb2.VerifyResponse(
                ok=result.ok, records=result.records,
                first_bad_sequence=result.first_bad_sequence, problem=result.problem,
                first_sequence=result.first_sequence, checkpoints=result.checkpoints,
                root_hash=result.root)

        return await self._read("Verify", context, run)

    async def Query(
        self, request: auditor_pb2.QueryRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[auditor_pb2.AuditRecord]:
        try:
            principal = self._authenticate(context)
            where = self._query_filter(request, principal)
            with self._read_slot(principal):
                view = await self._in_reads(self._log.view)
                matches = reader.query(view, where)
                async with asyncio.timeout(self._settings.query_timeout_s):
                    while chunk := await self._in_reads(_take, matches, 256):
                        for record, line in chunk:
                            yield _record_message(record, line)
        except TimeoutError:
            READS.labels("Query", "DEADLINE_EXCEEDED").inc()
            await status.abort(context, errors.DeadlineExceeded(
                f"the query scanned for longer than {self._settings.query_timeout_s}s; "
                "narrow it with since/until"))
        except errors.MeshError as exc:
            READS.labels("Query", exc.code).inc()
            await status.abort(context, exc)
        READS.labels("Query", "OK").inc()

    async def GetCheckpoint(
        self, request: auditor_pb2.GetCheckpointRequest, context: grpc.aio.ServicerContext
    ) -> auditor_pb2.SignedCheckpoint:
        async def run(_principal: Principal) -> auditor_pb2.SignedCheckpoint:
            checkpoint = await self._fresh_checkpoint()
            return checkpoint_message(checkpoint)

        return await self._read("GetCheckpoint", context, run)

    async def ProveInclusion(
        self, request: auditor_pb2.ProveInclusionRequest, context: grpc.aio.ServicerContext
    ) -> auditor_pb2.InclusionProof:
        async def run(principal: Principal) -> auditor_pb2.InclusionProof:
            tenant = request.tenant
            if len(tenant) > 63:
                raise errors.InvalidArgument("tenant", "must be at most 63 characters")
            if not principal.is_admin:
                if tenant and tenant != principal.tenant_id:
                    raise errors.PermissionDenied(
                        f"key {principal.key_id} may prove only tenant "
                        f"{principal.tenant_id!r}'s records")
                tenant = principal.tenant_id
            checkpoint = await self._fresh_checkpoint()
            view = await self._in_reads(self._log.view)  # holds all the checkpoint covers
            which = request.WhichOneof("record")
            if which == "request_id":
                if not request.request_id or len(request.request_id) > 256:
                    raise errors.InvalidArgument("request_id", "must be 1 to 256 characters")
                # Scoped by tenant: another tenant's newer record with the same client-chosen
                # id is not this one (and is not revealed).
                sequence = await self._in_reads(reader.find_sequence, view,
                                                request.request_id, tenant)
            elif which == "sequence":
                sequence = request.sequence
                if not view.segments[0].first <= sequence <= view.head.sequence:
                    raise errors.InvalidArgument(
                        "sequence", f"must be between {view.segments[0].first} and "
                        f"{view.head.sequence} (the records kept)")
            else:
                raise errors.InvalidArgument("record", "set request_id or sequence")
            if sequence > checkpoint.size:
                checkpoint = await self._fresh_checkpoint()
                view = await self._in_reads(self._log.view)
            proof = await self._in_reads(reader.inclusion_proof, view, sequence, checkpoint)
            record_tenant = (json.loads(proof.leaf)["event"].get("generation") or {}).get(
                "tenant")
            if not principal.is_admin and record_tenant != principal.tenant_id:
                # The same answer as for a record that does not exist: ids are not probed.
                raise errors.NotFound(f"no audit record for {which} "
                                      f"{getattr(request, which)!r}")
            return auditor_pb2.InclusionProof(
                sequence=proof.sequence, line=proof.leaf.decode("ascii"), path=list(proof.path),
                checkpoint=checkpoint_message(proof.checkpoint))

        return await self._read("ProveInclusion", context, run)

    async def ProveConsistency(
        self, request: auditor_pb2.ProveConsistencyRequest, context: grpc.aio.ServicerContext
    ) -> auditor_pb2.ConsistencyProof:
        async def run(_principal: Principal) -> auditor_pb2.ConsistencyProof:
            for name in ("old_size", "new_size"):
                if getattr(request, name) < 0:
                    raise errors.InvalidArgument(name, "must not be negative")
            latest = await self._fresh_checkpoint()
            view = await self._in_reads(self._log.view)  # holds all the checkpoint covers
            new = (latest if not request.new_size else
                   await self._in_reads(reader.checkpoint_of_size, view, request.new_size))
            if request.old_size > new.size:
                raise errors.InvalidArgument(
                    "old_size", f"is {request.old_size}, more than the new size {new.size}")
            old = await self._in_reads(reader.checkpoint_of_size, view, request.old_size)
            proof = await self._in_reads(reader.consistency_proof, view, old, new)
            return auditor_pb2.ConsistencyProof(
                old=checkpoint_message(old), new=checkpoint_message(new), path=list(proof.path))

        return await self._read("ProveConsistency", context, run)

    # -- helpers -------------------------------------------------------------------------------

    async def _read(self, method: str, context: grpc.aio.ServicerContext,
                    run: Callable[[Principal], Any]) -> Any:
        """Authenticates, runs a read under the query deadline, maps errors, counts."""
        try:
            principal = self._authenticate(context)
            with self._read_slot(principal):
                async with asyncio.timeout(self._settings.query_timeout_s):
                    reply = await run(principal)
        except TimeoutError:
            READS.labels(method, "DEADLINE_EXCEEDED").inc()
            await status.abort(context, errors.DeadlineExceeded(
                f"{method} took longer than {self._settings.query_timeout_s}s"))
            raise  # not reached: abort raises
        except errors.MeshError as exc:
            READS.labels(method, exc.code).inc()
            await status.abort(context, exc)
            raise  # not reached: abort raises
        READS.labels(method, "OK").inc()
        return reply

    def _authenticate(self, context: grpc.aio.ServicerContext) -> Principal:
        metadata = dict(context.invocation_metadata() or ())
        return self._auth.authenticate(metadata.get("authorization"))

    def _query_filter(self, request: auditor_pb2.QueryRequest,
                      principal: Principal) -> reader.QueryFilter:
        tenant = request.tenant
        if not principal.is_admin:
            if tenant and tenant != principal.tenant_id:
                raise errors.PermissionDenied(
                    f"key {principal.key_id} may read only tenant {principal.tenant_id!r}")
            tenant = principal.tenant_id
        limit = request.limit or 1000
        if not 1 <= limit <= self._settings.query_max_records:
            raise errors.InvalidArgument(
                "limit", f"must be between 1 and {self._settings.query_max_records}")
        for name, value, most in (("tenant", tenant, 63), ("model", request.model, 256),
                                  ("request_id", request.request_id, 256)):
            if len(value) > most:
                raise errors.InvalidArgument(name, f"is {len(value)} characters, at most {most}")
        since_ms = _ms(request.since) if request.HasField("since") else 0
        until_ms = _ms(request.until) if request.HasField("until") else 0
        if until_ms and since_ms >= until_ms:
            raise errors.InvalidArgument("until", "must be later than since")
        return reader.QueryFilter(tenant=tenant, since_ms=since_ms, until_ms=until_ms,
                                  model=request.model, request_id=request.request_id,
                                  limit=limit)

    async def _fresh_checkpoint(self) -> Checkpoint:
        """The newest checkpoint, signing one first if records were appended since."""
        await asyncio.to_thread(self._log.checkpoint)
        checkpoint = self._log.latest_checkpoint
        if checkpoint is None:
            raise errors.Unavailable("the audit log has no checkpoint yet", retry_after_s=1.0)
        return checkpoint


def _consume(future: asyncio.Future[Any]) -> None:
    """Retrieves an outcome nobody waits for any more, so asyncio does not report it."""
    if not future.cancelled():
        future.exception()


def _require_admin(principal: Principal) -> None:
    if not principal.is_admin:
        raise errors.PermissionDenied(f"key {principal.key_id} is not an admin key")


def _take(items: Iterator[T], count: int) -> list[T]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == count:
            break
    return chunk


def _ms(stamp: timestamp_pb2.Timestamp) -> int:
    return stamp.seconds * 1000 + stamp.nanos // 1_000_000


def _record_message(record: Record, line: bytes) -> auditor_pb2.AuditRecord:
    message = auditor_pb2.AuditRecord(sequence=record.seq, line=line[:-1].decode("ascii"))
    message.appended.FromMilliseconds(record.at)
    json_format.ParseDict(record.event, message.event, ignore_unknown_fields=True)
    return message


def checkpoint_message(checkpoint: Checkpoint) -> auditor_pb2.SignedCheckpoint:
    return auditor_pb2.SignedCheckpoint(
        tree_size=checkpoint.size, root_hash=checkpoint.root, head_hash=checkpoint.head,
        first_sequence=checkpoint.first, time_ms=checkpoint.at, key_id=checkpoint.key_id,
        signature=checkpoint.signature)


async def _every(interval_s: float, tick: Callable[[], Any], name: str) -> None:
    """Runs `tick` every `interval_s` for ever; a failure is logged and retried next time."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await tick()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(f"{name}_failed", error=repr(exc))


async def setup(ctx: ServiceContext) -> ServiceParts:
    """Opens the log (recovering a torn tail) before the server listens, closes it after."""
    settings = ctx.settings
    if not isinstance(settings, AuditorSettings):
        raise TypeError("the auditor needs AuditorSettings")
    signer = await asyncio.to_thread(Signer.load_or_create, settings.signing_key_path)
    audit_log = await asyncio.to_thread(
        AuditLog.open, settings.data_dir, signer, settings.log_options())
    witness = CheckpointWitness(ctx.etcd, signer)
    try:
        await _check_against_witness(audit_log, witness)
    except BaseException:
        await asyncio.to_thread(audit_log.close)
        raise
    keys = etcd.WatchCache(ctx.etcd, etcd.Keys.apikeys, parse_key)
    tenants = etcd.WatchCache(ctx.etcd, etcd.Keys.tenants, parse_tenant)
    for cache in (keys, tenants):
        await cache.start()
    committer = GroupCommitter(audit_log, settings.group_max_events, settings.write_timeout_s)
    committer.start()
    servicer = AuditorServicer(audit_log, committer, Authenticator(keys, tenants),
                               {signer.key_id: signer.public_key}, settings)
    add_servicer(  # a malformed frame → INVALID_ARGUMENT, never UNKNOWN
        ctx.server, servicer,
        auditor_pb2.DESCRIPTOR.services_by_name["Auditor"], refuse_malformed=True,
    )

    async def checkpoint() -> None:
        if await asyncio.to_thread(audit_log.checkpoint) is not None:
            CHECKPOINTS.inc()
        latest = audit_log.latest_checkpoint
        if latest is not None and latest.size != witness.published_size:
            try:
                await witness.publish(latest)
            except Exception:
                PUBLISH_FAILURES.inc()
                raise

    async def build_indexes() -> None:
        built = await asyncio.to_thread(index.build_missing, settings.data_dir)
        if built:
            log.info("audit_indexes_built", segments=built)

    async def retention() -> None:
        cutoff = int((time.time() - settings.retention_s) * 1000)
        dropped = await asyncio.to_thread(audit_log.drop_segments, cutoff)
        if dropped:
            SEGMENTS_DROPPED.inc(len(dropped))
            await checkpoint()

    background = [asyncio.create_task(_every(settings.checkpoint_interval_s, checkpoint,
                                             "audit_checkpoint")),
                  asyncio.create_task(_every(INDEX_INTERVAL_S, build_indexes, "audit_index"))]
    if settings.retention_s:
        background.append(asyncio.create_task(
            _every(settings.retention_check_interval_s, retention, "audit_retention")))

    async def cleanup() -> None:
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await committer.close()
        servicer.close_reads()
        for cache in (keys, tenants):
            await cache.stop()
        await asyncio.to_thread(audit_log.close)
        latest = audit_log.latest_checkpoint
        if latest is not None:
            with contextlib.suppress(Exception):
                await witness.publish(latest)

    return ServiceParts(
        [auditor_pb2.DESCRIPTOR.services_by_name["Auditor"].full_name], cleanup=cleanup
    )


async def _check_against_witness(audit_log: AuditLog, witness: CheckpointWitness) -> None:
    """Refuses to start on a log that is behind its own checkpoint in etcd (records lost or
    an old backup restored); publishes the key. etcd being away only delays the check."""
    try:
        await witness.publish_key()
        published = await witness.published()
    except Exception as exc:  # etcd down: static stability, check later
        log.warning("audit_witness_unreachable", error=repr(exc))
        return
    if published is not None and published.size > audit_log.head.sequence:
        raise LogCorrupted(
            f"etcd holds a signed checkpoint of {published.size} records but the log in "
            f"{audit_log.data_dir} ends at record {audit_log.head.sequence}: acknowledged "
            "records are missing; restore the log and run `meshctl audit verify --etcd` (to "
            f"accept the loss instead, delete the etcd key {witness.key})")
    if published is not None:
        witness.published_size = published.size
