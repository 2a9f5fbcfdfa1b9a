"""Test doubles shared by the unit and integration tests (pure logic only: no fake of a real
server stands in for one in an integration test)."""

from __future__ import annotations

import pathlib
import tempfile
from collections.abc import AsyncIterator

from services.gateway.tokenizers import TokenizerStore
from services.registry.blob_cache import BlobCache


async def _no_download(digest: str, offset: int) -> AsyncIterator[bytes]:
    raise AssertionError(f"this test fetches no blob, yet {digest} was asked for")
    yield b""  # pragma: no cover - makes this an async generator


def whitespace_tokenizers() -> TokenizerStore:
    """A tokenizer store for models that all use the whitespace tokenizer: nothing to fetch."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="infermesh-test-blobs-"))
    return TokenizerStore(BlobCache(root, 1 << 20, _no_download), root)
