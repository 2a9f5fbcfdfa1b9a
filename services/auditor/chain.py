"""The audit log on disk: an append-only file of hash-chained JSON records, and its verifier.

Record format (one record per line, ASCII, `\\n`-terminated; sequence numbers start at 1):

    {"seq":1,"prev":"000…000","event":{…},"hash":"9f2c…"}

- `event` is the AuditEvent as JSON (proto field names), keys sorted, no spaces.
- `prev` is the previous record's `hash`; the first record's `prev` is `GENESIS_HASH` (64 zeros).
- `hash` is the lowercase hex SHA-256 of the canonical JSON of `{"event", "prev", "seq"}`:
  `json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)`.
- The line itself must be exactly what `Record.to_line()` writes, so any byte edited on disk
  (even whitespace that leaves the parsed values alone) is caught, not only semantic edits.

Editing a record breaks its own hash; removing or reordering records breaks the `seq` run; a
rewritten record with a recomputed hash breaks the next record's `prev`. What a hash chain alone
cannot show is a cut-off tail: that needs the writer's view of the head (`AuditLog.head`), which
the running auditor compares against when it verifies.

Durability: `AuditLog.append_batch` writes a whole batch, then fsyncs once (group commit), and
only then returns; a caller acknowledges nothing before that. A crash mid-write leaves at most a
torn last line, which the next `AuditLog.open` cuts off (keeping the bytes in a side file).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import re
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from services.common import errors
from services.common.logs import get_logger

log = get_logger(__name__)

GENESIS_HASH = "0" * 64
LOG_FILE_NAME = "audit.log"
EVENT_ID_FIELD = "event_id"
MAX_EVENT_ID_LENGTH = 256

_HEX64 = re.compile(r"[0-9a-f]{64}")
_RECORD_KEYS = frozenset({"seq", "prev", "event", "hash"})
_READ_CHUNK = 1 << 16


class LogCorrupted(errors.FailedPrecondition):
    """The log's last record does not verify, so nothing can safely be chained onto it."""


class LogBusy(errors.FailedPrecondition):
    """Another process holds the log open for writing."""


class MalformedRecord(ValueError):
    """A line that is not a well-formed record (not JSON, or the wrong fields or types)."""


def canonical_json(value: Any) -> bytes:
    """The one byte form that is hashed: sorted keys, no whitespace, ASCII, no NaN."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def record_hash(seq: int, prev: str, event: dict[str, Any]) -> str:
    """The hash a record with these contents must carry."""
    return hashlib.sha256(canonical_json({"event": event, "prev": prev, "seq": seq})).hexdigest()


@dataclasses.dataclass(frozen=True)
class Record:
    """One line of the log."""

    seq: int
    prev: str  # the previous record's hash, or GENESIS_HASH for seq 1
    event: dict[str, Any]
    hash: str

    @classmethod
    def create(cls, seq: int, prev: str, event: dict[str, Any]) -> Record:
        return cls(seq, prev, event, record_hash(seq, prev, event))

    def to_line(self) -> bytes:
        """The exact bytes written to disk, trailing newline included."""
        event = canonical_json(self.event).decode("ascii")
        line = f'{{"seq":{self.seq},"prev":"{self.prev}","event":{event},"hash":"{self.hash}"}}\n'
        return line.encode("ascii")

    def hash_matches(self) -> bool:
        return self.hash == record_hash(self.seq, self.prev, self.event)


def parse_line(line: bytes) -> Record:
    """Decodes one line (with or without its newline); raises MalformedRecord on bad structure.

    Only the structure is checked here; whether the hash and the chain hold is the caller's job.
    """
    try:
        value = json.loads(line, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise MalformedRecord(f"not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise MalformedRecord("not a JSON object")
    if set(value) != _RECORD_KEYS:
        raise MalformedRecord(f"fields are {sorted(value)}, expected {sorted(_RECORD_KEYS)}")
    seq, prev, event, digest = value["seq"], value["prev"], value["event"], value["hash"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise MalformedRecord("seq is not a positive integer")
    for name, field in (("prev", prev), ("hash", digest)):
        if not isinstance(field, str) or not _HEX64.fullmatch(field):
            raise MalformedRecord(f"{name} is not 64 lowercase hex digits")
    if not isinstance(event, dict):
        raise MalformedRecord("event is not a JSON object")
    return Record(seq, prev, event, digest)


def _reject_constant(name: str) -> Any:
    """NaN and Infinity are not JSON and have no canonical form, so a line with one is bad."""
    raise ValueError(f"{name} is not allowed")


def check_event(event: Mapping[str, Any]) -> str:
    """Returns the event's id; InvalidArgument (naming the field) when it cannot be stored."""
    event_id = event.get(EVENT_ID_FIELD)
    if not isinstance(event_id, str) or not event_id:
        raise errors.InvalidArgument(EVENT_ID_FIELD, "must not be empty")
    if len(event_id) > MAX_EVENT_ID_LENGTH:
        raise errors.InvalidArgument(
            EVENT_ID_FIELD, f"is {len(event_id)} characters, at most {MAX_EVENT_ID_LENGTH}"
        )
    return event_id


