"""Reading the log without writing it: records in order, queries, and Merkle proofs.

Everything here works on a `LogView` (which segments, and how far into the last one), taken
either from the running writer (`AuditLog.view()`, so only durable records are read) or from
the files alone (`view_of(data_dir)`, for `meshctl` on the auditor's host). Reads follow the
records' positions: whether the bytes are genuine is `verify.py`'s question, and a proof built
from edited bytes does not match its signed checkpoint, which `proof.check()` reports.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import json
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from services.auditor import index, merkle
from services.auditor.checkpoints import BadCheckpoint, Checkpoint, parse_public_record
from services.auditor.records import MalformedRecord, Record, canonical_json, parse_line
from services.auditor.store import (
    GENESIS_HASH,
    PUBLIC_KEY_FILE,
    Head,
    LogView,
    Segment,
    list_segments,
)
from services.common import errors

_READ_SIZE = 1 << 20


def view_of(data_dir: pathlib.Path) -> LogView:
    """The whole log as the files hold it (an unfinished last line is left out). Reading a
    segment's checkpoints before its records keeps this consistent while an auditor writes:
    records are durable before a checkpoint covers them."""
    segments = tuple(list_segments(data_dir))
    if not segments:
        raise FileNotFoundError(f"no audit log in {data_dir}")
    last = collections.deque(segment_checkpoints(segments[-1]), maxlen=1)
    return LogView(segments, None, Head(0, GENESIS_HASH, 0), last[0] if last else None)


def local_keys(data_dir: pathlib.Path) -> dict[str, Ed25519PublicKey]:
    """The public key written beside the log: enough to catch accidents and edits by someone
    who cannot also replace this file; pass a key from etcd or elsewhere for more."""
    name, key = parse_public_record((data_dir / PUBLIC_KEY_FILE).read_bytes())
    return {name: key}


def segment_checkpoints(segment: Segment) -> Iterator[Checkpoint]:
    """The checkpoints in one segment's `.ckpt` file, in file order (torn last line skipped)."""
    try:
        file = open(segment.checkpoint_path, "rb")
    except FileNotFoundError:
        return
    with file:
        for line in file:
            if not line.endswith(b"\n"):
                return
            try:
                yield Checkpoint.from_line(line)
            except BadCheckpoint:
                return


def lines(view: LogView, start: int = 1) -> Iterator[tuple[int, bytes]]:
    """(sequence, line with newline) from `start` on, in log order, up to the view's end.

    Sequences come from positions (a segment's first + line index); segments that end before
    `start` are skipped without being read.
    """
    segments = view.segments
    for position, segment in enumerate(segments):
        if position + 1 < len(segments) and segments[position + 1].first <= start:
            continue
        limit = view.end if position == len(segments) - 1 else None
        try:
            file = open(segment.log_path, "rb", buffering=_READ_SIZE)
        except FileNotFoundError:
            continue  # dropped by retention while we read; `verify` reports real gaps
        with file:
            seq, offset = segment.first, 0
            for line in file:
                if limit is not None and offset + len(line) > limit:
                    return
                if not line.endswith(b"\n"):
                    return  # a torn last write: never acknowledged
                offset += len(line)
                if seq >= start:
                    yield seq, line
                seq += 1


@dataclasses.dataclass(frozen=True)
class QueryFilter:
    tenant: str = ""  # "" = every tenant (admins only)
    since_ms: int = 0
    until_ms: int = 0  # 0 = no upper bound; exclusive
    model: str = ""
    request_id: str = ""
    limit: int = 1000


