"""A replica's (or gateway's) local copy of the registry blobs it serves, bounded in bytes.

The layout is the registry's `LocalBlobStore` (`<root>/sha256/<hex>` verified blobs,
`<root>/incoming/<hex>.partial` downloads in progress), so an engine process opens the cache
with `LocalBlobStore(root)` and reads only verified blobs. A blob is downloaded by digest,
resumed from the partial file a killed process left, verified, and only then renamed into place.
Blobs a pin holds (what the owner serves) are never evicted; the others go least recently ensured
first when room is needed. Pins live in memory: after a restart the owner re-pins what it serves.
"""

from __future__ import annotations

import asyncio
import collections
import pathlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from prometheus_client import Counter, Gauge

from services.common import errors
from services.common.logs import get_logger
from services.registry.blobs import DIGEST, LocalBlobStore, parse_digest, transfer_timeout_s

Download = Callable[[str, int], AsyncIterator[bytes]]  # (digest, offset) -> the bytes from offset
BUDGET_SETTING = "INFERMESH_BLOB_CACHE_MAX_BYTES"
WRITE_BATCH_BYTES = 8 << 20  # appended (and fsynced) to the partial file at a time

HELD_BYTES = Gauge("infermesh_blob_cache_bytes",
                   "Bytes the blob cache holds on disk or has reserved for downloads in progress.")
BUDGET_BYTES = Gauge("infermesh_blob_cache_budget_bytes",
                     f"Bytes the blob cache may hold ({BUDGET_SETTING}).")
DOWNLOADED_BYTES = Counter("infermesh_blob_cache_downloaded_bytes_total",
                           "Blob bytes the cache downloaded from the registry.")
EVICTIONS = Counter("infermesh_blob_cache_evictions_total",
                    "Blobs (or abandoned partial downloads) no pin held, deleted to make room.")
CORRUPT_BLOBS = Counter("infermesh_blob_cache_corrupt_blobs_total",
                        "Cached blobs or partial downloads that failed verification, deleted and "
                        "fetched again.")

log = get_logger(__name__)


class _Mismatch(Exception):
    """The bytes on disk are not the blob's; `LocalBlobStore.write` discarded them."""


