"""The local blob cache against an in-memory registry: downloads resumed from what a killed
process left, verification before anything is visible, a byte budget with pins and LRU eviction,
and one download per digest however many ensures ask for it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY

from services.common import errors
from services.registry import blob_cache
from services.registry.blob_cache import BlobCache
from services.registry.blobs import LocalBlobStore, transfer_timeout_s


def ref(data: bytes, name: str = "f.bin") -> dict:
    return {"name": name, "digest": f"sha256:{hashlib.sha256(data).hexdigest()}",
            "size_bytes": len(data)}


def hexof(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


class FakeRegistry:
    """Blobs by digest, served in small chunks; every download is recorded, and a stream can be
    made to break after some bytes or to wait for a gate."""

    def __init__(self, *blobs: bytes, chunk: int = 500):
        self.blobs = {ref(b)["digest"]: b for b in blobs}
        self.chunk = chunk
        self.calls: list[tuple[str, int]] = []
        self.break_after: int | None = None  # bytes sent before the stream fails
        self.gate: asyncio.Event | None = None
        self.delay_s = 0.0  # before each chunk: a slow link

    async def download(self, digest: str, offset: int) -> AsyncIterator[bytes]:
        self.calls.append((digest, offset))
        if self.gate is not None:
            await self.gate.wait()
        data = self.blobs[digest]
        for start in range(offset, len(data), self.chunk):
            if self.break_after is not None and start - offset >= self.break_after:
                raise errors.Unavailable("the registry went away")
            await asyncio.sleep(self.delay_s)
            yield data[start:start + self.chunk]


def cache(root: pathlib.Path, registry: FakeRegistry, max_bytes: int = 1 << 20,
          timeout_s: float = 600.0) -> BlobCache:
    return BlobCache(root, max_bytes, registry.download, timeout_s)


async def test_downloads_verified_blobs_an_engine_can_read(tmp_path):
    weights, tokenizer = os.urandom(5000), b'{"model": {}}'
    registry = FakeRegistry(weights, tokenizer)
    blobs = cache(tmp_path, registry)
    files = [ref(weights, "model.gguf"), ref(tokenizer, "tokenizer.json"),
             ref(weights, "copy.gguf")]  # the same bytes under two names: one blob
    await blobs.ensure(files, pin="v1")
    assert len(registry.calls) == 2
    engine_view = LocalBlobStore(tmp_path)
    assert engine_view.verified_path(files[0]["digest"]).read_bytes() == weights
    assert blobs.usage() == (5000 + len(tokenizer), 1 << 20)
    await blobs.ensure(files, pin="v1")  # already here: verified, not downloaded again
    assert len(registry.calls) == 2
    assert cache(tmp_path, registry).usage()[0] == 5000 + len(tokenizer)  # after a restart


async def test_resumes_from_the_partial_a_killed_process_left(tmp_path):
    data = os.urandom(5000)
    registry = FakeRegistry(data)
    (tmp_path / "incoming").mkdir(parents=True)
    (tmp_path / "incoming" / f"{hexof(data)}.partial").write_bytes(data[:2000])
    blobs = cache(tmp_path, registry)
    assert blobs.usage()[0] == 2000
    await blobs.ensure([ref(data)], pin="v1")
    assert registry.calls == [(ref(data)["digest"], 2000)]
    assert (tmp_path / "sha256" / hexof(data)).read_bytes() == data
    assert not list((tmp_path / "incoming").iterdir())
    assert blobs.usage()[0] == 5000


@pytest.mark.parametrize("partial", [b"x" * 2000, b"y" * 6000], ids=["wrong", "too-long"])
async def test_a_wrong_partial_is_discarded_and_fetched_once_more_from_zero(tmp_path, partial):
    data = os.urandom(5000)
    digest = ref(data)["digest"]
    registry = FakeRegistry(data)
    (tmp_path / "incoming").mkdir(parents=True)
    (tmp_path / "incoming" / f"{hexof(data)}.partial").write_bytes(partial)
    corrupt = metric("infermesh_blob_cache_corrupt_blobs_total")
    await cache(tmp_path, registry).ensure([ref(data)], pin="v1")
    resumed = [(digest, len(partial))] if len(partial) <= len(data) else []
    assert registry.calls == [*resumed, (digest, 0)]
    assert (tmp_path / "sha256" / hexof(data)).read_bytes() == data
    assert metric("infermesh_blob_cache_corrupt_blobs_total") == corrupt + 1


async def test_a_blob_corrupted_on_disk_is_removed_counted_and_fetched_again(tmp_path):
    data = os.urandom(3000)
    registry = FakeRegistry(data)
    blobs = cache(tmp_path, registry)
    await blobs.ensure([ref(data)], pin="v1")
    path = tmp_path / "sha256" / hexof(data)
    path.chmod(0o644)
    path.write_bytes(b"z" * 3000)
    corrupt = metric("infermesh_blob_cache_corrupt_blobs_total")
    await blobs.ensure([ref(data)], pin="v1")
    assert registry.calls == [(ref(data)["digest"], 0)] * 2
    assert path.read_bytes() == data
    assert metric("infermesh_blob_cache_corrupt_blobs_total") == corrupt + 1
    assert blobs.usage()[0] == 3000


async def test_eviction_takes_the_least_recently_ensured_unpinned_blob(tmp_path):
    a, b, c, d, e, f = (bytes([i]) * 1000 for i in range(6))
    registry = FakeRegistry(a, b, c, d, e, f)
    blobs = cache(tmp_path, registry, max_bytes=3000)
    for data, pin in ((a, "pa"), (b, "pb"), (c, "pc")):
        await blobs.ensure([ref(data)], pin=pin)
    blobs.unpin("pa")
    blobs.unpin("pb")
    await blobs.ensure([ref(a)], pin="pa-again")  # used again: b is now the oldest
    blobs.unpin("pa-again")
    evictions = metric("infermesh_blob_cache_evictions_total")
    await blobs.ensure([ref(d)], pin="pd")

    def here(data: bytes) -> bool:
        return (tmp_path / "sha256" / hexof(data)).exists()

    assert [here(x) for x in (a, b, c, d)] == [True, False, True, True]
    await blobs.ensure([ref(e)], pin="pe")
    assert [here(x) for x in (a, c, d, e)] == [False, True, True, True]  # c is pinned
    assert metric("infermesh_blob_cache_evictions_total") == evictions + 2
    with pytest.raises(errors.ResourceExhausted):  # c, d, e are all pinned
        await blobs.ensure([ref(f)], pin="pf")
    assert blobs.usage() == (3000, 3000)


async def test_a_version_that_cannot_fit_is_refused_and_leaves_nothing_behind(tmp_path):
    pinned, small, big = b"p" * 1000, b"s" * 500, b"b" * 1500
    registry = FakeRegistry(pinned, small, big)
    blobs = cache(tmp_path, registry, max_bytes=2500)
    await blobs.ensure([ref(pinned)], pin="serving")
    with pytest.raises(errors.ResourceExhausted) as refused:
        await blobs.ensure([ref(small, "tokenizer.json"), ref(big, "model.gguf")], pin="next")
    assert "INFERMESH_BLOB_CACHE_MAX_BYTES" in refused.value.message
    assert "2000" in refused.value.message  # the bytes it needed
    assert len(registry.calls) == 1  # not even the file that alone would fit
    assert not list((tmp_path / "incoming").iterdir())
    assert [p.name for p in (tmp_path / "sha256").iterdir()] == [hexof(pinned)]
    assert blobs.usage() == (1000, 2500)
    # the failed ensure pinned nothing: once `serving` lets go, the version fits
    blobs.unpin("serving")
    await blobs.ensure([ref(small), ref(big)], pin="next")
    assert not (tmp_path / "sha256" / hexof(pinned)).exists()


async def test_concurrent_ensures_of_one_blob_download_it_once(tmp_path):
    data = os.urandom(4000)
    registry = FakeRegistry(data)
    registry.gate = asyncio.Event()
    blobs = cache(tmp_path, registry)
    first = asyncio.create_task(blobs.ensure([ref(data)], pin="gateway"))
    second = asyncio.create_task(blobs.ensure([ref(data, "other-name")], pin="replica"))
    await asyncio.sleep(0.05)
    registry.gate.set()
    await asyncio.gather(first, second)
    assert registry.calls == [(ref(data)["digest"], 0)]
    assert blobs.usage()[0] == 4000


async def test_a_download_failing_midway_leaves_a_resumable_partial(tmp_path):
    data = os.urandom(5000)
    digest = ref(data)["digest"]
    registry = FakeRegistry(data)
    registry.break_after = 2500
    blobs = cache(tmp_path, registry)
    with pytest.raises(errors.Unavailable):
        await blobs.ensure([ref(data)], pin="v1")
    partial = tmp_path / "incoming" / f"{hexof(data)}.partial"
    assert partial.read_bytes() == data[:2500]
    assert not (tmp_path / "sha256" / hexof(data)).exists()
    assert blobs.usage()[0] == 2500
    registry.break_after = None
    await blobs.ensure([ref(data)], pin="v1")
    assert registry.calls == [(digest, 0), (digest, 2500)]
    assert blobs.usage()[0] == 5000


async def test_a_stalled_download_times_out_and_resumes_later(tmp_path):
    data = os.urandom(3000)
    registry = FakeRegistry(data)
    registry.gate = asyncio.Event()
    blobs = cache(tmp_path, registry, timeout_s=0.1)
    with pytest.raises(errors.DeadlineExceeded):
        await blobs.ensure([ref(data)], pin="v1")
    assert blobs.usage()[0] == 0
    registry.gate.set()
    await blobs.ensure([ref(data)], pin="v1")
    assert (tmp_path / "sha256" / hexof(data)).read_bytes() == data


async def test_a_large_blobs_deadline_scales_with_the_bytes_left(tmp_path, monkeypatch):
    """`timeout_s` is only the floor: a blob that needs longer at the least transfer rate gets
    it (the rule the registry client's RPC deadline uses), and a resume gets the deadline of the
    bytes it still has to fetch."""
    data = os.urandom(6 << 20)
    registry = FakeRegistry(data, chunk=1 << 20)
    registry.delay_s = 0.05  # ~0.3 s in all: past the 0.1 s floor, well within 1.5 s
    deadlines: list[tuple[int, float]] = []

    def recorded(size: int, floor_s: float) -> float:
        deadlines.append((size, floor_s))
        return transfer_timeout_s(size, floor_s)

    monkeypatch.setattr(blob_cache, "transfer_timeout_s", recorded)
    await cache(tmp_path / "full", registry, 16 << 20, timeout_s=0.1).ensure([ref(data)], "v1")
    assert (tmp_path / "full" / "sha256" / hexof(data)).read_bytes() == data
    assert deadlines == [(6 << 20, 0.1)] and transfer_timeout_s(6 << 20, 0.1) == 1.5
    resumed = cache(tmp_path / "resumed", registry, 16 << 20, timeout_s=0.1)
    (tmp_path / "resumed" / "incoming" / f"{hexof(data)}.partial").write_bytes(data[:4 << 20])
    await resumed.ensure([ref(data)], "v1")
    assert registry.calls[-1] == (ref(data)["digest"], 4 << 20)
    assert deadlines[-1] == (2 << 20, 0.1)
    assert transfer_timeout_s(10, 300.0) == 300.0 and transfer_timeout_s(10) == 60.0


async def test_a_stream_that_ends_early_is_retryable(tmp_path):
    data = os.urandom(3000)
    registry = FakeRegistry(data)
    registry.blobs[ref(data)["digest"]] = data[:1000]
    with pytest.raises(errors.Unavailable):
        await cache(tmp_path, registry).ensure([ref(data)], pin="v1")
    assert (tmp_path / "incoming" / f"{hexof(data)}.partial").stat().st_size == 1000


async def test_an_empty_file_is_a_blob_too(tmp_path):
    registry = FakeRegistry(b"")
    blobs = cache(tmp_path, registry)
    # a canonical manifest leaves size_bytes out at 0
    await blobs.ensure([{"name": "empty", "digest": ref(b"")["digest"]}], pin="v1")
    assert blobs.store.verified_path(ref(b"")["digest"]).read_bytes() == b""
    with pytest.raises(errors.InvalidArgument) as bad:
        await blobs.ensure([{"name": "x", "digest": "sha256:short"}], pin="v2")
    assert bad.value.field == "files[0].digest"
