"""Blob uploads from a stream of chunks into the blob store, one writer per digest.

The blob store's file I/O blocks, so chunks are gathered into batches and each batch is written
from a worker thread. A batch that has started is always finished, even when the client goes
away mid-call, so the partial upload on disk is always a clean prefix to resume from.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from prometheus_client import Counter

from services.common import errors
from services.registry.blobs import BlobStore, parse_digest

MAX_CHUNK_BYTES = 4 << 20
BYTES_RECEIVED = Counter("infermesh_registry_blob_bytes_received_total",
                         "Blob bytes received over UploadBlob.")
UPLOADS = Counter("infermesh_registry_blob_uploads_total", "UploadBlob calls, by outcome.",
                  ["outcome"])


@dataclass(frozen=True)
class BlobStatus:
    digest: str
    complete: bool  # verified and visible
    uploaded_bytes: int


class BlobUploads:
    def __init__(self, store: BlobStore, max_blob_bytes: int, batch_bytes: int = 8 << 20):
        self._store = store
        self._max_blob_bytes = max_blob_bytes
        self._batch_bytes = batch_bytes
        self._writing: set[str] = set()

    async def status(self, digest: str) -> BlobStatus:
        parse_digest(digest)
        complete = await asyncio.to_thread(self._store.exists, digest)
        uploaded = await asyncio.to_thread(self._store.uploaded_size, digest)
        return BlobStatus(digest, complete, uploaded)

    async def upload(
        self, digest: str, size: int, offset: int, chunks: AsyncIterator[bytes]
    ) -> BlobStatus:
        """Writes `chunks` from `offset` on; when all `size` bytes are in and verify, the blob
        is visible. Unavailable (retry) while another upload of the same digest runs."""
        parse_digest(digest)
        if not 0 <= size <= self._max_blob_bytes:
            raise errors.InvalidArgument("header.size", f"must be 0..{self._max_blob_bytes} bytes")
        if not 0 <= offset <= size:
            raise errors.InvalidArgument("header.offset", f"must be 0..size ({size})")
        if digest in self._writing:
            raise errors.Unavailable(f"another upload of {digest} is running", retry_after_s=0.5)
        self._writing.add(digest)
        try:
            status = await self._upload(digest, size, offset, chunks)
        except errors.MeshError as exc:
            UPLOADS.labels(exc.code).inc()
            raise
        finally:
            self._writing.discard(digest)
        UPLOADS.labels("complete" if status.complete else "partial").inc()
        return status

    async def _upload(
        self, digest: str, size: int, offset: int, chunks: AsyncIterator[bytes]
    ) -> BlobStatus:
        if await asyncio.to_thread(self._store.exists, digest):
            return BlobStatus(digest, True, size)
        position = offset
        batch: list[bytes] = []
        batched = 0
        async for chunk in chunks:
            if len(chunk) > MAX_CHUNK_BYTES:
                raise errors.InvalidArgument("chunk", f"must be at most {MAX_CHUNK_BYTES} bytes")
            batch.append(chunk)
            batched += len(chunk)
            BYTES_RECEIVED.inc(len(chunk))
            if batched >= self._batch_bytes:
                await self._write(digest, size, batch, position)
                position += batched
                batch, batched = [], 0
        if batch or position == size:  # the last batch, or an empty blob
            await self._write(digest, size, batch, position)
            position += batched
        return await self.status(digest)

    async def _write(self, digest: str, size: int, batch: list[bytes], offset: int) -> None:
        """One batch from a worker thread; finished even if this task is cancelled meanwhile."""
        write = asyncio.ensure_future(
            asyncio.to_thread(self._store.write, digest, size, batch, offset)
        )
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            await asyncio.wait([write])
            raise