class BlobCache:
    """Verified registry blobs under `root`, at most `max_bytes` of them (downloads in progress
    count at their full size). Each download of a blob gets `transfer_timeout_s` of the bytes
    it has left, with `timeout_s` as the floor: a small blob has `timeout_s`, a large one as
    long as it needs at the least transfer rate the registry client allows. Construction is
    blocking (it creates the directories and reads what an earlier process left): build it with
    `asyncio.to_thread`."""

    def __init__(self, root: pathlib.Path, max_bytes: int, download: Download,
                 timeout_s: float = 600.0):
        self._store = LocalBlobStore(root)
        self._max_bytes = max_bytes
        self._download = download
        self._timeout_s = timeout_s
        self._blobs, self._partials = _on_disk(root)  # verified, least recently ensured first
        self._reserved: dict[str, int] = {}  # downloads in progress: the whole blob's size
        self._progress: dict[str, int] = {}  # ... and the bytes of it on disk so far
        self._pins: dict[str, collections.Counter[str]] = {}  # pin -> digest -> ensures
        self._locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(
            asyncio.Lock)  # one per digest: its check, download and eviction never overlap
        self._room = asyncio.Lock()  # making room and reserving it, one download at a time
        BUDGET_BYTES.set(max_bytes)
        self._publish()

    @property
    def store(self) -> LocalBlobStore:
        return self._store

    def usage(self) -> tuple[int, int]:
        """(bytes held or reserved for downloads in progress, the budget)."""
        return self._committed(), self._max_bytes

    def unpin(self, pin: str) -> None:
        """Lets what only `pin` held be evicted again; it stays until room is needed."""
        self._pins.pop(pin, None)

    async def ensure(self, files: Sequence[Mapping[str, Any]], pin: str) -> None:
        """Makes every file (a manifest FileRef: name, digest, size_bytes) a verified blob here,
        pinned under `pin` until `unpin(pin)`. A blob already here is verified again; one that
        does not verify is deleted and downloaded anew.

        Raises ResourceExhausted, before downloading anything, when the files cannot fit beside
        what is pinned or being downloaded, and the download's MeshError (DeadlineExceeded past
        a download's deadline, which scales with the bytes it has left) otherwise. A failed
        ensure pins nothing `pin` did not hold before and leaves only verified blobs and partial
        files to resume from."""
        sizes = _sizes(files)
        mine = self._pins.setdefault(pin, collections.Counter())
        mine.update(sizes.keys())
        try:
            self._check_fits(sizes)
            for digest, size in sizes.items():
                async with self._locks[digest]:
                    if not await self._verify(digest):
                        await self._fetch(digest, size)
        except BaseException:
            mine.subtract(sizes.keys())
            for digest in sizes:
                if mine[digest] <= 0:
                    del mine[digest]
            if not mine and self._pins.get(pin) is mine:
                del self._pins[pin]
            raise

    def _pinned(self, digest: str) -> bool:
        return any(digest in held for held in self._pins.values())

    def _committed(self) -> int:
        return (sum(self._blobs.values()) + sum(self._partials.values())
                + sum(self._reserved.values()))

    def _publish(self) -> None:
        HELD_BYTES.set(self._committed())

    def _exhausted(self, needed: int, fixed: int) -> errors.ResourceExhausted:
        return errors.ResourceExhausted(
            f"the blob cache cannot fit {needed} more bytes: {fixed} of its {self._max_bytes} "
            f"bytes ({BUDGET_SETTING}) are pinned by loaded versions or being downloaded",
            reason="blob_cache")

    def _check_fits(self, sizes: Mapping[str, int]) -> None:
        """Refuses up front what could not fit even after evicting every unpinned blob, so a
        version too big for the cache downloads nothing."""
        needed = sum(size for digest, size in sizes.items()
                     if digest not in self._blobs and digest not in self._reserved)
        fixed = (sum(size for digest, size in self._blobs.items() if self._pinned(digest))
                 + sum(self._reserved.values()))
        if fixed + needed > self._max_bytes:
            raise self._exhausted(needed, fixed)

    async def _verify(self, digest: str) -> bool:
        """Whether the blob is here and still hashes to its digest; one that does not is
        deleted. Called under the digest's lock."""
        if digest not in self._blobs:
            return False
        try:
            await asyncio.to_thread(self._store.verified_path, digest)
        except errors.NotFound:
            self._forget(digest)  # deleted behind our back
            return False
        except errors.Internal:
            CORRUPT_BLOBS.inc()
            log.warning("blob_cache_corrupt_blob", digest=digest)
            await asyncio.to_thread(self._blob_path(digest).unlink, missing_ok=True)
            self._forget(digest)
            return False
        await asyncio.to_thread(self._store.touch, digest)  # keeps the order across restarts
        self._blobs.move_to_end(digest)
        return True

    def _forget(self, digest: str) -> None:
        self._blobs.pop(digest, None)
        self._publish()

    async def _fetch(self, digest: str, size: int) -> None:
        """Downloads one blob into a reserved room. Called under the digest's lock."""
        await self._reserve(digest, size)
        done = False
        try:
            await self._download_into(digest, size)
            done = True
        finally:
            del self._reserved[digest]
            have = self._progress.pop(digest, 0)
            if done:
                self._blobs[digest] = size
            elif have:
                self._partials[digest] = have
            self._publish()

    async def _reserve(self, digest: str, size: int) -> None:
        """Makes room for `size` bytes, evicting what no pin holds (abandoned partial downloads,
        then blobs least recently ensured first), and reserves it for this download."""
        async with self._room:
            stale = self._partials.pop(digest, 0)  # counted in this reservation from now on
            self._reserved[digest] = size
            try:
                for victim in self._victims():
                    if self._committed() <= self._max_bytes:
                        break
                    await self._evict(victim)
                if self._committed() > self._max_bytes:
                    fixed = self._committed() - size
                    raise self._exhausted(size, fixed)
            except BaseException:
                del self._reserved[digest]
                if stale:
                    self._partials[digest] = stale
                raise
            finally:
                self._publish()

    def _victims(self) -> list[str]:
        candidates = [*self._partials, *self._blobs]
        return [d for d in candidates if not self._pinned(d) and not self._locks[d].locked()]

    async def _evict(self, digest: str) -> None:
        """Deletes an unpinned blob or abandoned partial under its lock, so a concurrent ensure
        of it waits and then finds it gone."""
        lock = self._locks[digest]
        if lock.locked() or self._pinned(digest):
            return  # taken or pinned since the victims were listed
        async with lock:  # free, so taken at once: no ensure slips in between
            if digest in self._blobs:
                del self._blobs[digest]
                path = self._blob_path(digest)
            elif digest in self._partials:
                del self._partials[digest]
                path = self._partial_path(digest)
            else:
                return
            EVICTIONS.inc()
            log.info("blob_cache_evicted", digest=digest)
            await asyncio.to_thread(path.unlink, missing_ok=True)

    async def _download_into(self, digest: str, size: int) -> None:
        """Resumes from the partial file; a partial that is not a prefix of the blob (too long,
        or failing verification at the end) is discarded and the blob fetched once more from 0."""
        offset = await asyncio.to_thread(self._store.uploaded_size, digest)
        if offset:
            try:
                if offset > size:
                    raise _Mismatch(f"the partial file has {offset} of {size} bytes")
                await self._append(digest, size, offset)
                return
            except _Mismatch as exc:
                CORRUPT_BLOBS.inc()
                log.warning("blob_cache_bad_partial", digest=digest, reason=str(exc))
                await asyncio.to_thread(self._partial_path(digest).unlink, missing_ok=True)
        try:
            await self._append(digest, size, 0)
        except _Mismatch as exc:
            raise errors.Internal(f"the registry's bytes for blob {digest} are not it: "
                                  f"{exc}") from None

    async def _append(self, digest: str, size: int, offset: int) -> None:
        """Appends the registry's bytes from `offset` to the partial file, in batches; the last
        one verifies the blob and renames it into place. Bounded by the deadline of the bytes
        left (`transfer_timeout_s`, at least `timeout_s`): a large blob is not cut off by a
        deadline sized for a small one."""
        deadline_s = transfer_timeout_s(size - offset, floor_s=self._timeout_s)
        try:
            async with asyncio.timeout(deadline_s):
                await self._receive(digest, size, offset)
        except TimeoutError:
            raise errors.DeadlineExceeded(
                f"downloading blob {digest} ({size - offset} of its {size} bytes left) took over "
                f"{deadline_s:g}s; the next ensure resumes it") from None

    async def _receive(self, digest: str, size: int, offset: int) -> None:
        have, batched = offset, 0
        batch: list[bytes] = []
        self._progress[digest] = have
        stream = self._download(digest, offset)
        try:
            async for chunk in stream:
                DOWNLOADED_BYTES.inc(len(chunk))
                batch.append(chunk)
                batched += len(chunk)
                if batched >= WRITE_BATCH_BYTES:
                    await self._write(digest, size, batch, have)
                    have, batch, batched = have + batched, [], 0
        except Exception:
            if batch:  # keep what arrived: the next ensure resumes after it
                await self._write(digest, size, batch, have)
            raise
        finally:
            if isinstance(stream, AsyncGenerator):
                await stream.aclose()
        if batch or have == size:  # the last batch, or an empty blob
            await self._write(digest, size, batch, have)
            have += batched
        if have < size:
            raise errors.Unavailable(
                f"the registry's stream of blob {digest} ended at byte {have} of {size}; the "
                "next ensure resumes it", retry_after_s=1.0)

    async def _write(self, digest: str, size: int, batch: list[bytes], offset: int) -> None:
        """One batch from a worker thread, finished even if this task is cancelled meanwhile,
        so the partial file is always a clean prefix and never written by two threads."""
        write = asyncio.ensure_future(
            asyncio.to_thread(self._store.write, digest, size, batch, offset))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            await asyncio.wait([write])
            raise
        except errors.InvalidArgument as exc:  # too long, or the digest does not match
            self._progress[digest] = 0
            raise _Mismatch(exc.message) from None
        self._progress[digest] = offset + sum(len(chunk) for chunk in batch)

    def _blob_path(self, digest: str) -> pathlib.Path:
        return self._store.root / "sha256" / parse_digest(digest)

    def _partial_path(self, digest: str) -> pathlib.Path:
        return self._store.root / "incoming" / f"{parse_digest(digest)}.partial"


