"""Per-segment query indexes: what a sealed segment holds, so a query skips segments unread.

A sealed segment never changes, so a small summary of it stays true: its first and last `at`,
the tenants and models (names and version ids) in its records, and a Bloom filter of its request
ids. `Query` and `prove REQUEST_ID` read a segment only when its summary says it may hold a match;
on a month of log that turns a scan of every line into a read of a few segments.

An index is derived data, never evidence: it sits beside the segment as `<first>.idx`, is built
from the segment by whoever needs it first (the auditor builds new ones in the background), and
is rebuilt when missing, unreadable or made for a different size of the segment's file. `verify`
never reads it: someone who can edit an index can hide records from queries, never from `verify`
(which reads every record) or from an inclusion proof's check, which is why evidence is those.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
from collections.abc import Iterable, Iterator
from typing import Any

from services.auditor.records import MalformedRecord, parse_line
from services.auditor.store import INDEX_SUFFIX, Segment, list_segments

SCHEMA = 1
FALSE_POSITIVE_RATE = 0.01
_READ_SIZE = 1 << 20


@dataclasses.dataclass(frozen=True)
class BloomFilter:
    """k hash positions per key over `bits` bits (double hashing from one blake2b digest)."""

    bits: int
    hashes: int
    data: bytes

    @classmethod
    def for_keys(cls, keys: Iterable[str], count: int) -> BloomFilter:
        bits = max(64, math.ceil(-count * math.log(FALSE_POSITIVE_RATE) / math.log(2) ** 2))
        hashes = max(1, round(bits / max(count, 1) * math.log(2)))
        data = bytearray((bits + 7) // 8)
        empty = cls(bits, hashes, b"")
        for key in keys:
            for position in empty._positions(key):
                data[position // 8] |= 1 << (position % 8)
        return cls(bits, hashes, bytes(data))

    def may_contain(self, key: str) -> bool:
        return all(self.data[p // 8] & (1 << (p % 8)) for p in self._positions(key))

    def _positions(self, key: str) -> Iterator[int]:
        digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
        first, second = int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:], "big") | 1
        return ((first + i * second) % self.bits for i in range(self.hashes))


@dataclasses.dataclass(frozen=True)
class SegmentIndex:
    log_bytes: int  # the size of the segment's file it summarises
    records: int
    first_at: int
    last_at: int
    tenants: frozenset[str]
    models: frozenset[str]  # model names and version ids
    request_ids: BloomFilter

    def may_match(self, *, since_ms: int, until_ms: int, tenant: str, model: str,
                  request_id: str) -> bool:
        """False only when no record here can match (a query's fields; empty = any)."""
        if not self.records:
            return False
        if since_ms and self.last_at < since_ms:
            return False
        if until_ms and self.first_at >= until_ms:
            return False
        if tenant and tenant not in self.tenants:
            return False
        if model and model not in self.models:
            return False
        return not request_id or self.request_ids.may_contain(request_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "log_bytes": self.log_bytes, "records": self.records,
            "first_at": self.first_at, "last_at": self.last_at,
            "tenants": sorted(self.tenants), "models": sorted(self.models),
            "request_ids": {"bits": self.request_ids.bits, "hashes": self.request_ids.hashes,
                            "data": base64.b64encode(self.request_ids.data).decode("ascii")},
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> SegmentIndex:
        if value.get("schema") != SCHEMA:
            raise ValueError(f"index schema {value.get('schema')!r}")
        bloom = value["request_ids"]
        return cls(int(value["log_bytes"]), int(value["records"]), int(value["first_at"]),
                   int(value["last_at"]), frozenset(value["tenants"]), frozenset(value["models"]),
                   BloomFilter(int(bloom["bits"]), int(bloom["hashes"]),
                               base64.b64decode(bloom["data"], validate=True)))


def build(segment: Segment) -> SegmentIndex:
    """Reads the whole segment once (whole lines only; a malformed one adds nothing)."""
    size = os.stat(segment.log_path).st_size
    first_at = last_at = records = 0
    tenants: set[str] = set()
    models: set[str] = set()
    request_ids: list[str] = []
    with open(segment.log_path, "rb", buffering=_READ_SIZE) as file:
        for line in file:
            if not line.endswith(b"\n"):
                break
            try:
                record = parse_line(line)
            except MalformedRecord:
                continue
            records += 1
            first_at = first_at or record.at
            last_at = record.at
            generation = record.event.get("generation") or {}
            tenants.update(t for t in (generation.get("tenant"),) if isinstance(t, str))
            models.update(m for m in (generation.get("model"), generation.get("model_version"))
                          if isinstance(m, str) and m)
            if isinstance(request_id := record.event.get("request_id"), str) and request_id:
                request_ids.append(request_id)
    return SegmentIndex(size, records, first_at, last_at, frozenset(tenants), frozenset(models),
                        BloomFilter.for_keys(request_ids, len(request_ids)))


def load_or_build(segment: Segment) -> SegmentIndex | None:
    """The sealed segment's index, built and saved when missing or stale; None when the segment
    is gone (retention) — the caller then reads nothing from it."""
    try:
        size = os.stat(segment.log_path).st_size
    except FileNotFoundError:
        return None
    index = _saved(segment, size)
    if index is not None:
        return index
    try:
        index = build(segment)
    except FileNotFoundError:
        return None
    _save(segment.index_path, index)
    return index


def _saved(segment: Segment, size: int) -> SegmentIndex | None:
    """The index on disk if it was made for a file of this size; None if missing or unreadable.
    Every query consults every sealed segment's index, so a parsed one is kept in memory for as
    long as its file is unchanged (same path, size and modification time)."""
    try:
        stat = segment.index_path.stat()
    except OSError:
        return None
    index = _parsed(str(segment.index_path), stat.st_size, stat.st_mtime_ns)
    return index if index is not None and index.log_bytes == size else None


@functools.lru_cache(maxsize=4096)
def _parsed(path: str, _size: int, _mtime_ns: int) -> SegmentIndex | None:
    """One index file's content, cached by its identity (the arguments after `path`)."""
    try:
        return SegmentIndex.from_json(json.loads(pathlib.Path(path).read_bytes()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save(path: pathlib.Path, index: SegmentIndex) -> None:
    """Atomically, best effort: a reader without write access (a copied log) still queries."""
    temporary = path.with_suffix(f"{INDEX_SUFFIX}.tmp")
    with contextlib.suppress(OSError):
        temporary.write_text(json.dumps(index.to_json(), separators=(",", ":")))
        os.replace(temporary, path)


def build_missing(data_dir: pathlib.Path) -> int:
    """Indexes every sealed segment that has no current index (the auditor runs this in the
    background, so a query rarely pays for it); returns how many it built."""
    built = 0
    for segment in list_segments(data_dir)[:-1]:
        with contextlib.suppress(FileNotFoundError):
            if _saved(segment, os.stat(segment.log_path).st_size) is None:
                built += load_or_build(segment) is not None
    return built
