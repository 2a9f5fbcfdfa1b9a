"""One audit record: its byte form on disk, its hash, and the checks every reader applies.

A record is one ASCII line (`\\n`-terminated) in a segment file; sequence numbers start at 1:

    {"seq":7,"at":1764500000123,"prev":"9f2c…","event":{…},"hash":"41ab…"}

- `at` is when the auditor appended it (Unix milliseconds, never decreasing along the log).
- `event` is the AuditEvent as JSON (proto field names), keys sorted, no spaces.
- `prev` is record `seq - 1`'s `hash`; for record 1 it is `GENESIS_HASH` (64 zeros).
- `hash` is the lowercase hex SHA-256 of the canonical JSON of `{"at", "event", "prev", "seq"}`
  (`json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=True)`).
- The line must be exactly what `Record.to_line()` writes, so any byte edited on disk is caught.
- The line without its newline is the record's leaf in the Merkle tree (`merkle.leaf_hash`).

The `hash`/`prev` chain lets a verifier name the exact record that was edited, removed or
reordered without trusting anything; the signed Merkle checkpoints (`checkpoints.py`) catch what
a chain alone cannot: a tail cut off, or a whole suffix rewritten with recomputed hashes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from services.common import errors

GENESIS_HASH = "0" * 64
EVENT_ID_FIELD = "event_id"
MAX_EVENT_ID_LENGTH = 256

_HEX64 = re.compile(r"[0-9a-f]{64}")
_RECORD_KEYS = ("seq", "at", "prev", "event", "hash")


class MalformedRecord(ValueError):
    """A line that is not a well-formed record (not JSON, or the wrong fields or types)."""


def canonical_json(value: Any) -> str:
    """The one text form that is hashed: sorted keys, no whitespace, ASCII, no NaN."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def _hash(seq: int, at: int, prev: str, event_json: str) -> str:
    # This is canonical_json({"at", "event", "prev", "seq"}) written out: keys already sorted.
    body = f'{{"at":{at},"event":{event_json},"prev":"{prev}","seq":{seq}}}'
    return hashlib.sha256(body.encode("ascii")).hexdigest()


@dataclasses.dataclass(frozen=True)
class Record:
    seq: int
    at: int  # Unix ms, set by the auditor
    prev: str
    event: dict[str, Any]
    hash: str

    @classmethod
    def create(cls, seq: int, at: int, prev: str, event: dict[str, Any]) -> tuple[Record, bytes]:
        """The record and its exact line; TypeError/ValueError if `event` is not plain JSON."""
        event_json = canonical_json(event)
        digest = _hash(seq, at, prev, event_json)
        record = cls(seq, at, prev, event, digest)
        return record, record._line(event_json)

    def to_line(self) -> bytes:
        """The exact bytes written to disk, trailing newline included."""
        return self._line(canonical_json(self.event))

    def _line(self, event_json: str) -> bytes:
        return (
            f'{{"seq":{self.seq},"at":{self.at},"prev":"{self.prev}","event":{event_json},'
            f'"hash":"{self.hash}"}}\n'
        ).encode("ascii")

    def hash_matches(self) -> bool:
        return self.hash == _hash(self.seq, self.at, self.prev, canonical_json(self.event))


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
    if set(value) != set(_RECORD_KEYS):
        raise MalformedRecord(f"fields are {sorted(value)}, expected {sorted(_RECORD_KEYS)}")
    seq, at, prev, event, digest = (value[key] for key in _RECORD_KEYS)
    for name, number in (("seq", seq), ("at", at)):
        if not isinstance(number, int) or isinstance(number, bool) or number < 0:
            raise MalformedRecord(f"{name} is not a non-negative integer")
    for name, field in (("prev", prev), ("hash", digest)):
        if not isinstance(field, str) or not _HEX64.fullmatch(field):
            raise MalformedRecord(f"{name} is not 64 lowercase hex digits")
    if not isinstance(event, dict):
        raise MalformedRecord("event is not a JSON object")
    return Record(seq, at, prev, event, digest)


def _reject_constant(name: str) -> Any:
    """NaN and Infinity are not JSON and have no canonical form, so a line with one is bad."""
    raise ValueError(f"{name} is not allowed")


def check_record(line: bytes, expected_seq: int, prev: str) -> tuple[Record | None, str]:
    """(the record, "") when `line` is record `expected_seq` chained onto `prev`, else
    (the record if it parsed, what is wrong). `line` includes its newline."""
    try:
        record = parse_line(line)
    except MalformedRecord as exc:
        return None, f"record {expected_seq} is malformed: {exc}"
    if not record.hash_matches():
        return record, f"record {expected_seq} does not match its hash (edited on disk)"
    if record.to_line() != line:
        return record, f"record {expected_seq} is not in canonical form (edited on disk)"
    if record.seq != expected_seq:
        return record, (
            f"expected record {expected_seq} but found record {record.seq} "
            "(records were removed or reordered)"
        )
    if record.prev != prev:
        return record, (
            f"record {expected_seq} does not chain to record {expected_seq - 1} "
            "(one of the two was rewritten)"
        )
    return record, ""


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
