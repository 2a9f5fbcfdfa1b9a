"""KV-cache block hashes over token ids: one definition for the engines, the gateway and tests.

A prompt's tokens are cut into blocks of the engine's page size; block N's hash covers its
parent's hash (block N-1's, or the chain's root) and its token ids, so equal hashes at position
N mean equal prompts up to the end of block N, and a block's hash names what it holds wherever
it is computed. The hash is exactly the one transformers' continuous-batching cache computes for
its own prefix cache (`compute_block_hash`): blake2b with an 8-byte digest over the parent's
hash (8 bytes, little-endian; nothing for the first block of an unsalted chain) and the block's
token ids as little-endian int32, read as a little-endian uint64. So the torch engine reports the
hashes its cache really holds, with no second hash to keep in step, and the reference engine and
the gateway compute the same ones. blake2b-64 is stable across processes (Python's `hash` is
not) and costs about a microsecond per block; vLLM's `sha256_cbor` has the same shape (parent +
tokens), and a TensorRT-LLM adapter rehashes the tokens its `KVCacheStoredBlockData` carries.

The reference engine's tokens are whitespace words: each word's id is its xxh32 as a positive
int32 (`word_token_ids`). A `cache_salt` (a tenant whose plan isolates its prefix cache) makes the
chain's root its own hash, so two salts share no block.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import xxhash

__all__ = ["DEFAULT_BLOCK_TOKENS", "MAX_BLOCKS", "block_hash", "block_hashes", "chain_root",
           "prompt_blocks", "word_token_ids"]

MAX_BLOCKS = 256  # the most leading blocks a route request carries (what the scheduler accepts)
# Tokens per block of an engine whose manifest names no page size: the reference engine's
# default (and TensorRT-LLM's usual tokens_per_block).
DEFAULT_BLOCK_TOKENS = 64
_INT32 = 0x7FFFFFFF


def chain_root(cache_salt: str) -> int | None:
    """The parent of a chain's first block: none, or the salt's own hash."""
    if not cache_salt:
        return None
    return int.from_bytes(hashlib.blake2b(cache_salt.encode(), digest_size=8).digest(), "little")


def block_hash(parent: int | None, token_ids: Sequence[int]) -> int:
    """One block's hash (uint64) from its parent's (None: the first block of an unsalted chain)."""
    digest = hashlib.blake2b(digest_size=8)
    if parent is not None:
        digest.update(parent.to_bytes(8, "little"))
    digest.update(struct.pack(f"<{len(token_ids)}i", *token_ids))
    return int.from_bytes(digest.digest(), "little")


def block_hashes(token_ids: Sequence[int], block_tokens: int, parent: int | None = None,
                 start: int = 0, limit: int | None = None) -> list[int]:
    """The chained hashes of the full blocks of `token_ids` from block `start` on (`parent`: the
    hash of block `start - 1`, or the chain's root), at most `limit` of them."""
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be at least 1, got {block_tokens}")
    end = len(token_ids) // block_tokens
    if limit is not None:
        end = min(end, start + limit)
    hashes = []
    for index in range(start, end):
        parent = block_hash(parent, token_ids[index * block_tokens:(index + 1) * block_tokens])
        hashes.append(parent)
    return hashes


def prompt_blocks(token_ids: Sequence[int], block_tokens: int, cache_salt: str = "") -> list[int]:
    """The hashes of the prompt blocks an engine can find in its prefix cache: the full blocks
    before the last token (which is always computed, as its logits give the first new token),
    at most `MAX_BLOCKS`. What the gateway sends with a route request."""
    usable = token_ids[:max(len(token_ids) - 1, 0)]
    return block_hashes(usable, block_tokens, chain_root(cache_salt), limit=MAX_BLOCKS)


def word_token_ids(words: Sequence[str]) -> list[int]:
    """The reference engine's token ids: each whitespace word's xxh32, as a positive int32."""
    return [xxhash.xxh32_intdigest(word.encode()) & _INT32 for word in words]
