"""`meshctl audit verify`: re-walks every record, the Merkle tree and every signed checkpoint,
and names the first record that was modified, removed, reordered or truncated.

What each check catches:
- a record's own hash: an edited record (`record N does not match its hash`);
- the sequence run and segment names: removed or reordered records, a removed segment;
- the `prev` chain: a record rewritten with a recomputed hash;
- every signed checkpoint (in the log, and any trusted one given, e.g. from etcd) against the
  tree recomputed from the records: a suffix rewritten with recomputed hashes, a cut-off tail
  (the log ends before a checkpoint's size), old segments deleted beyond the signed retention
  floor (`first`), and forged checkpoints (bad signature).

It runs in one pass and O(log n) memory. The trust anchor is the public key: by default the
key file beside the log (which catches accidents and anyone who cannot also rewrite that
file); pass keys and checkpoints from etcd (`meshctl audit verify --etcd`) so that rewriting
the disk is not enough.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Iterable, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from services.auditor import merkle
from services.auditor.checkpoints import BadCheckpoint, Checkpoint
from services.auditor.reader import local_keys, view_of
from services.auditor.records import GENESIS_HASH, check_record
from services.auditor.store import LogView, Segment


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    ok: bool
    first_sequence: int  # the first record kept (records before it were dropped by retention)
    last_sequence: int  # the last record that verified (first_sequence - 1 if none)
    first_bad_sequence: int  # -1 when ok
    problem: str  # "" when ok
    root: bytes  # Merkle root of the records that verified
    checkpoints: int  # signed checkpoints compared with the recomputed tree
    torn_tail_bytes: int = 0  # an unfinished final write, ignored (never acknowledged)

    @property
    def records(self) -> int:
        return self.last_sequence - self.first_sequence + 1


class _Broken(Exception):
    def __init__(self, sequence: int, problem: str):
        super().__init__(problem)
        self.sequence = sequence
        self.problem = problem


class _Walk:
    """The state of one verification pass."""

    def __init__(
        self, keys: Mapping[str, Ed25519PublicKey], trusted: Iterable[Checkpoint],
        up_to: int | None,
    ):
        self.keys = keys
        self.up_to = up_to
        self.frontier = merkle.Frontier()
        self.prev = GENESIS_HASH
        self.first = 1
        self.last_good = 0  # the largest checkpoint size that matched
        self.compared = 0
        self.expected: list[tuple[Checkpoint, str]] = []  # still to compare, any order
        self.latest: Checkpoint | None = None  # the newest signed checkpoint seen
        for checkpoint in trusted:
            self.add(checkpoint, "trusted")

    def add(self, checkpoint: Checkpoint, where: str) -> None:
        if self.up_to is not None and checkpoint.size > self.up_to:
            return  # signed after the view was taken
        if not checkpoint.signed_by(self.keys):
            raise _Broken(self.frontier.size + 1,
                          f"the checkpoint of {checkpoint.size} records in {where} is not "
                          f"signed by a trusted key (key {checkpoint.key_id or 'none'})")
        if self.latest is None or checkpoint.at >= self.latest.at:
            self.latest = checkpoint
        self.expected.append((checkpoint, where))

    def compare(self) -> None:
        """Checks every checkpoint whose size the tree has just reached."""
        size = self.frontier.size
        due = [entry for entry in self.expected if entry[0].size == size]
        if not due:
            return
        self.expected = [entry for entry in self.expected if entry[0].size != size]
        root = self.frontier.root()
        for checkpoint, where in due:
            if checkpoint.root != root or checkpoint.head != self.prev:
                start = max(self.last_good, self.first - 1) + 1
                raise _Broken(start, (
                    f"records {start}..{size} do not match the signed checkpoint of {size} "
                    f"records in {where} (rewritten, with their hashes recomputed)"))
            self.compared += 1
        self.last_good = size


def verify(
    data_dir: str | pathlib.Path, *, keys: Mapping[str, Ed25519PublicKey] | None = None,
    trusted: Iterable[Checkpoint] = (), view: LogView | None = None, up_to: int | None = None,
) -> VerifyResult:
    """Verifies the log in `data_dir` (FileNotFoundError when there is none).

    `keys`: the trusted public keys by key id (default: the key file beside the log).
    `trusted`: checkpoints from outside the log (e.g. the latest one published to etcd).
    `view`, `up_to`: verify only what the running writer had made durable: the view's bytes,
    and checkpoints of at most `up_to` records.
    """
    data_dir = pathlib.Path(data_dir)
    view = view or view_of(data_dir)
    walk = _Walk(keys if keys is not None else local_keys(data_dir), trusted, up_to)
    torn = 0
    try:
        torn = _walk_segments(view, walk)
        leftover = sorted(walk.expected, key=lambda entry: entry[0].size)
        below = [entry for entry in leftover if entry[0].size < walk.first - 1]
        if below:
            walk.expected = [entry for entry in leftover if entry not in below]
        if walk.expected:
            checkpoint, where = min(walk.expected, key=lambda entry: entry[0].size)
            size = walk.frontier.size
            raise _Broken(size + 1, (
                f"the log ends at record {size}, but the signed checkpoint in {where} covers "
                f"{checkpoint.size} records: records {size + 1}..{checkpoint.size} were "
                "removed (truncated)"))
        if walk.latest is not None and walk.first > walk.latest.first:
            floor = walk.latest.first
            raise _Broken(floor, (
                f"records {floor}..{walk.first - 1} are missing, but the newest signed "
                f"checkpoint keeps every record from {floor} (removed beyond retention)"))
    except _Broken as broken:
        return VerifyResult(False, walk.first, walk.frontier.size, broken.sequence,
                            broken.problem, walk.frontier.root(), walk.compared, torn)
    return VerifyResult(True, walk.first, walk.frontier.size, -1, "", walk.frontier.root(),
                        walk.compared, torn)


def _walk_segments(view: LogView, walk: _Walk) -> int:
    """Walks every segment; returns the size of an unfinished final write (0 if none)."""
    for index, segment in enumerate(view.segments):
        base = _segment_checkpoints(segment, walk, anchor=index == 0)
        if index == 0:
            walk.first = segment.first
            try:
                walk.frontier = base.frontier_state()
            except BadCheckpoint as exc:
                raise _Broken(segment.first, str(exc)) from None
            walk.prev = base.head
            walk.last_good = base.size
            walk.compare()
        elif segment.first != walk.frontier.size + 1:
            missing_from = walk.frontier.size + 1
            raise _Broken(missing_from, (
                f"records {missing_from}..{segment.first - 1} are missing "
                f"(a segment was removed before {segment.log_path.name})"))
        else:
            walk.compare()  # the segment's base checkpoint, at the size reached so far
        limit = view.end if index == len(view.segments) - 1 else None
        torn = _walk_records(segment, walk, limit)
        if torn:
            return torn
    return 0


def _segment_checkpoints(segment: Segment, walk: _Walk, *, anchor: bool) -> Checkpoint:
    """Reads and checks a segment's checkpoints; returns its base (the first line)."""
    where = segment.checkpoint_path.name
    try:
        raw = segment.checkpoint_path.read_bytes()
    except FileNotFoundError:
        raise _Broken(segment.first, f"{where} is missing: the records from "
                      f"{segment.first} on cannot be checked against a signed tree") from None
    base = None
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line:
            continue
        if not raw.endswith(b"\n") and number == raw.count(b"\n") + 1:
            break  # a torn last checkpoint line: never published
        try:
            checkpoint = Checkpoint.from_line(line)
        except BadCheckpoint as exc:
            raise _Broken(segment.first, f"{where} line {number}: {exc}") from None
        walk.add(checkpoint, f"{where} line {number}")
        if base is None:
            base = checkpoint
    if base is None or base.size != segment.first - 1:
        raise _Broken(segment.first, f"{where} does not start with the checkpoint of the "
                      f"{segment.first - 1} records before the segment")
    if anchor and segment.first > 1 and not base.frontier:
        raise _Broken(segment.first, f"{where}: the first checkpoint has no frontier")
    return base


