"""The content-addressed blob store: engine and tokenizer files, addressed by sha256.

A blob becomes visible only after its bytes were verified against the digest it was announced
with (writes go to `incoming/` and are renamed into place), and every read from byte 0 is
verified again, so a file changed on disk is refused rather than served whole. A read from a
later offset (a resumed download) reads only the bytes after it and cannot verify them: the
reader, which holds the prefix, verifies the whole blob. `BlobStore` is the interface; the local
directory is the default implementation, an S3-compatible bucket the production one.

    <root>/sha256/<hex>              verified blobs (read-only once in place)
    <root>/incoming/<hex>.partial    an upload in progress; resumable from its current size

Garbage collection (`collect`) deletes blobs no registered version pins and uploads left
unfinished, once they are older than a grace period. A blob's age is its modification time, which
registration refreshes (`touch`) before it checks the blob is there: a version being registered
never loses a blob to a collection running beside it (the collection re-reads the time just
before it deletes), and a blob deleted first makes the registration fail clearly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from services.common import errors

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
CHUNK = 1 << 20
TRANSFER_MIN_TIMEOUT_S = 60.0
TRANSFER_MIN_BYTES_PER_S = 4 << 20  # a blob moving slower than this over its length times out


def transfer_timeout_s(size: int, floor_s: float = TRANSFER_MIN_TIMEOUT_S) -> float:
    """The deadline for moving `size` bytes of a blob (an upload, a download, the rest of a
    resumed one): at least `floor_s`, and long enough at TRANSFER_MIN_BYTES_PER_S. The one rule
    for the client's RPC deadlines and the blob cache's per-blob deadline."""
    return max(floor_s, size / TRANSFER_MIN_BYTES_PER_S)


def parse_digest(digest: str, field: str = "digest") -> str:
    """The hex part of `sha256:<hex>`; InvalidArgument otherwise."""
    if not DIGEST.match(digest):
        raise errors.InvalidArgument(field, "must be sha256: followed by 64 lowercase hex digits")
    return digest.split(":", 1)[1]


def file_digest(path: pathlib.Path) -> tuple[str, int]:
    """(`sha256:<hex>`, size) of a file, read in chunks."""
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return f"sha256:{hasher.hexdigest()}", size


@dataclasses.dataclass(frozen=True)
class Collected:
    """What a garbage collection removed (or, on a dry run, would remove)."""

    deleted: list[str]  # digests of unpinned blobs
    freed_bytes: int  # theirs and the abandoned uploads'
    abandoned_uploads: int
    kept: int  # blobs a version pins, or younger than the grace period


class BlobStore(Protocol):
    """What the registry needs of a store: `LocalBlobStore` here, `S3BlobStore` in
    `s3_blobs.py`. Every method blocks; the registry calls them from worker threads."""

    def exists(self, digest: str) -> bool: ...
    def touch(self, digest: str) -> bool: ...
    def collect(self, pinned: Callable[[str], bool], older_than: float,
                dry_run: bool) -> Collected: ...
    def uploaded_size(self, digest: str) -> int: ...
    def write(self, digest: str, size: int, chunks: Iterable[bytes], offset: int = 0) -> None: ...
    def read(self, digest: str, offset: int = 0) -> Iterator[bytes]:
        """The blob's bytes from `offset` (0 <= offset; at or past the end, none); NotFound when
        it is not in the store. Only a read from 0 is verified (Internal at the end on a
        mismatch); from a later offset only the rest is read, and the caller verifies."""
        ...


def check_offset(offset: int) -> None:
    """InvalidArgument unless `offset` can start a read."""
    if offset < 0:
        raise errors.InvalidArgument("offset", f"must be 0 or more, not {offset}")


def fsync_directory(directory: pathlib.Path) -> None:
    """Makes the entries of `directory` (a rename into it) durable, as fsync does for a file."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class LocalBlobStore:
    """Blobs in a local directory. Blocking file I/O: call it from a worker thread."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        (root / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "incoming").mkdir(parents=True, exist_ok=True)

    def _final(self, digest: str) -> pathlib.Path:
        return self.root / "sha256" / parse_digest(digest)

    def _partial(self, digest: str) -> pathlib.Path:
        return self.root / "incoming" / f"{parse_digest(digest)}.partial"

    def exists(self, digest: str) -> bool:
        return self._final(digest).exists()

    def touch(self, digest: str) -> bool:
        """Marks the blob as just used (garbage collection spares it for a grace period);
        False when it is not in the store."""
        try:
            os.utime(self._final(digest))
        except FileNotFoundError:
            return False
        return True

    def collect(self, pinned: Callable[[str], bool], older_than: float,
                dry_run: bool) -> Collected:
        """Deletes blobs for which `pinned(digest)` is false and unfinished uploads, both only
        when last modified before `older_than` (unix seconds)."""
        deleted: list[str] = []
        freed = abandoned = kept = 0
        for path in sorted((self.root / "sha256").iterdir()):
            digest = f"sha256:{path.name}"
            if not DIGEST.match(digest) or pinned(digest) or not _older(path, older_than):
                kept += 1
                continue
            size = path.stat().st_size
            if not dry_run and not _remove_if_older(path, older_than):
                kept += 1  # touched (registered) since it was listed
                continue
            deleted.append(digest)
            freed += size
        for path in (self.root / "incoming").glob("*.partial"):
            if _older(path, older_than):
                size = path.stat().st_size
                if dry_run or _remove_if_older(path, older_than):
                    abandoned += 1
                    freed += size
        return Collected(deleted, freed, abandoned, kept)

    def uploaded_size(self, digest: str) -> int:
        """How many bytes of an interrupted upload are already here (resume from there)."""
        if self.exists(digest):
            return self._final(digest).stat().st_size
        partial = self._partial(digest)
        return partial.stat().st_size if partial.exists() else 0

    def write(self, digest: str, size: int, chunks: Iterable[bytes], offset: int = 0) -> None:
        """Appends `chunks` at `offset` of the upload; when `size` bytes are in, verifies them and
        makes the blob visible. A digest or size mismatch discards the upload."""
        if self.exists(digest):
            return
        partial = self._partial(digest)
        have = partial.stat().st_size if partial.exists() else 0
        if offset != have:
            raise errors.FailedPrecondition(
                f"upload of {digest} is at byte {have}, not {offset}; resume from {have}"
            )
        with open(partial, "ab") as handle:
            for chunk in chunks:
                if have + len(chunk) > size:
                    partial.unlink(missing_ok=True)
                    raise errors.InvalidArgument("size", f"more than the announced {size} bytes")
                handle.write(chunk)
                have += len(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        if have < size:
            return  # more to come (or a resume later)
        actual, _ = file_digest(partial)
        if actual != digest:
            partial.unlink(missing_ok=True)
            raise errors.InvalidArgument("digest", f"the bytes hash to {actual}, not {digest}")
        partial.chmod(0o444)
        final = self._final(digest)
        os.replace(partial, final)
        fsync_directory(final.parent)  # the rename itself survives a crash, not only the bytes

    def put_file(self, path: pathlib.Path) -> str:
        """Stores a local file; returns its digest."""
        digest, size = file_digest(path)
        if not self.exists(digest):
            self._partial(digest).unlink(missing_ok=True)
            with open(path, "rb") as handle:
                self.write(digest, size, iter(lambda: handle.read(CHUNK), b""))
        return digest

    def read(self, digest: str, offset: int = 0) -> Iterator[bytes]:
        """The blob's bytes from `offset`, by seeking there. From 0 they are verified as they
        are read: Internal at the end if they do not hash to the digest."""
        check_offset(offset)
        final = self._final(digest)
        if not final.exists():
            raise errors.NotFound(f"blob {digest} is not in the store")
        hasher = hashlib.sha256() if offset == 0 else None
        with open(final, "rb") as handle:
            handle.seek(offset)
            while chunk := handle.read(CHUNK):
                if hasher is not None:
                    hasher.update(chunk)
                yield chunk
        if hasher is not None and f"sha256:{hasher.hexdigest()}" != digest:
            raise errors.Internal(f"blob {digest} is corrupt on disk; refusing it")

    def verified_path(self, digest: str) -> pathlib.Path:
        """The blob's path, after checking its bytes still match the digest."""
        final = self._final(digest)
        if not final.exists():
            raise errors.NotFound(f"blob {digest} is not in the store")
        actual, _ = file_digest(final)
        if actual != digest:
            raise errors.Internal(f"blob {digest} is corrupt on disk (hashes to {actual})")
        return final


def _older(path: pathlib.Path, older_than: float) -> bool:
    try:
        return path.stat().st_mtime < older_than
    except FileNotFoundError:
        return False


def _remove_if_older(path: pathlib.Path, older_than: float) -> bool:
    """Deletes `path` if it is still older than `older_than` now, right before deleting."""
    if not _older(path, older_than):
        return False
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
