"""The registry's DownloadBlob stream (`server.blob_chunks`) over a blob store: a resume reads
only the bytes after its offset, and a blob corrupt on the registry's disk is never served whole
from 0."""

from __future__ import annotations

import hashlib
import os
import pathlib
from collections.abc import Iterator

import pytest

from services.common import errors
from services.registry.blobs import LocalBlobStore
from services.registry.server import blob_chunks


class CountingStore(LocalBlobStore):
    """A local store that counts the bytes its reads hand out."""

    def __init__(self, root: pathlib.Path):
        super().__init__(root)
        self.bytes_read = 0

    def read(self, digest: str, offset: int = 0) -> Iterator[bytes]:
        for chunk in super().read(digest, offset):
            self.bytes_read += len(chunk)
            yield chunk


async def served(store: LocalBlobStore, digest: str, offset: int) -> bytes:
    return b"".join([chunk async for chunk in blob_chunks(store, digest, offset)])


async def test_a_resume_reads_only_the_bytes_left(tmp_path):
    data = os.urandom(5 << 20)
    store = CountingStore(tmp_path)
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    store.write(digest, len(data), [data])
    offset = len(data) - 1000  # near the end of a large blob
    assert await served(store, digest, offset) == data[offset:]
    assert store.bytes_read == 1000
    assert await served(store, digest, len(data)) == b""
    assert store.bytes_read == 1000
    assert await served(store, digest, 0) == data
    assert store.bytes_read == 1000 + len(data)


async def test_a_corrupt_blob_is_refused_from_0(tmp_path):
    data = os.urandom(3 << 20)
    store = LocalBlobStore(tmp_path)
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    store.write(digest, len(data), [data])
    path = store.verified_path(digest)
    path.chmod(0o644)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(errors.Internal):
        await served(store, digest, 0)