def _sizes(files: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """digest -> size of the distinct blobs the files name (the same bytes under two names are
    one blob). A missing size is 0, as canonical manifests leave out fields at their default."""
    sizes: dict[str, int] = {}
    for index, ref in enumerate(files):
        digest = str(ref.get("digest", ""))
        parse_digest(digest, f"files[{index}].digest")
        size = int(ref.get("size_bytes", 0))
        if size < 0 or sizes.setdefault(digest, size) != size:
            raise errors.InvalidArgument(f"files[{index}].size_bytes",
                                         f"must be the blob's size in bytes, not {size}")
    return sizes


def _on_disk(root: pathlib.Path) -> tuple[collections.OrderedDict[str, int], dict[str, int]]:
    """What an earlier process left: verified blobs oldest first (by modification time, which
    `ensure` refreshes) and partial downloads, each with its size."""
    blobs = []
    for path in (root / "sha256").iterdir():
        if DIGEST.match(digest := f"sha256:{path.name}"):
            stat = path.stat()
            blobs.append((stat.st_mtime_ns, digest, stat.st_size))
    partials = {}
    for path in (root / "incoming").glob("*.partial"):
        if DIGEST.match(digest := f"sha256:{path.name.removesuffix('.partial')}"):
            partials[digest] = path.stat().st_size
    return collections.OrderedDict((d, size) for _, d, size in sorted(blobs)), partials