@dataclasses.dataclass(frozen=True)
class Head:
    """The durable end of the log: the last record written and fsynced, and the file size."""

    sequence: int  # 0 when the log is empty
    hash: str  # GENESIS_HASH when the log is empty
    size: int  # bytes; every byte below this is fsynced and whole records


@dataclasses.dataclass(frozen=True)
class AppendResult:
    appended: int  # records written by this batch
    duplicates: int  # events dropped because their event_id was recently stored
    last_sequence: int  # the log's last sequence once the batch is durable


class AuditLog:
    """The writer's handle on one log file.

    Open with `AuditLog.open(path)`; one process at a time (an exclusive `flock`). Methods do
    blocking file I/O and fsync: call them from a worker thread, never on an event loop. They are
    thread-safe (one internal lock), so a write that outlives its caller's deadline still cannot
    interleave with the next one.
    """

    def __init__(self, path: pathlib.Path, fd: int, dedupe_window: int):
        self._path = path
        self._fd = fd
        self._dedupe_window = dedupe_window
        self._recent_ids: collections.deque[str] = collections.deque()
        self._recent_set: set[str] = set()
        self._lock = threading.Lock()
        self._head = Head(0, GENESIS_HASH, 0)
        self._needs_recovery = True
        self._closed = False

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, dedupe_window: int = 0) -> AuditLog:
        """Opens (creating if needed) the log and recovers its head from what is on disk.

        Recovery reads only the file's tail, so start-up cost does not grow with the log: a torn
        last line is cut off, the record before it must verify (else `LogCorrupted`), and the
        ids of the last `dedupe_window` records are loaded so retried events are not stored twice.
        """
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LogBusy(f"{path} is held by another process") from None
            if created:
                _fsync_directory(path.parent)  # the new file's name must survive a crash too
            audit_log = cls(path, fd, dedupe_window)
            audit_log._recover()
        except BaseException:
            os.close(fd)
            raise
        log.info("audit_log_opened", path=str(path), last_sequence=audit_log.head.sequence)
        return audit_log

    @property
    def path(self) -> pathlib.Path:
        return self._path

    @property
    def head(self) -> Head:
        """A consistent snapshot, readable without the lock (so safe on an event loop)."""
        return self._head

    def append_batch(self, events: list[dict[str, Any]]) -> AppendResult:
        """Appends the events in order, fsyncs once, then returns: the batch is durable.

        Events whose `event_id` is among the recent ids (or earlier in the batch) are skipped.
        Raises InvalidArgument before writing anything if an event has no usable id, and
        Unavailable if the disk fails; then the partial batch is cut back off (best effort) and
        the next call re-reads the head from disk first, exactly as after a crash.
        """
        ids = [check_event(event) for event in events]
        with self._lock:
            if self._closed:
                raise errors.Unavailable("the audit log is closed")
            if self._needs_recovery:
                try:
                    self._recover()
                except OSError as exc:
                    raise errors.Unavailable(
                        f"re-reading the audit log failed: {exc}", retry_after_s=1.0
                    ) from exc
            head = self._head
            seq, prev = head.sequence, head.hash
            lines: list[bytes] = []
            fresh: list[str] = []
            in_batch: set[str] = set()
            for event_id, event in zip(ids, events, strict=True):
                if self._dedupe_window and (event_id in self._recent_set or event_id in in_batch):
                    continue
                in_batch.add(event_id)
                fresh.append(event_id)
                seq += 1
                try:
                    record = Record.create(seq, prev, event)
                except (TypeError, ValueError) as exc:
                    raise errors.InvalidArgument("event", f"is not plain JSON: {exc}") from None
                lines.append(record.to_line())
                prev = record.hash
            if not lines:
                return AppendResult(0, len(events), head.sequence)
            data = b"".join(lines)
            try:
                _write_all(self._fd, data)
                os.fsync(self._fd)
            except OSError as exc:
                self._needs_recovery = True
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, head.size)
                    os.fsync(self._fd)
                log.error("audit_write_failed", path=str(self._path), error=repr(exc))
                raise errors.Unavailable(
                    f"writing the audit log failed: {exc}", retry_after_s=1.0
                ) from exc
            self._head = Head(seq, prev, head.size + len(data))
            self._remember(fresh)
            return AppendResult(len(lines), len(events) - len(lines), seq)

    def close(self) -> None:
        """Releases the file and its lock; waits for a write in progress to finish first."""
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _recover(self) -> None:
        """Sets the head (and the recent ids) from the file; called with the lock held or alone."""
        # Whatever we chain onto must be on disk, not only in the page cache (this matters after
        # a failed write, whose bytes may still be readable although they never reached disk).
        os.fsync(self._fd)
        size = os.fstat(self._fd).st_size
        end = _end_of_last_line(self._fd, size)
        # One torn line at most: bytes after the last newline, or else a last line that is not
        # a record. Our writer only ever leaves the first kind; the second is cut (and kept) too
        # so that a half-synced tail cannot stop the auditor from starting. One line more than
        # the dedupe window is read, so a record is still at hand when the last line is cut.
        lines = _last_lines(self._fd, end, max(1, self._dedupe_window) + 1)
        cut_from = end
        if end == size and lines:
            try:
                parse_line(lines[-1])
            except MalformedRecord:
                cut_from = end - len(lines[-1]) - 1
                lines.pop()
        if cut_from < size:
            self._cut_tail(cut_from, size)
        head = Head(0, GENESIS_HASH, cut_from)
        if lines:
            try:
                last = parse_line(lines[-1])
            except MalformedRecord as exc:
                raise LogCorrupted(f"{self._path}: the last record is malformed: {exc}") from None
            if not last.hash_matches() or last.to_line() != lines[-1] + b"\n":
                raise LogCorrupted(
                    f"{self._path}: the last record ({last.seq}) does not verify; "
                    "run `meshctl audit verify` and restore the log before appending"
                )
            head = Head(last.seq, last.hash, cut_from)
        self._recent_ids.clear()
        self._recent_set.clear()
        if self._dedupe_window:
            self._remember(_event_ids(lines[-self._dedupe_window :]))
        self._head = head
        self._needs_recovery = False

    def _cut_tail(self, start: int, size: int) -> None:
        """Moves the bytes [start, size) into a side file (kept as evidence), then truncates."""
        torn = os.pread(self._fd, size - start, start)
        aside = self._path.with_name(f"{self._path.name}.torn-{time.time_ns()}")
        with open(aside, "wb") as side:
            side.write(torn)
            side.flush()
            os.fsync(side.fileno())
        os.ftruncate(self._fd, start)
        os.fsync(self._fd)
        _fsync_directory(self._path.parent)
        log.warning(
            "audit_torn_tail_cut", path=str(self._path), offset=start, bytes=len(torn),
            saved_to=str(aside),
        )

    def _remember(self, ids: Iterable[str]) -> None:
        if not self._dedupe_window:
            return
        for event_id in ids:
            if event_id in self._recent_set:
                continue
            self._recent_ids.append(event_id)
            self._recent_set.add(event_id)
            if len(self._recent_ids) > self._dedupe_window:
                self._recent_set.discard(self._recent_ids.popleft())


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records: int  # records that verified, i.e. the intact prefix 1..records
    first_bad_sequence: int  # -1 when ok
    problem: str  # "" when ok; otherwise what is wrong with record first_bad_sequence
    last_hash: str  # hash of the last record that verified (GENESIS_HASH if none)
    torn_tail_bytes: int = 0  # an unterminated final write, ignored (never acknowledged)


