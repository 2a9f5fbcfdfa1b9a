"""KV-cache events: which blocks an engine's prefix cache holds, published in order.

The shapes follow vLLM's `KVEventBatch` (`BlockStored`, `BlockRemoved`, `AllBlocksCleared`) and
TensorRT-LLM's `KVCacheEvent` closely enough that an adapter for either is a translation
(docs/decisions.md has the mapping). Every batch carries the log's `epoch` (a random id per engine
instance: a restarted engine starts a new one) and a sequence number that grows by one per batch,
so a reader knows when it missed something; a `KvSnapshot` is the whole state at one sequence
number, which a reader that connects, reconnects or sees a gap starts from.

`KvEventLog` is the thread-safe publisher the engines' Triton models and the sidecar share: it
keeps the blocks held (so a snapshot is always at hand, consistent with the last batch) and hands
each subscriber its snapshot, then every later batch, through a bounded queue; a subscriber that
falls more than `max_queued` batches behind is dropped (it reconnects and gets a fresh snapshot),
so a slow reader never grows the engine's memory or slows its steps.
"""

from __future__ import annotations

import secrets
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["MAX_VIEW_BLOCKS", "AllBlocksCleared", "BlockRemoved", "BlockStored", "HeldBlocks",
           "KvEvent", "KvEventBatch", "KvEventLog", "KvSnapshot", "Subscription", "merge_stores"]

# The most blocks of one engine a reader keeps (the schedulers' index) or takes in one snapshot
# (the codec's frame holds that many: `kv_event_codec.MAX_FRAME_BYTES`).
MAX_VIEW_BLOCKS = 1 << 20


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Blocks of one chain now findable in the cache: `block_hashes[0]`'s parent is
    `parent_block_hash` (None: the chain's first block), each next one's parent the one before."""

    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    block_size: int  # tokens per block (every stored block is full)


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks evicted: no longer findable."""

    block_hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The cache is empty (an engine started or restarted, or dropped every block)."""


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class KvEventBatch:
    epoch: int  # the log's id: a new one after an engine restart
    seq: int  # 1 for a log's first batch, then one more per batch
    timestamp_ns: int  # wall clock when the engine published it (the index's lag is from here)
    events: tuple[KvEvent, ...]


@dataclass(frozen=True, slots=True)
class KvSnapshot:
    """Every block held once batch `seq` of `epoch` is applied (seq 0: before any batch)."""

    epoch: int
    seq: int
    timestamp_ns: int
    block_hashes: tuple[int, ...]
    block_size: int


def merge_stores(events: Iterable[KvEvent]) -> list[KvEvent]:
    """Consecutive stores that continue one chain, as one store (what vLLM sends per request)."""
    merged: list[KvEvent] = []
    for event in events:
        last = merged[-1] if merged else None
        if (isinstance(event, BlockStored) and isinstance(last, BlockStored)
                and last.block_size == event.block_size
                and event.parent_block_hash == last.block_hashes[-1]):
            merged[-1] = BlockStored(last.block_hashes + event.block_hashes,
                                     last.parent_block_hash, last.block_size)
        else:
            merged.append(event)
    return merged


class HeldBlocks:
    """The blocks one engine holds, as its events say; not thread-safe."""

    def __init__(self) -> None:
        self.hashes: set[int] = set()
        self.block_size = 0

    def apply(self, events: Iterable[KvEvent]) -> None:
        for event in events:
            if isinstance(event, BlockStored):
                self.hashes.update(event.block_hashes)
                self.block_size = event.block_size
            elif isinstance(event, BlockRemoved):
                self.hashes.difference_update(event.block_hashes)
            else:
                self.hashes.clear()


class Subscription:
    """One reader's queue: its snapshot first, then batches; `lost` once it fell behind."""

    def __init__(self, snapshot: KvSnapshot, max_queued: int):
        self._condition = threading.Condition()
        self._items: deque[KvSnapshot | KvEventBatch] = deque([snapshot])
        self._max_queued = max_queued
        self.lost = False  # guarded by _condition
        self.closed = False  # guarded by _condition

    def _offer(self, item: KvSnapshot | KvEventBatch) -> bool:
        """Queues `item`; False (and lost) when the reader is too far behind."""
        with self._condition:
            if self.closed or self.lost:
                return False
            if len(self._items) >= self._max_queued:
                self.lost = True
                self._items.clear()
            else:
                self._items.append(item)
            self._condition.notify()
            return not self.lost

    def take(self, timeout_s: float) -> list[KvSnapshot | KvEventBatch] | None:
        """What is queued, waiting up to `timeout_s` for something; None once lost or closed."""
        with self._condition:
            if not self._items and not (self.lost or self.closed):
                self._condition.wait(timeout_s)
            if self.lost or self.closed:
                return None
            items = list(self._items)
            self._items.clear()
            return items

    def close(self) -> None:
        with self._condition:
            self.closed = True
            self._items.clear()
            self._condition.notify_all()


class KvEventLog:
    """An engine's (or a mirror's) ordered KV events, its held blocks and its subscribers."""

    def __init__(self, max_queued: int = 1024, epoch: int | None = None):
        if max_queued < 1:
            raise ValueError(f"max_queued must be at least 1, got {max_queued}")
        self._lock = threading.Lock()
        self._held = HeldBlocks()
        self._epoch = secrets.randbits(63) if epoch is None else epoch
        self._seq = 0
        self._timestamp_ns = 0
        self._max_queued = max_queued
        self._subscribers: list[Subscription] = []

    def publish(self, events: Sequence[KvEvent], timestamp_ns: int) -> KvEventBatch | None:
        """The next batch of this log's own events (None when there are none)."""
        if not events:
            return None
        with self._lock:
            batch = KvEventBatch(self._epoch, self._seq + 1, timestamp_ns, tuple(events))
            self._apply(batch)
            return batch

    def relay(self, item: KvSnapshot | KvEventBatch) -> bool:
        """Mirrors another log: a snapshot replaces the state, a batch must follow the last one
        of its epoch (False, and nothing applied, on a gap: the caller gets a snapshot)."""
        with self._lock:
            if isinstance(item, KvSnapshot):
                self._epoch, self._seq, self._timestamp_ns = item.epoch, item.seq, item.timestamp_ns
                self._held.hashes = set(item.block_hashes)
                self._held.block_size = item.block_size
                snapshot = self._snapshot()
                self._subscribers = [s for s in self._subscribers if s._offer(snapshot)]
                return True
            if item.epoch != self._epoch or item.seq != self._seq + 1:
                return False
            self._apply(item)
            return True

    def _apply(self, batch: KvEventBatch) -> None:
        self._held.apply(batch.events)
        self._seq, self._timestamp_ns = batch.seq, batch.timestamp_ns
        self._subscribers = [s for s in self._subscribers if s._offer(batch)]

    def _snapshot(self) -> KvSnapshot:
        return KvSnapshot(self._epoch, self._seq, self._timestamp_ns,
                          tuple(self._held.hashes), self._held.block_size)

    def snapshot(self) -> KvSnapshot:
        with self._lock:
            return self._snapshot()

    def subscribe(self) -> Subscription:
        """A reader's subscription, starting from the snapshot at the current batch."""
        with self._lock:
            subscription = Subscription(self._snapshot(), self._max_queued)
            self._subscribers.append(subscription)
            return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscription.close()
        with self._lock:
            if subscription in self._subscribers:
                self._subscribers.remove(subscription)