def query(view: LogView, where: QueryFilter) -> Iterator[tuple[Record, bytes]]:
    """Records matching every set field of `where`, oldest first, at most `where.limit`.

    A sealed segment is read only when its index (services/auditor/index.py) says it may hold a
    match; the segment being written is always read. Within a segment, a request id or tenant is
    looked for as text in the line before the line is parsed, which keeps a scan cheap. Time is
    the auditor's `at`, which never decreases along the log, so the scan stops past `until`.
    """
    needles = []
    if where.request_id:
        needles.append(b'"request_id":' + canonical_json(where.request_id).encode())
    if where.tenant:
        needles.append(b'"tenant":' + canonical_json(where.tenant).encode())
    found = 0
    for segment_view in _segments_that_may_match(view, where):
        for _seq, line in lines(segment_view):
            if found >= where.limit:
                return
            if any(needle not in line for needle in needles):
                continue
            try:
                record = parse_line(line)
            except MalformedRecord:
                continue
            if where.until_ms and record.at >= where.until_ms:
                return
            if record.at < where.since_ms or not _matches(record.event, where):
                continue
            found += 1
            yield record, line


def _segments_that_may_match(view: LogView, where: QueryFilter) -> Iterator[LogView]:
    """One view per segment to read: sealed ones their index does not rule out, then the last."""
    *sealed, last = view.segments
    for segment in sealed:
        summary = index.load_or_build(segment)
        if summary is not None and summary.may_match(
                since_ms=where.since_ms, until_ms=where.until_ms, tenant=where.tenant,
                model=where.model, request_id=where.request_id):
            yield dataclasses.replace(view, segments=(segment,), end=None)
    yield dataclasses.replace(view, segments=(last,))


def _matches(event: dict[str, Any], where: QueryFilter) -> bool:
    generation = event.get("generation") or {}
    if where.tenant and generation.get("tenant") != where.tenant:
        return False
    if where.model and where.model not in (generation.get("model"),
                                           generation.get("model_version")):
        return False
    return not where.request_id or event.get("request_id") == where.request_id


def find_sequence(view: LogView, request_id: str, tenant: str = "") -> int:
    """The sequence of the newest record of `request_id` (of `tenant`'s generations when set:
    clients choose request ids, so tenants' ids may collide); NotFound when there is none."""
    match = 0
    for record, _line in query(view, QueryFilter(tenant=tenant, request_id=request_id,
                                                 limit=2**62)):
        match = record.seq
    if not match:
        raise errors.NotFound(f"no audit record for request {request_id!r}")
    return match


# -- proofs ------------------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


@dataclasses.dataclass(frozen=True)
class InclusionProof:
    """Record `sequence` (leaf `sequence - 1`) is in the tree that `checkpoint` signs."""

    sequence: int
    leaf: bytes  # the record's line without its newline
    path: tuple[bytes, ...]
    checkpoint: Checkpoint

    def check(self, keys: dict[str, Ed25519PublicKey]) -> str:
        """"" when the proof holds under one of `keys`, else what is wrong."""
        if not self.checkpoint.signed_by(keys):
            return f"the checkpoint is not signed by a trusted key (key {self.checkpoint.key_id})"
        if not merkle.verify_inclusion(self.sequence - 1, self.checkpoint.size,
                                       merkle.leaf_hash(self.leaf), self.path,
                                       self.checkpoint.root):
            return (f"record {self.sequence} is not in the signed tree of "
                    f"{self.checkpoint.size} records (the proof does not lead to its root)")
        return ""

    def to_json(self) -> dict[str, Any]:
        return {"sequence": self.sequence, "leaf_index": self.sequence - 1,
                "record": self.leaf.decode("ascii"), "path": [_b64(h) for h in self.path],
                "checkpoint": self.checkpoint.to_record(with_hints=False)}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> InclusionProof:
        return cls(int(value["sequence"]), value["record"].encode("ascii"),
                   tuple(_unb64(h) for h in value["path"]),
                   Checkpoint.from_record(value["checkpoint"]))


@dataclasses.dataclass(frozen=True)
class ConsistencyProof:
    """The tree `old` signs is a prefix of the tree `new` signs."""

    old: Checkpoint
    new: Checkpoint
    path: tuple[bytes, ...]

    def check(self, keys: dict[str, Ed25519PublicKey]) -> str:
        for name, checkpoint in (("old", self.old), ("new", self.new)):
            if not checkpoint.signed_by(keys):
                return f"the {name} checkpoint is not signed by a trusted key"
        if not merkle.verify_consistency(self.old.size, self.new.size, self.old.root,
                                         self.new.root, self.path):
            return (f"the tree of {self.old.size} records is not a prefix of the tree of "
                    f"{self.new.size} records (the log was rewritten between them)")
        return ""

    def to_json(self) -> dict[str, Any]:
        return {"old": self.old.to_record(with_hints=False),
                "new": self.new.to_record(with_hints=False),
                "path": [_b64(h) for h in self.path]}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> ConsistencyProof:
        return cls(Checkpoint.from_record(value["old"]), Checkpoint.from_record(value["new"]),
                   tuple(_unb64(h) for h in value["path"]))