def verify(path: str | os.PathLike[str], *, limit_bytes: int | None = None) -> VerifyResult:
    """Re-walks the whole chain from the first record and stops at the first record that fails.

    Checks, per line: it is a well-formed record, its bytes are canonical and its hash matches
    (else it was edited), its `seq` is the next number (else records were removed or
    reordered), its `prev` is the previous record's hash (else a record was rewritten with a
    recomputed hash). `limit_bytes` stops at that offset, so a live log can be checked up to
    its durable head. A final line with no newline is a torn write and is reported, not failed.
    `path` is the log file or the data directory that holds it (`LOG_FILE_NAME`). Raises
    FileNotFoundError when there is no log there. Reads in O(1) memory.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / LOG_FILE_NAME
    expected, prev, offset = 1, GENESIS_HASH, 0
    with open(path, "rb") as file:
        while limit_bytes is None or offset < limit_bytes:
            line = file.readline() if limit_bytes is None else file.readline(limit_bytes - offset)
            if not line:
                break
            if not line.endswith(b"\n"):
                return _verified(expected - 1, prev, torn_tail_bytes=len(line))
            offset += len(line)
            problem, digest = _check_record(line, expected, prev)
            if problem:
                return VerifyResult(False, expected - 1, expected, problem, prev)
            prev = digest
            expected += 1
    return _verified(expected - 1, prev)


def _check_record(line: bytes, expected: int, prev: str) -> tuple[str, str]:
    """(what is wrong with `line` as record `expected` after hash `prev` or "", its hash)."""
    try:
        record = parse_line(line)
    except MalformedRecord as exc:
        return f"record {expected} is malformed: {exc}", ""
    if not record.hash_matches():
        return f"record {expected} does not match its hash (edited on disk)", record.hash
    if record.to_line() != line:
        return f"record {expected} is not in canonical form (edited on disk)", record.hash
    if record.seq != expected:
        return (
            f"expected record {expected} but found record {record.seq} "
            "(records were removed or reordered)"
        ), record.hash
    if record.prev != prev:
        return (
            f"record {expected} does not chain to record {expected - 1} "
            "(one of the two was rewritten)"
        ), record.hash
    return "", record.hash


def _verified(records: int, last_hash: str, torn_tail_bytes: int = 0) -> VerifyResult:
    return VerifyResult(True, records, -1, "", last_hash, torn_tail_bytes)


def format_result(result: VerifyResult) -> str:
    """One human line for `meshctl audit verify`."""
    if not result.ok:
        return (
            f"audit chain BROKEN at record {result.first_bad_sequence} "
            f"({result.records} records verified before it): {result.problem}"
        )
    line = f"audit chain OK: {result.records} records, head {result.last_hash}"
    if result.torn_tail_bytes:
        line += f" (ignored an unfinished final write of {result.torn_tail_bytes} bytes)"
    return line


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_directory(directory: pathlib.Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _end_of_last_line(fd: int, size: int) -> int:
    """The offset just past the file's last newline (0 when there is none)."""
    position = size
    while position > 0:
        step = min(_READ_CHUNK, position)
        position -= step
        chunk = os.pread(fd, step, position)
        index = chunk.rfind(b"\n")
        if index >= 0:
            return position + index + 1
    return 0


def _last_lines(fd: int, end: int, count: int) -> list[bytes]:
    """Up to `count` whole lines ending at offset `end` (just past a newline), oldest first,
    without their newlines. Reads backwards, so the cost follows `count`, not the file size."""
    found: list[bytes] = []
    pending = b""  # the front of the region read so far: a line whose start lies further back
    position = end
    while position > 0 and len(found) < count:
        step = min(_READ_CHUNK, position)
        position -= step
        pieces = (os.pread(fd, step, position) + pending).split(b"\n")
        # pieces[-1] is the empty text after the region's final newline.
        found.extend(reversed(pieces[1:-1]))
        pending = pieces[0] + b"\n"
        if position == 0:
            found.append(pieces[0])
    del found[count:]
    found.reverse()
    return found


def _event_ids(lines: Iterable[bytes]) -> list[str]:
    """The event ids in these lines, skipping any line that does not parse (verify reports it)."""
    ids = []
    for line in lines:
        try:
            event_id = parse_line(line).event.get(EVENT_ID_FIELD)
        except MalformedRecord:
            continue
        if isinstance(event_id, str) and event_id:
            ids.append(event_id)
    return ids
