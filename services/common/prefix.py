"""Prompt prefix hashes for prefix-affinity routing, computed by the gateway, read by the scheduler.

The rendered prompt is cut into blocks of `BLOCK_CHARS` characters; each block's hash chains the
previous one (h0 = H(block0), hN = H(blockN) seeded with hN-1), so equal hashes at position N mean
equal prompts up to the end of block N. H is xxh3-64: the hashes are affinity hints, not secrets,
and the gateway computes them for every request. Characters, not tokens: the gateway need not
tokenize, and the match is approximate anyway (as llm-d's prefix-cache scorer). A trailing
partial block is not hashed, and at most `MAX_BLOCKS` are, which bounds the work and the request
size.

A `salt` (the tenant, when its plan isolates its prefix cache) starts the chain from its own
hash, so equal prompts of two salts share no block hash: no prefix affinity between them.
"""

from __future__ import annotations

import xxhash

BLOCK_CHARS = 64
MAX_BLOCKS = 256


def prompt_block_hashes(text: str, salt: str = "") -> list[int]:
    """The chained uint64 (xxh3) hashes of `text`'s full leading blocks, salted by `salt` when
    there is one."""
    hashes: list[int] = []
    chained = xxhash.xxh3_64_intdigest(salt.encode()) if salt else 0
    blocks = min(len(text) // BLOCK_CHARS, MAX_BLOCKS)
    for start in range(0, blocks * BLOCK_CHARS, BLOCK_CHARS):
        chained = xxhash.xxh3_64_intdigest(text[start : start + BLOCK_CHARS].encode(), chained)
        hashes.append(chained)
    return hashes