def _walk_records(segment: Segment, walk: _Walk, limit: int | None) -> int:
    try:
        file = open(segment.log_path, "rb")
    except FileNotFoundError:
        raise _Broken(segment.first, f"{segment.log_path.name} is missing") from None
    offset = 0
    with file:
        for line in file:
            if limit is not None and offset + len(line) > limit:
                return 0
            if not line.endswith(b"\n"):
                return len(line)
            offset += len(line)
            expected = walk.frontier.size + 1
            record, problem = check_record(line, expected, walk.prev)
            if problem or record is None:
                raise _Broken(expected, problem)
            walk.frontier.append(merkle.leaf_hash(line[:-1]))
            walk.prev = record.hash
            walk.compare()
    return 0


def format_result(result: VerifyResult) -> str:
    """One human line for `meshctl audit verify`."""
    if not result.ok:
        return (f"audit log BROKEN at record {result.first_bad_sequence} "
                f"({result.records} records verified before it): {result.problem}")
    line = (f"audit log OK: records {result.first_sequence}..{result.last_sequence}, "
            f"root {result.root.hex()}, {result.checkpoints} signed checkpoints match")
    if result.torn_tail_bytes:
        line += f" (ignored an unfinished final write of {result.torn_tail_bytes} bytes)"
    return line