def checkpoints(view: LogView) -> Iterator[Checkpoint]:
    for segment in view.segments:
        yield from segment_checkpoints(segment)


def checkpoint_covering(view: LogView, size: int) -> Checkpoint:
    """The first checkpoint whose tree holds at least `size` records; NotFound if none yet."""
    for checkpoint in checkpoints(view):
        if checkpoint.size >= size:
            return checkpoint
    raise errors.NotFound(f"no signed checkpoint covers record {size} yet")


def checkpoint_of_size(view: LogView, size: int) -> Checkpoint:
    for checkpoint in checkpoints(view):
        if checkpoint.size == size:
            return checkpoint
    raise errors.NotFound(f"no signed checkpoint of a tree of {size} records")


def inclusion_proof(view: LogView, sequence: int, checkpoint: Checkpoint) -> InclusionProof:
    """Proves record `sequence` is in `checkpoint`'s tree, in one pass over the leaves."""
    if not 1 <= sequence <= checkpoint.size:
        raise errors.InvalidArgument(
            "sequence", f"must be between 1 and the checkpoint's {checkpoint.size}")
    leaf: list[bytes] = []

    def keep(seq: int, line: bytes) -> None:
        if seq == sequence:
            leaf.append(line[:-1])

    path = _subtree_hashes(view, merkle.inclusion_ranges(sequence - 1, checkpoint.size),
                           checkpoint, keep)
    return InclusionProof(sequence, leaf[0], tuple(path), checkpoint)


def consistency_proof(view: LogView, old: Checkpoint, new: Checkpoint) -> ConsistencyProof:
    if old.size > new.size:
        raise errors.InvalidArgument("old_size", f"must not exceed the new size {new.size}")
    path = _subtree_hashes(view, merkle.consistency_ranges(old.size, new.size), new)
    return ConsistencyProof(old, new, tuple(path))


def _subtree_hashes(view: LogView, ranges: Sequence[merkle.Range], checkpoint: Checkpoint,
                    visit=None) -> list[bytes]:
    """Hashes of `ranges` in the tree of `checkpoint.size` records, starting from the retained
    base (the first segment's base checkpoint frontier), checked against the signed root."""
    base = next(segment_checkpoints(view.segments[0]), None)
    if base is None:
        raise errors.FailedPrecondition(f"{view.segments[0].checkpoint_path} is missing")
    try:
        frontier = base.frontier_state()
    except BadCheckpoint as exc:
        raise errors.FailedPrecondition(str(exc)) from None
    if checkpoint.size < frontier.size:
        raise errors.FailedPrecondition(
            f"records up to {frontier.size} were dropped by retention; "
            f"no proof against a tree of {checkpoint.size}")

    def leaves() -> Iterator[bytes]:
        for seq, line in lines(view, frontier.size + 1):
            if seq > checkpoint.size:
                return
            if visit is not None:
                visit(seq, line)
            yield merkle.leaf_hash(line[:-1])

    try:
        hashes, root = merkle.range_hashes(ranges, leaves(), frontier)
    except ValueError as exc:
        raise errors.FailedPrecondition(f"cannot build the proof: {exc}") from None
    if root != checkpoint.root:
        raise errors.FailedPrecondition(
            f"the records on disk do not give the signed root of the tree of {checkpoint.size}"
            " records; run `meshctl audit verify`")
    return hashes


def proof_to_text(proof: InclusionProof | ConsistencyProof) -> str:
    return json.dumps(proof.to_json(), indent=2, sort_keys=True)

