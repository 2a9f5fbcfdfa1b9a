"""The audit log on disk: segments of records, each with its file of signed checkpoints.

    <data dir>/
      LOCK                                one writer at a time (flock)
      signing.pub.json                    the public key, for offline verification
      segments/00000000000000000001.log   records 1 … (records.py), one per line
      segments/00000000000000000001.ckpt  checkpoints (checkpoints.py), one per line
      segments/00000000000000004097.log   records 4097 … once the first segment rotated
      segments/00000000000000004097.ckpt  its first line is the checkpoint at size 4096

A segment is named by its first sequence number. The first line of its `.ckpt` file is the
signed checkpoint of the tree just before it (size = first - 1), with the Merkle frontier, so a
segment can be verified, and its proofs built, after every older segment was dropped.

Durability: `AuditLog.append` writes a batch and fdatasyncs once before it returns (group
commit: the caller merges concurrent batches into one call). A crash leaves at most a torn last
line in the newest segment (and in its `.ckpt`), which the next `open` moves to a side file and
truncates. Rotation writes the new segment's `.ckpt` (via rename) before its `.log`, and a
retention drop first signs a checkpoint with the new floor, so each step is safe to interrupt.

Restart cost does not grow with the log: `open` replays only the records after the newest
checkpoint, starting from the checkpoint's frontier and byte offset.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from services.auditor import merkle
from services.auditor.checkpoints import BadCheckpoint, Checkpoint, Signer
from services.auditor.records import (
    EVENT_ID_FIELD,
    GENESIS_HASH,
    MalformedRecord,
    Record,
    check_event,
    check_record,
    parse_line,
)
from services.common import errors
from services.common.files import append_durably, fsync_directory, write_all
from services.common.logs import get_logger

log = get_logger(__name__)

SEGMENTS_DIR = "segments"
LOCK_FILE = "LOCK"
PUBLIC_KEY_FILE = "signing.pub.json"
LOG_SUFFIX = ".log"
CHECKPOINT_SUFFIX = ".ckpt"
INDEX_SUFFIX = ".idx"  # a sealed segment's query index (services/auditor/index.py), not evidence
_READ_CHUNK = 1 << 16


class LogCorrupted(errors.FailedPrecondition):
    """What is on disk does not verify where the writer must chain on; nothing is appended."""


class LogBusy(errors.FailedPrecondition):
    """Another process holds the log open for writing."""


@dataclasses.dataclass(frozen=True)
class Segment:
    directory: pathlib.Path
    first: int  # sequence number of its first record

    @property
    def log_path(self) -> pathlib.Path:
        return self.directory / f"{self.first:020d}{LOG_SUFFIX}"

    @property
    def checkpoint_path(self) -> pathlib.Path:
        return self.directory / f"{self.first:020d}{CHECKPOINT_SUFFIX}"

    @property
    def index_path(self) -> pathlib.Path:
        return self.directory / f"{self.first:020d}{INDEX_SUFFIX}"


def list_segments(data_dir: pathlib.Path) -> list[Segment]:
    """Every segment that has a `.log` or a `.ckpt` file, oldest first."""
    directory = data_dir / SEGMENTS_DIR
    firsts: set[int] = set()
    with contextlib.suppress(FileNotFoundError):
        for path in directory.iterdir():
            if path.suffix in (LOG_SUFFIX, CHECKPOINT_SUFFIX) and path.stem.isdigit():
                firsts.add(int(path.stem))
    return [Segment(directory, first) for first in sorted(firsts)]


@dataclasses.dataclass(frozen=True)
class Head:
    """The durable end of the log."""

    sequence: int  # 0 when empty
    hash: str  # chain hash of record `sequence`; GENESIS_HASH when empty
    at: int  # `at` of record `sequence` (Unix ms); 0 when empty


@dataclasses.dataclass(frozen=True)
class LogView:
    """What a reader may read: these segments, the last one only up to `end` bytes (the
    writer's durable size), or to its last whole line when `end` is None (files at rest)."""

    segments: tuple[Segment, ...]
    end: int | None
    head: Head
    checkpoint: Checkpoint | None  # the newest signed checkpoint


@dataclasses.dataclass(frozen=True)
class AppendResult:
    sequences: list[int]  # one per event: where it is stored (an earlier copy for duplicates)
    appended: int
    duplicates: int
    last_sequence: int


@dataclasses.dataclass(frozen=True)
class LogOptions:
    segment_max_bytes: int = 64 << 20
    segment_max_age_s: float = 3600.0
    dedupe_window: int = 65_536  # recent event ids refused a second time; 0 = off


class AuditLog:
    """The writer's handle. Open with `AuditLog.open(...)`; one process at a time (flock).

    Methods do blocking file I/O and fsync: call them from a worker thread, never on an event
    loop. They are thread-safe (one lock), so appends, checkpoints and retention never
    interleave on disk.
    """

    def __init__(
        self, data_dir: pathlib.Path, lock_fd: int, signer: Signer, options: LogOptions,
        clock: Callable[[], float],
    ):
        self._dir = data_dir
        self._lock_fd = lock_fd
        self._signer = signer
        self._options = options
        self._clock = clock
        self._lock = threading.Lock()
        self._recent: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._segment = Segment(data_dir / SEGMENTS_DIR, 1)
        self._log_fd = -1
        self._ckpt_fd = -1
        self._size = 0  # durable bytes of the current segment
        self._segment_started = 0.0  # clock() when its first record was written
        self._head = Head(0, GENESIS_HASH, 0)
        self._frontier = merkle.Frontier()
        self._first = 1
        self._checkpoint: Checkpoint | None = None
        self._needs_recovery = True
        self._closed = False

    @classmethod
    def open(
        cls, data_dir: str | os.PathLike[str], signer: Signer, options: LogOptions = LogOptions(),
        *, clock: Callable[[], float] = time.time,
    ) -> AuditLog:
        """Opens (creating if needed) the log and recovers its head from what is on disk."""
        data_dir = pathlib.Path(data_dir)
        (data_dir / SEGMENTS_DIR).mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LogBusy(f"{data_dir} is held by another auditor process") from None
            audit_log = cls(data_dir, lock_fd, signer, options, clock)
            audit_log._write_public_key()
            audit_log._recover()
        except BaseException:
            os.close(lock_fd)
            raise
        log.info("audit_log_opened", path=str(data_dir), last_sequence=audit_log.head.sequence,
                 segment=audit_log._segment.first, key_id=signer.key_id)
        return audit_log

    @property
    def data_dir(self) -> pathlib.Path:
        return self._dir

    @property
    def head(self) -> Head:
        """A consistent snapshot, readable without the lock (so safe on an event loop)."""
        return self._head

    @property
    def latest_checkpoint(self) -> Checkpoint | None:
        return self._checkpoint

    def view(self) -> LogView:
        with self._lock:
            return LogView(tuple(list_segments(self._dir)), self._size, self._head,
                           self._checkpoint)

    def append(self, events: list[dict[str, Any]]) -> AppendResult:
        """Appends the events in order, fdatasyncs once, then returns: the batch is durable.

        An event whose `event_id` was stored recently (or earlier in the batch) is not stored
        again; its result names the earlier copy. InvalidArgument before anything is written
        if an event cannot be stored; Unavailable if the disk fails (the partial batch is cut
        off, and the next call re-reads the head from disk first, as after a crash).
        """
        ids = [check_event(event) for event in events]
        with self._lock:
            self._ready()
            if self._rotation_due():
                self._guarded(self._rotate)
            head = self._head
            seq, prev = head.sequence, head.hash
            at = max(int(self._clock() * 1000), head.at)
            frontier = self._frontier.copy()
            lines: list[bytes] = []
            sequences: list[int] = []
            fresh: dict[str, int] = {}
            for event_id, event in zip(ids, events, strict=True):
                known = self._recent.get(event_id) or fresh.get(event_id)
                if known is not None:
                    sequences.append(known)
                    continue
                seq += 1
                try:
                    record, line = Record.create(seq, at, prev, event)
                except (TypeError, ValueError) as exc:
                    raise errors.InvalidArgument("event", f"is not plain JSON: {exc}") from None
                frontier.append(merkle.leaf_hash(line[:-1]))
                lines.append(line)
                prev = record.hash
                if self._options.dedupe_window:
                    fresh[event_id] = seq
                sequences.append(seq)
            if not lines:
                return AppendResult(sequences, 0, len(events), head.sequence)
            data = b"".join(lines)
            self._guarded(lambda: append_durably(self._log_fd, data, self._size))
            if not self._size:
                self._segment_started = self._clock()
            self._size += len(data)
            self._head = Head(seq, prev, at)
            self._frontier = frontier
            self._remember(fresh)
            return AppendResult(sequences, len(lines), len(events) - len(lines), seq)

    def checkpoint(self) -> Checkpoint | None:
        """Signs the current head into the log if it moved since the last checkpoint."""
        with self._lock:
            self._ready()
            latest = self._checkpoint
            if latest is not None and (latest.size, latest.first) == (
                self._head.sequence, self._first
            ):
                return None
            return self._guarded(self._write_checkpoint)

    def drop_segments(self, older_than_ms: int) -> list[int]:
        """Retention: deletes whole segments (never the current one) whose every record is
        older than `older_than_ms`, oldest first. Returns the first sequences dropped.

        What remains still verifies: the next segment's `.ckpt` starts with the signed
        checkpoint (frontier included) of everything before it, and a checkpoint carrying the
        new floor (`first`) is signed before any file is deleted.
        """
        with self._lock:
            self._ready()
            segments = list_segments(self._dir)
            dropped: list[Segment] = []
            for segment in segments[:-1]:
                last = _last_record(segment.log_path)
                if last is not None and last.at >= older_than_ms:
                    break
                dropped.append(segment)
            if not dropped:
                return []
            self._first = segments[len(dropped)].first
            self._guarded(self._write_checkpoint)
            for segment in dropped:
                for path in (segment.log_path, segment.checkpoint_path, segment.index_path):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
            fsync_directory(self._dir / SEGMENTS_DIR)
            log.info("audit_segments_dropped", segments=[s.first for s in dropped],
                     first_kept=self._first)
            return [segment.first for segment in dropped]

    def close(self) -> None:
        """Signs a last checkpoint, then releases the files and the lock."""
        with self._lock:
            if self._closed:
                return
            if not self._needs_recovery and (
                self._checkpoint is None or self._checkpoint.size != self._head.sequence
            ):
                with contextlib.suppress(OSError):
                    self._write_checkpoint()
            self._closed = True
            for fd in (self._log_fd, self._ckpt_fd, self._lock_fd):
                if fd >= 0:
                    os.close(fd)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- writing -------------------------------------------------------------------------------

    def _ready(self) -> None:
        if self._closed:
            raise errors.Unavailable("the audit log is closed")
        if self._needs_recovery:
            try:
                self._recover()
            except OSError as exc:
                raise errors.Unavailable(
                    f"re-reading the audit log failed: {exc}", retry_after_s=1.0
                ) from exc

    def _guarded(self, write: Callable[[], Any]) -> Any:
        """Runs a disk write; on an OSError the next call recovers from disk first."""
        try:
            return write()
        except OSError as exc:
            self._needs_recovery = True
            log.error("audit_write_failed", path=str(self._dir), error=repr(exc))
            raise errors.Unavailable(
                f"writing the audit log failed: {exc}", retry_after_s=1.0
            ) from exc

    def _rotation_due(self) -> bool:
        if not self._size:
            return False
        return (self._size >= self._options.segment_max_bytes
                or self._clock() - self._segment_started >= self._options.segment_max_age_s)

    def _signed_checkpoint(self, offset: int) -> Checkpoint:
        return self._signer.sign(Checkpoint(
            size=self._head.sequence, root=self._frontier.root(), head=self._head.hash,
            first=self._first, at=max(int(self._clock() * 1000), self._head.at),
            frontier=tuple(self._frontier.hashes), offset=offset,
        ))

    def _write_checkpoint(self) -> Checkpoint:
        checkpoint = self._signed_checkpoint(self._size)
        write_all(self._ckpt_fd, checkpoint.to_line())
        os.fdatasync(self._ckpt_fd)
        self._checkpoint = checkpoint
        return checkpoint

    def _rotate(self) -> None:
        """Closes the current segment and starts the next at head + 1."""
        self._start_segment(Segment(self._dir / SEGMENTS_DIR, self._head.sequence + 1))
        log.info("audit_segment_rotated", first=self._segment.first)

    def _start_segment(self, segment: Segment) -> None:
        """Writes the segment's base checkpoint (via a renamed file), then its empty log."""
        checkpoint = self._signed_checkpoint(0)
        temporary = segment.checkpoint_path.with_name(segment.checkpoint_path.name + ".tmp")
        with open(temporary, "wb") as file:
            file.write(checkpoint.to_line())
            file.flush()
            os.fsync(file.fileno())
        os.rename(temporary, segment.checkpoint_path)
        log_fd = os.open(segment.log_path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         0o640)
        os.fsync(log_fd)
        fsync_directory(segment.directory)
        self._switch_to(segment, log_fd, 0)
        self._checkpoint = checkpoint

    def _switch_to(self, segment: Segment, log_fd: int, size: int) -> None:
        for fd in (self._log_fd, self._ckpt_fd):
            if fd >= 0:
                os.close(fd)
        self._segment = segment
        self._log_fd = log_fd
        self._ckpt_fd = os.open(segment.checkpoint_path,
                                os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        self._size = size
        self._segment_started = self._clock()

    def _remember(self, ids: Mapping[str, int]) -> None:
        window = self._options.dedupe_window
        if not window:
            return
        for event_id, seq in ids.items():
            self._recent[event_id] = seq
            self._recent.move_to_end(event_id)
        while len(self._recent) > window:
            self._recent.popitem(last=False)

    def _write_public_key(self) -> None:
        path = self._dir / PUBLIC_KEY_FILE
        record = _json_line(self._signer.public_record())
        if path.exists() and path.read_bytes() == record:
            return
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_bytes(record)
        os.rename(temporary, path)
        fsync_directory(self._dir)

    # -- recovery ------------------------------------------------------------------------------

    def _recover(self) -> None:
        """Sets head, frontier and recent ids from disk; called with the lock held or alone."""
        for stale in (self._dir / SEGMENTS_DIR).glob("*.tmp"):
            stale.unlink()
        segments = list_segments(self._dir)
        if not segments:
            self._head, self._frontier, self._first = Head(0, GENESIS_HASH, 0), merkle.Frontier(), 1
            self._start_segment(Segment(self._dir / SEGMENTS_DIR, 1))
            self._recent.clear()
            self._needs_recovery = False
            return
        current = segments[-1]
        if not current.checkpoint_path.exists():
            raise LogCorrupted(f"{current.log_path} has no checkpoint file "
                               f"({current.checkpoint_path.name}); run `meshctl audit verify`")
        log_fd = os.open(current.log_path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         0o640)
        try:
            os.fsync(log_fd)  # chain only onto what is on disk, not merely in the page cache
            size = _cut_torn_tail(log_fd, current.log_path, _is_record)
            with open(current.checkpoint_path, "rb+") as ckpt_file:
                _cut_torn_tail(ckpt_file.fileno(), current.checkpoint_path, _is_checkpoint)
            latest = _last_checkpoint(current)
            frontier = latest.frontier_state()
            head = self._replay(current, log_fd, size, latest, frontier)
        except BaseException:
            os.close(log_fd)
            raise
        self._switch_to(current, log_fd, size)
        if size:
            first_record = _first_record(current.log_path)
            if first_record is not None:
                self._segment_started = first_record.at / 1000
        self._head, self._frontier, self._checkpoint = head, frontier, latest
        self._first = max(segments[0].first, latest.first)
        self._recent.clear()
        if self._options.dedupe_window:
            self._remember(dict(_recent_ids(segments, size, self._options.dedupe_window)))
        self._needs_recovery = False

    def _replay(
        self, segment: Segment, fd: int, size: int, latest: Checkpoint, frontier: merkle.Frontier
    ) -> Head:
        """Re-walks the records after `latest` in `segment`, extending `frontier` in place.

        Nothing before the checkpoint is trusted or re-hashed: the frontier comes from the
        signed checkpoint, so later checkpoints still cover the original records even if
        someone edited one of them (which `verify` then names).
        """
        start = latest.offset
        if not _ends_with_record(fd, size, start, latest):
            # The byte hint is off (bytes before it were edited): find the record by number.
            start = _offset_after_line(fd, size, latest.size - segment.first + 1)
            if start is None:
                raise LogCorrupted(
                    f"{segment.log_path} ends before record {latest.size}, which a signed "
                    "checkpoint covers: acknowledged records are missing; run "
                    "`meshctl audit verify`")
            if not _ends_with_record(fd, size, start, latest):
                raise LogCorrupted(f"{segment.log_path}: record {latest.size} does not match "
                                   "its signed checkpoint; run `meshctl audit verify`")
        # The checkpoint's time is a floor for the next record's: signed after its records.
        head = Head(latest.size, latest.head, latest.at)
        offset = start
        for line in _lines(fd, start, size):
            record, problem = check_record(line, head.sequence + 1, head.hash)
            if problem or record is None:
                raise LogCorrupted(f"{segment.log_path} at byte {offset}: {problem}; "
                                   "run `meshctl audit verify`")
            frontier.append(merkle.leaf_hash(line[:-1]))
            head = Head(record.seq, record.hash, record.at)
            offset += len(line)
        return head


def _ends_with_record(fd: int, size: int, offset: int, checkpoint: Checkpoint) -> bool:
    """Does the whole, unedited record `checkpoint.size` end exactly at `offset`?"""
    if offset > size:
        return False
    if offset == 0:
        return True  # a segment's base checkpoint: the record lies in the previous segment
    before = _last_lines(fd, offset, 1)
    line = before[0] + b"\n" if before else b""
    record = _parse_or_none(line)
    return (record is not None and record.hash_matches() and record.to_line() == line
            and (record.seq, record.hash) == (checkpoint.size, checkpoint.head))


def _offset_after_line(fd: int, size: int, count: int) -> int | None:
    """The offset just past the file's `count`-th line; None if it has fewer."""
    if count <= 0:
        return 0
    offset = 0
    for index, line in enumerate(_lines(fd, 0, size), start=1):
        offset += len(line)
        if index == count:
            return offset
    return None


# -- file helpers ----------------------------------------------------------------------------

def _json_line(value: Any) -> bytes:
    return (json.dumps(value, sort_keys=True, separators=(",", ":")) + "\n").encode()


def _parse_or_none(line: bytes) -> Record | None:
    try:
        return parse_line(line)
    except MalformedRecord:
        return None


def _is_record(line: bytes) -> bool:
    return _parse_or_none(line) is not None


def _is_checkpoint(line: bytes) -> bool:
    try:
        Checkpoint.from_line(line)
    except BadCheckpoint:
        return False
    return True


def _cut_torn_tail(fd: int, path: pathlib.Path, whole: Callable[[bytes], bool]) -> int:
    """Cuts at most one torn line off the end of the file (bytes after the last newline, or
    else a last line that does not parse) into a side file kept as evidence; returns the size.

    A writer that crashed leaves only the first kind; the second is cut too, so that a
    half-synced tail cannot stop the auditor from starting.
    """
    size = os.fstat(fd).st_size
    end = _end_of_last_line(fd, size)
    cut_from = end
    if end == size:
        last = _last_lines(fd, end, 1)
        if last and not whole(last[0]):
            cut_from = end - len(last[0]) - 1
    if cut_from == size:
        return size
    torn = os.pread(fd, size - cut_from, cut_from)
    aside = path.with_name(f"{path.name}.torn-{time.time_ns()}")
    with open(aside, "wb") as side:
        side.write(torn)
        side.flush()
        os.fsync(side.fileno())
    os.ftruncate(fd, cut_from)
    os.fsync(fd)
    fsync_directory(path.parent)
    log.warning("audit_torn_tail_cut", path=str(path), offset=cut_from, bytes=len(torn),
                saved_to=str(aside))
    return cut_from


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
        found.extend(reversed(pieces[1:-1]))  # pieces[-1] is the text after the final newline
        pending = pieces[0] + b"\n"
        if position == 0:
            found.append(pieces[0])
    del found[count:]
    found.reverse()
    return found


def _lines(fd: int, start: int, end: int) -> Iterator[bytes]:
    """Whole lines (newline included) in [start, end), which must end just past a newline."""
    position = start
    pending = b""
    while position < end:
        chunk = os.pread(fd, min(_READ_CHUNK, end - position), position)
        if not chunk:
            break
        position += len(chunk)
        pieces = (pending + chunk).split(b"\n")
        pending = pieces.pop()
        for piece in pieces:
            yield piece + b"\n"


def _first_record(path: pathlib.Path) -> Record | None:
    with open(path, "rb") as file:
        return _parse_or_none(file.readline())


def _last_record(path: pathlib.Path) -> Record | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        end = _end_of_last_line(fd, os.fstat(fd).st_size)
        last = _last_lines(fd, end, 1)
    finally:
        os.close(fd)
    return _parse_or_none(last[0]) if last else None


def _last_checkpoint(segment: Segment) -> Checkpoint:
    with open(segment.checkpoint_path, "rb") as file:
        fd = file.fileno()
        last = _last_lines(fd, _end_of_last_line(fd, os.fstat(fd).st_size), 1)
    if not last:
        raise LogCorrupted(f"{segment.checkpoint_path} holds no checkpoint; "
                           "run `meshctl audit verify`")
    try:
        return Checkpoint.from_line(last[0])
    except BadCheckpoint as exc:
        raise LogCorrupted(f"{segment.checkpoint_path}: {exc}") from None


def _recent_ids(segments: list[Segment], current_size: int, count: int) -> list[tuple[str, int]]:
    """(event id, sequence) of the last `count` records, oldest first, across segments."""
    found: list[tuple[str, int]] = []
    for index, segment in enumerate(reversed(segments)):
        if len(found) >= count:
            break
        with contextlib.suppress(FileNotFoundError), open(segment.log_path, "rb") as file:
            fd = file.fileno()
            end = current_size if index == 0 else _end_of_last_line(fd, os.fstat(fd).st_size)
            for line in reversed(_last_lines(fd, end, count - len(found))):
                record = _parse_or_none(line)
                event_id = record.event.get(EVENT_ID_FIELD) if record else None
                if record is not None and isinstance(event_id, str) and event_id:
                    found.append((event_id, record.seq))
    found.reverse()
    return found
