"""Prompt prefix hashes for prefix-affinity routing, computed by the gateway, read by the scheduler.

The rendered prompt is cut into blocks of `BLOCK_CHARS` characters; each block's hash chains the
previous one (h0 = H(block0), hN = H(hN-1, blockN)), so equal hashes at position N mean equal
prompts up to the end of block N. Characters, not tokens: the gateway need not tokenize, and the
match is approximate anyway (as llm-d's prefix-cache scorer). A trailing partial block is not
hashed, and at most `MAX_BLOCKS` are, which bounds the work and the request size.

A `salt` (the tenant, when its plan isolates its prefix cache) starts the chain from its own
hash, so equal prompts of two salts share no block hash: no prefix affinity between them.
"""

from __future__ import annotations

import hashlib

BLOCK_CHARS = 64
MAX_BLOCKS = 256


def prompt_block_hashes(text: str, salt: str = "") -> list[int]:
    """The chained uint64 (blake2b, 8 bytes) hashes of `text`'s full leading blocks, salted by
    `salt` when there is one."""
    hashes: list[int] = []
    previous = hashlib.blake2b(salt.encode(), digest_size=8).digest() if salt else b""
    blocks = min(len(text) // BLOCK_CHARS, MAX_BLOCKS)
    for start in range(0, blocks * BLOCK_CHARS, BLOCK_CHARS):
        digest = hashlib.blake2b(
            previous + text[start : start + BLOCK_CHARS].encode(), digest_size=8
        ).digest()
        hashes.append(int.from_bytes(digest, "little"))
        previous = digest
    return hashes
