"""Which replica most likely holds a prompt's leading blocks in its KV cache, learnt from the
routing history (approximate, like llm-d's prefix-cache scorer): every routed request records its
block hashes against the replica it went to.

Bounded: per model, at most `max_blocks` hashes (least recently routed evicted first), each
remembering at most `holders_per_block` replicas (most recent kept).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixIndex:
    def __init__(self, max_blocks: int = 65_536, holders_per_block: int = 8):
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be at least 1, got {max_blocks}")
        if holders_per_block < 1:
            raise ValueError(f"holders_per_block must be at least 1, got {holders_per_block}")
        self._max_blocks = max_blocks
        self._holders_per_block = holders_per_block
        # model → block hash → replica ids, most recent last (a tuple: ~50 bytes, where a set
        # or dict would take ~200; at 65 536 blocks a model's index stays near 10 MB)
        self._models: dict[str, OrderedDict[int, tuple[str, ...]]] = {}
        self._held: dict[str, dict[str, int]] = {}  # model → replica → blocks it holds here

    def blocks(self, model: str) -> int:
        return len(self._models.get(model, ()))

    def held(self, model: str) -> dict[str, int]:
        """Replica id → how many of the model's indexed blocks it holds (its likely share of
        cached prefixes). Do not mutate."""
        return self._held.get(model, {})

    def matches(self, model: str, hashes: Sequence[int]) -> dict[str, int]:
        """Replica id → length of the longest leading chain of `hashes` it was routed; replicas
        with no match are absent."""
        index = self._models.get(model)
        if not index or not hashes:
            return {}
        matched: dict[str, int] = {}
        alive: set[str] = set()
        length = 0  # of the chain every replica in `alive` holds
        for block in hashes:
            holders = index.get(block)
            still = alive.intersection(holders) if length and holders else set(holders or ())
            if length:
                for replica_id in alive - still:  # their chain ended at the previous block
                    matched[replica_id] = length
            if not still:
                return matched
            alive = still
            length += 1
        for replica_id in alive:
            matched[replica_id] = length
        return matched

    def record(self, model: str, hashes: Sequence[int], replica_id: str) -> None:
        """Remembers that `replica_id` served `hashes` just now (it will hold them cached)."""
        if not hashes:
            return
        index = self._models.setdefault(model, OrderedDict())
        held = self._held.setdefault(model, {})
        # Last block first, so a chain's leading blocks are the most recent and evicted last.
        for block in reversed(hashes):
            holders = index.get(block)
            if holders is None:
                index[block] = (replica_id,)
                held[replica_id] = held.get(replica_id, 0) + 1
                continue
            index.move_to_end(block)
            if holders[-1] == replica_id:
                continue
            if replica_id not in holders:
                held[replica_id] = held.get(replica_id, 0) + 1
            holders = (*(h for h in holders if h != replica_id), replica_id)
            for dropped in holders[: -self._holders_per_block]:
                _forget(held, dropped)
            index[block] = holders[-self._holders_per_block:]
        while len(index) > self._max_blocks:
            for dropped in index.popitem(last=False)[1]:
                _forget(held, dropped)


def _forget(held: dict[str, int], replica_id: str) -> None:
    left = held[replica_id] - 1
    if left:
        held[replica_id] = left
    else:
        del held[replica_id]
