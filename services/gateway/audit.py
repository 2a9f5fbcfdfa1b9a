"""Audit events from the gateway: spooled on local disk, shipped to the auditor in order.

`emit` never blocks and never fails a generation: it bounds the event's fields
(`events.bound_event`), serializes it into memory and returns. A writer task appends what
accumulated to the spool (framed, fdatasync) every few milliseconds; a shipper task sends the
spool's oldest events to the auditor, one batch at a time (at most `batch_events` events and
`batch_bytes` bytes), and moves the spool's cursor past a batch only once the auditor
acknowledged it (after its fsync). While the auditor is slow or down the spool grows; when it
returns the backlog is replayed in order. A crash replays at most the unacknowledged batch
again, which the auditor stores once (it deduplicates by event id).

A frame is `MAGIC, payload length, payload CRC-32, header CRC-32` and the payload: a reader
that meets bytes it cannot trust (disk corruption) finds the next frame by its magic and a
header that checks, so one bad region never costs the frames after it. Frames of the older
format (`length, CRC-32`, no magic) are still read, so a spool written before the upgrade drains.

The spool is bounded (`max_bytes`, memory and disk together). What happens when it is full
is configured by `on_full`:
- `drop` (default): the new event is dropped and counted
  (`infermesh_gateway_audit_dropped_total{reason="spool_full"}`, plus an error log);
- `refuse`: new generations are refused with UNAVAILABLE (retry on another gateway) until the
  spool drains, and the events of generations already running are still kept.
Nothing is dropped silently, and nothing is retried for ever: a disk error keeps events in
memory (and counts a drop only past the bound); what cannot be shipped — an event the auditor
refuses as invalid, a frame over `batch_bytes`, an unreadable region — is set aside in
`dead-letter.spool` and counted (`infermesh_gateway_audit_dead_lettered_total{reason}`), and
the events behind it ship.

Files in the spool directory: `<n>.spool` (frames, rotated at `file_bytes`), `cursor` (the
first unacknowledged frame), `LOCK` (one gateway per directory), `dead-letter.spool` (frames).

Instance ids are new on every start, so with the default layout (`<root>/<instance id>/
audit-spool`) a gateway that died leaves its spool behind under an id nobody will use again.
Every gateway therefore adopts such orphans: a sibling spool whose `LOCK` it can take belongs
to no running gateway, so it ships that spool's events and then removes the directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib
import shutil
import struct
import threading
import time
import zlib
from typing import Any, Literal

import grpc
from prometheus_client import Counter, Gauge
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from infermesh.v1 import auditor_pb2
from services.auditor import client as auditor_client
from services.auditor.events import bound_event
from services.common import errors
from services.common.discovery import ServiceDirectory
from services.common.files import append_durably, fsync_directory
from services.common.logs import get_logger

log = get_logger(__name__)
DROPPED = Counter("infermesh_gateway_audit_dropped_total",
                  "Audit events not kept, by reason: spool_full (one per event).", ["reason"])
DEAD_LETTERED = Counter(
    "infermesh_gateway_audit_dead_lettered_total",
    "Spool frames set aside in dead-letter.spool instead of shipped, by reason: refused (the "
    "auditor called the event invalid), oversized (over batch_bytes), corrupt (an unreadable "
    "region, disk corruption).", ["reason"])
SHIPPED = Counter("infermesh_gateway_audit_shipped_total", "Audit events acknowledged.")
SHIP_FAILURES = Counter("infermesh_gateway_audit_ship_failures_total",
                        "Failed attempts to ship a batch (retried with backoff).")
REFUSED = Counter("infermesh_gateway_audit_refused_generations_total",
                  "Generations refused because the audit spool was full (on_full=refuse).")
ORPHANS = Counter("infermesh_gateway_audit_orphans_adopted_total",
                  "Spools left by gateways that died, shipped and removed by this one.")
SPOOL_BYTES = Gauge("infermesh_gateway_audit_spool_bytes",
                    "Audit bytes not yet acknowledged by the auditor (memory and disk).")

MAGIC = b"IMf2"
FRAME = struct.Struct(">4sIII")  # MAGIC, payload length, payload CRC-32, CRC-32 of the first 12
LEGACY_FRAME = struct.Struct(">II")  # before the magic: payload length, payload CRC-32
SPOOL_SUFFIX = ".spool"
CURSOR_FILE = "cursor"
DEAD_LETTER_FILE = "dead-letter.spool"
SPOOL_DIR_NAME = "audit-spool"
RESYNC_CHUNK = 64 << 10
BATCH_BYTES = 1 << 20


class AuditSpoolSettings(BaseSettings):
    """`INFERMESH_AUDIT_SPOOL_*`; read by the gateway beside its own settings."""

    model_config = SettingsConfigDict(env_prefix="INFERMESH_AUDIT_SPOOL_", extra="ignore")

    dir: pathlib.Path | None = Field(
        None, description="Spool directory (default <root>/<instance id>/audit-spool); one "
        "gateway per directory. Set it to a path that survives restarts, or keep the default "
        "and let gateways adopt each other's orphaned spools.")
    root: pathlib.Path = Field(
        pathlib.Path(".infermesh/data/gateway"),
        description="Parent of the per-instance spools in the default layout.")
    max_bytes: int = Field(256 << 20, ge=64 << 10,
                           description="Bound on unacknowledged events, memory and disk.")
    file_bytes: int = Field(4 << 20, ge=4096, description="A spool file rotates past this.")
    on_full: Literal["drop", "refuse"] = Field(
        "drop", description="drop: drop and count new events; refuse: refuse new generations.")
    flush_interval_s: float = Field(0.01, gt=0, le=1.0,
                                    description="How long events gather before one fdatasync.")
    batch_events: int = Field(512, ge=1, le=4096, description="Most events per Append batch.")
    batch_bytes: int = Field(
        BATCH_BYTES, ge=64 << 10, le=3 << 20,
        description="Most event bytes per Append batch: well under gRPC's 4 MiB message limit. "
        "A single event larger than this is set aside (dead-letter.spool), never sent.")
    retry_max_s: float = Field(2.0, gt=0, description="Longest backoff between ship attempts.")
    flush_timeout_s: float = Field(5.0, ge=0,
                                   description="On shutdown, how long to keep shipping.")

    def directory(self, instance_id: str) -> pathlib.Path:
        return self.dir or self.root / instance_id / SPOOL_DIR_NAME

    def orphan_candidates(self, instance_id: str) -> list[pathlib.Path]:
        """Other instances' spools in the default layout (none when `dir` is pinned: the next
        start reuses that directory, so nothing is orphaned)."""
        if self.dir is not None:
            return []
        own = self.directory(instance_id)
        return sorted(p for p in self.root.glob(f"*/{SPOOL_DIR_NAME}")
                      if p != own and (p / "LOCK").exists())


@dataclasses.dataclass(frozen=True, order=True)
class Position:
    file: int
    offset: int


@dataclasses.dataclass(frozen=True)
class Frame:
    """One frame, or one region that cannot be shipped (`reason` set: oversized or corrupt)."""

    offset: int
    size: int  # bytes on disk, header included
    payload: bytes  # the event; for a region set aside, its bytes as found
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class Batch:
    payloads: list[bytes]  # serialized AuditEvents, oldest first
    end: Position  # just past the last frame read
    size: int  # spool bytes the batch spans (what committing it frees)
    set_aside: Frame | None = None  # alone in its batch: a region to dead-letter, not ship


def encode_frames(payloads: list[bytes]) -> bytes:
    out = []
    for payload in payloads:
        head = struct.pack(">4sII", MAGIC, len(payload), zlib.crc32(payload))
        out.append(head + struct.pack(">I", zlib.crc32(head)) + payload)
    return b"".join(out)


def read_frame(fd: int, offset: int, file_size: int, max_payload: int) -> Frame | None:
    """The frame at `offset` (None at the end of the file). A payload over `max_payload` comes
    back set aside as `oversized`; bytes that are no whole, checksummed frame come back as one
    `corrupt` region reaching to the next frame whose header checks (or to the file's end)."""
    if offset >= file_size:
        return None
    header = os.pread(fd, FRAME.size, offset)
    if len(header) == FRAME.size and header[:4] == MAGIC:
        _, length, crc, header_crc = FRAME.unpack(header)
        end = offset + FRAME.size + length
        if zlib.crc32(header[:12]) == header_crc and end <= file_size:
            payload = os.pread(fd, length, offset + FRAME.size)
            if zlib.crc32(payload) != crc:  # the length is trusted: its header checked
                return Frame(offset, end - offset, payload, "corrupt")
            return Frame(offset, end - offset, payload,
                         "oversized" if length > max_payload else "")
    elif len(header) >= LEGACY_FRAME.size:
        length, crc = LEGACY_FRAME.unpack(header[:LEGACY_FRAME.size])
        end = offset + LEGACY_FRAME.size + length
        if length > 0 and end <= file_size:  # no header CRC: only a payload that checks counts
            payload = os.pread(fd, length, offset + LEGACY_FRAME.size)
            if zlib.crc32(payload) == crc:
                return Frame(offset, end - offset, payload,
                             "oversized" if length > max_payload else "")
    end = _next_magic(fd, offset + 1, file_size)
    return Frame(offset, end - offset, os.pread(fd, end - offset, offset), "corrupt")


def _next_magic(fd: int, offset: int, file_size: int) -> int:
    """The offset of the next frame header that checks, at or after `offset`; else the end."""
    while offset < file_size:
        chunk = os.pread(fd, RESYNC_CHUNK + FRAME.size, offset)
        at = chunk.find(MAGIC)
        while at >= 0:
            header = os.pread(fd, FRAME.size, offset + at)
            if len(header) == FRAME.size and zlib.crc32(header[:12]) == FRAME.unpack(header)[3]:
                return offset + at
            at = chunk.find(MAGIC, at + 1)
        offset += RESYNC_CHUNK
    return file_size


class Spool:
    """The files. Blocking I/O: call from worker threads. `write` may run beside `read` and
    `commit` (one internal lock guards the shared positions), never beside itself."""

    def __init__(self, directory: pathlib.Path, lock_fd: int, file_bytes: int):
        self._dir = directory
        self._lock_fd = lock_fd
        self._file_bytes = file_bytes
        self._lock = threading.Lock()
        self._cursor = Position(1, 0)
        self._end = Position(1, 0)  # durable end of the newest file
        self._write_fd = -1
        self.unacked_bytes = 0

    @property
    def directory(self) -> pathlib.Path:
        return self._dir

    @classmethod
    def open(cls, directory: pathlib.Path, file_bytes: int) -> Spool:
        directory.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(directory / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise errors.FailedPrecondition(
                    f"the audit spool {directory} is used by another gateway; give each one "
                    "its own INFERMESH_AUDIT_SPOOL_DIR") from None
            spool = cls(directory, lock_fd, file_bytes)
            spool._recover()
        except BaseException:
            os.close(lock_fd)
            raise
        return spool

    def _path(self, number: int) -> pathlib.Path:
        return self._dir / f"{number:016d}{SPOOL_SUFFIX}"

    def _files(self) -> list[int]:
        return sorted(int(p.stem) for p in self._dir.glob(f"*{SPOOL_SUFFIX}") if p.stem.isdigit())

    def _recover(self) -> None:
        try:
            value = json.loads((self._dir / CURSOR_FILE).read_text())
            cursor = Position(int(value["file"]), int(value["offset"]))
        except FileNotFoundError:
            files = self._files()
            cursor = Position(files[0] if files else 1, 0)
        for number in self._files():
            if number < cursor.file:
                self._path(number).unlink()
        files = self._files() or [cursor.file]
        last = files[-1]
        fd = os.open(self._path(last), os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        fsync_directory(self._dir)  # the file's name must outlive a power loss, like its bytes
        start = cursor.offset if last == cursor.file else 0
        end = _frames_end(fd, start)  # past the last frame that checks: later bytes are torn
        size = os.fstat(fd).st_size
        if end < size:
            log.warning("audit_spool_torn_tail_cut", file=last, offset=end, bytes=size - end)
            os.ftruncate(fd, end)
            os.fsync(fd)
        self._write_fd = fd
        self._cursor = cursor
        self._end = Position(last, end)
        self.unacked_bytes = sum(self._path(n).stat().st_size for n in files) - cursor.offset

    def write(self, payloads: list[bytes]) -> None:
        """Appends the events and fdatasyncs; raises OSError with nothing half-counted."""
        data = encode_frames(payloads)
        end = self._end
        append_durably(self._write_fd, data, end.offset)
        with self._lock:
            self._end = Position(end.file, end.offset + len(data))
            self.unacked_bytes += len(data)
        if self._end.offset >= self._file_bytes:
            self._rotate()

    def _rotate(self) -> None:
        number = self._end.file + 1
        fd = os.open(self._path(number), os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                     0o640)
        fsync_directory(self._dir)
        old = self._write_fd
        with self._lock:
            self._write_fd = fd
            self._end = Position(number, 0)
        os.close(old)

    def read(self, max_events: int, max_bytes: int = BATCH_BYTES) -> Batch:
        """The oldest unacknowledged events (not yet committed): at most `max_events`, and at
        most `max_bytes` of payload unless the first alone is larger. A region that cannot be
        shipped (a payload over `max_bytes`, corrupt bytes) comes alone, as `set_aside`."""
        with self._lock:
            position, end = self._cursor, self._end
        payloads: list[bytes] = []
        size = used = 0
        while len(payloads) < max_events and position < end:
            try:
                fd = os.open(self._path(position.file), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # removed by hand: nothing to read there
                log.error("audit_spool_file_missing", file=position.file)
                position = Position(position.file + 1, 0)
                continue
            try:
                limit = end.offset if position.file == end.file else os.fstat(fd).st_size
                offset = position.offset
                frame: Frame | None = None
                while len(payloads) < max_events:
                    frame = read_frame(fd, offset, limit, max_bytes)
                    if frame is None:
                        break
                    if frame.reason or used + len(frame.payload) > max_bytes:
                        if payloads:
                            return Batch(payloads, Position(position.file, offset), size)
                        return Batch([], Position(position.file, offset + frame.size),
                                     frame.size, set_aside=frame)
                    payloads.append(frame.payload)
                    used += len(frame.payload)
                    size += frame.size
                    offset += frame.size
            finally:
                os.close(fd)
            position = Position(position.file, offset)
            if position.file < end.file and frame is None:
                position = Position(position.file + 1, 0)  # that file is read to its end
        return Batch(payloads, position, size)

    def commit(self, batch: Batch) -> None:
        """Moves the cursor past `batch` (atomically, durably) and deletes finished files."""
        temporary = self._dir / f"{CURSOR_FILE}.tmp"
        temporary.write_text(json.dumps({"file": batch.end.file, "offset": batch.end.offset}))
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.rename(temporary, self._dir / CURSOR_FILE)
        fsync_directory(self._dir)
        with self._lock:
            old = self._cursor
            self._cursor = batch.end
            self.unacked_bytes -= batch.size
        for number in range(old.file, batch.end.file):
            with contextlib.suppress(FileNotFoundError):
                self._path(number).unlink()

    def dead_letter(self, payloads: list[bytes]) -> None:
        """Keeps what cannot be shipped, durably, for an operator to look at."""
        with open(self._dir / DEAD_LETTER_FILE, "ab") as file:
            file.write(encode_frames(payloads))
            file.flush()
            os.fsync(file.fileno())

    def close(self) -> None:
        for fd in (self._write_fd, self._lock_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def _frames_end(fd: int, start: int) -> int:
    """The end of the last whole, checksummed frame at or after `start` (of any size: what is
    too large to ship is the reader's business, not a torn tail)."""
    size = os.fstat(fd).st_size
    offset = end = start
    while (frame := read_frame(fd, offset, size, size)) is not None:
        offset += frame.size
        if not frame.reason:
            end = offset
    return end


class AuditEmitter:
    """The gateway's audit sink: `emit` on the event loop, disk and network in the background."""

    def __init__(self, spool: Spool, directory: ServiceDirectory, settings: AuditSpoolSettings,
                 timeout_s: float, orphans: list[pathlib.Path] | None = None):
        self._spool = spool
        self._orphans = orphans or []
        self._directory = directory
        self._settings = settings
        self._timeout_s = timeout_s
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._written = asyncio.Event()
        self._wake_writer = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._dropped_since_log = 0
        self._last_drop_log = 0.0
        SPOOL_BYTES.set(spool.unacked_bytes)

    @classmethod
    async def open(cls, directory: ServiceDirectory, settings: AuditSpoolSettings,
                   instance_id: str, timeout_s: float) -> AuditEmitter:
        """Opens the spool (what a previous run left is shipped first) and starts shipping."""
        path = settings.directory(instance_id)
        spool = await asyncio.to_thread(Spool.open, path, settings.file_bytes)
        emitter = cls(spool, directory, settings, timeout_s,
                      orphans=await asyncio.to_thread(settings.orphan_candidates, instance_id))
        emitter._tasks = [asyncio.create_task(emitter._write_forever(), name="audit spool"),
                          asyncio.create_task(emitter._ship_forever(), name="audit shipper")]
        log.info("audit_spool_opened", path=str(path), unacked_bytes=spool.unacked_bytes,
                 on_full=settings.on_full)
        return emitter

    @property
    def usage_bytes(self) -> int:
        return self._spool.unacked_bytes + self._pending_bytes

    @property
    def full(self) -> bool:
        return self.usage_bytes >= self._settings.max_bytes

    def emit(self, event: auditor_pb2.AuditEvent) -> None:
        """Never blocks, never raises: the event is kept, or (drop policy, spool full) counted."""
        payload = bound_event(event).SerializeToString()
        if self._settings.on_full == "drop" and self.full:
            DROPPED.labels("spool_full").inc()
            self._log_drop()
            return
        self._pending.append(payload)
        self._pending_bytes += FRAME.size + len(payload)
        SPOOL_BYTES.set(self.usage_bytes)
        self._wake_writer.set()

    def guard(self, admission: Any) -> Any:
        """Wraps the gateway's admission so that, under `refuse`, a full spool refuses new
        generations; under `drop` admission is returned unchanged."""
        return RefuseWhenSpoolFull(admission, self) if self._settings.on_full == "refuse" else (
            admission)

    async def close(self) -> None:
        """Writes what is in memory, ships for up to `flush_timeout_s`, then stops; what is
        left stays in the spool for the next start."""
        self._closing = True
        self._wake_writer.set()
        writer, shipper = self._tasks
        await _finish(writer, self._settings.flush_timeout_s + 5.0)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._settings.flush_timeout_s):
                while self._spool.unacked_bytes > 0 and not shipper.done():
                    await asyncio.sleep(0.02)
        self._written.set()  # the shipper sees `_closing` and stops after its current batch
        await _finish(shipper, self._timeout_s + 5.0)
        await asyncio.to_thread(self._spool.close)
        log.info("audit_spool_closed", unacked_bytes=self.usage_bytes)

    def _log_drop(self) -> None:
        self._dropped_since_log += 1
        now = time.monotonic()
        if now - self._last_drop_log >= 10.0:
            log.error("audit_events_dropped_spool_full", dropped=self._dropped_since_log,
                      max_bytes=self._settings.max_bytes)
            self._dropped_since_log = 0
            self._last_drop_log = now

    async def _write_forever(self) -> None:
        """Until closing with nothing left in memory: gather events, write them, fdatasync."""
        backoff = 0.05
        while self._pending or not self._closing:
            if not self._pending:
                await self._wake_writer.wait()
                self._wake_writer.clear()
                continue
            if not self._closing:
                await asyncio.sleep(self._settings.flush_interval_s)  # gather, then one sync
            payloads, self._pending = self._pending, []
            written = sum(FRAME.size + len(p) for p in payloads)
            try:
                await asyncio.to_thread(self._spool.write, payloads)
            except OSError as exc:
                self._pending = payloads + self._pending  # kept in memory, still bounded
                log.error("audit_spool_write_failed", events=len(payloads), error=repr(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._settings.retry_max_s)
                continue
            backoff = 0.05
            self._pending_bytes -= written
            self._written.set()

    async def _ship_forever(self) -> None:
        """Until closing: the oldest batch to the auditor; the cursor moves once it is acked.
        Any failure (auditor away, disk error) is retried with backoff; nothing is skipped.
        Orphaned spools go first: their events are older than this gateway's."""
        for path in self._orphans:
            if self._closing:
                return
            await self._adopt(path)
        await self._ship_spool(self._spool, orphan=False)

    async def _adopt(self, path: pathlib.Path) -> None:
        """Ships a dead gateway's spool, then removes it; skipped if a live gateway holds it."""
        try:
            spool = await asyncio.to_thread(Spool.open, path, self._settings.file_bytes)
        except errors.FailedPrecondition:
            return  # its gateway is alive
        except OSError as exc:
            log.error("audit_orphan_unreadable", path=str(path), error=repr(exc))
            return
        log.info("audit_orphan_adopting", path=str(path), unacked_bytes=spool.unacked_bytes)
        try:
            if await self._ship_spool(spool, orphan=True):
                await asyncio.to_thread(_remove_spool_directory, path)
                ORPHANS.inc()
                log.info("audit_orphan_adopted", path=str(path))
        finally:
            await asyncio.to_thread(spool.close)

    async def _ship_spool(self, spool: Spool, orphan: bool) -> bool:
        """Ships `spool` until closing (and, for an orphan, until it is empty); True when an
        orphan was emptied."""
        backoff = 0.1
        while not self._closing or spool.unacked_bytes > 0:
            try:
                batch = await asyncio.to_thread(spool.read, self._settings.batch_events,
                                                self._settings.batch_bytes)
                if not batch.payloads and not batch.size:
                    if orphan:
                        return True
                    if self._closing:
                        return False
                    self._written.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await self._written.wait()
                    continue
                if batch.set_aside is not None:
                    await self._set_aside(spool, batch.set_aside)
                else:
                    await self._ship(spool, batch)
                await asyncio.to_thread(spool.commit, batch)
            except (grpc.aio.AioRpcError, errors.MeshError, OSError) as exc:
                SHIP_FAILURES.inc()
                log.warning("audit_ship_failed", error=repr(exc), retry_in_s=backoff)
                if self._closing:
                    return False  # kept in the spool for the next start
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._settings.retry_max_s)
                continue
            backoff = 0.1
            SHIPPED.inc(len(batch.payloads))
            SPOOL_BYTES.set(self.usage_bytes)
        return False

    @staticmethod
    async def _set_aside(spool: Spool, frame: Frame) -> None:
        """Dead-letters a region the reader could not ship (a crash before the commit that
        follows keeps it twice in `dead-letter.spool`, never ships it)."""
        await asyncio.to_thread(spool.dead_letter, [frame.payload])
        DEAD_LETTERED.labels(frame.reason).inc()
        log.error("audit_spool_frame_set_aside", reason=frame.reason, bytes=frame.size,
                  offset=frame.offset)

    async def _ship(self, spool: Spool, batch: Batch) -> None:
        """Sends one batch; an event the auditor calls invalid goes to `dead-letter.spool`."""
        if not batch.payloads:
            return
        events = [auditor_pb2.AuditEvent.FromString(p) for p in batch.payloads]
        try:
            await auditor_client.append(self._directory.channel("auditor"), events,
                                        self._timeout_s)
            return
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
        # Find the events that cannot be stored (never ours unless a bug): one at a time.
        for payload, event in zip(batch.payloads, events, strict=True):
            try:
                await auditor_client.append(self._directory.channel("auditor"), [event],
                                            self._timeout_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                await asyncio.to_thread(spool.dead_letter, [payload])
                DEAD_LETTERED.labels("refused").inc()
                log.error("audit_event_refused", event_id=event.event_id, error=exc.details())


def _remove_spool_directory(path: pathlib.Path) -> None:
    """Removes an emptied spool, and its instance directory when nothing else is left there;
    what an operator must look at (`dead-letter.spool`, or an older version's
    `rejected.spool`) stays."""
    kept = [p for p in path.iterdir() if p.name.endswith(SPOOL_SUFFIX) and not p.stem.isdigit()]
    if kept:
        for leftover in path.iterdir():
            if leftover not in kept:
                leftover.unlink()
        return
    shutil.rmtree(path)
    with contextlib.suppress(OSError):  # not empty: something else lives there
        path.parent.rmdir()


async def _finish(task: asyncio.Task[None], timeout_s: float) -> None:
    """Waits for a task to end by itself; cancels it past `timeout_s`."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await asyncio.shield(task)
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class RefuseWhenSpoolFull:
    """Admission that first checks the audit spool (`on_full=refuse`); every call is
    otherwise passed through unchanged."""

    def __init__(self, admission: Any, emitter: AuditEmitter):
        self._admission = admission
        self._emitter = emitter

    def _refuse_if_full(self) -> None:
        if self._emitter.full:
            REFUSED.inc()
            raise errors.Unavailable(
                "this gateway's audit spool is full (the auditor is unreachable); retry on "
                "another gateway or later", retry_after_s=5.0)

    async def acquire_slot(self, *args: Any, **kwargs: Any) -> Any:
        self._refuse_if_full()
        return await self._admission.acquire_slot(*args, **kwargs)

    async def release_slot(self, *args: Any, **kwargs: Any) -> Any:
        return await self._admission.release_slot(*args, **kwargs)

    async def charge_request(self, *args: Any, **kwargs: Any) -> Any:
        self._refuse_if_full()
        return await self._admission.charge_request(*args, **kwargs)
