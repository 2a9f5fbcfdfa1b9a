"""Which replica holds which KV blocks, as the engines report them (precise prefix routing).

Fed by each replica's sidecar stream (`kv_feed.py`): per (replica, Triton model) a view that
starts from a snapshot and then follows batches in order; a batch that does not follow (a gap, a
new epoch without `AllBlocksCleared` first) is refused, the view goes `resyncing`, and the feed
reconnects for a snapshot. Between, the view is not used: that replica is scored by the
approximate index instead (`live()` says which views count), so a stale view never routes.

Bounded: a view holds at most `max_blocks_per_view` blocks (more than any engine's cache: a view
that claims more is dropped as broken), so memory is bounded by replicas × models × that bound,
and one replica's flood costs its own view's work only. Per model, block hash → the replicas
holding it (a tuple, ~60 bytes with its dict slot, for a few holders). A snapshot (up to a
million blocks) is applied in steps of `SNAPSHOT_STEP` blocks (`snapshot_steps`), the caller
yielding to the loop between them, so a big one does not stall routing; a view dropped (or
snapshotted anew) meanwhile ends the snapshot in progress, which then stores nothing more.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from services.common.kv_events import (
    MAX_VIEW_BLOCKS,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEventBatch,
    KvSnapshot,
)

__all__ = ["SNAPSHOT_STEP", "KvIndex", "ViewState"]

SNAPSHOT_STEP = 16_384  # blocks a snapshot step stores or removes (a few ms)
MEMORY_SAMPLE = 1_000  # entries whose sizes the memory estimate measures


@dataclass
class ViewState:
    """One engine's view, as `meshctl replicas` shows it."""

    epoch: int = 0
    seq: int = 0
    blocks: int = 0
    block_size: int = 0
    live: bool = False  # following its engine's events: precise routing uses it
    applied_at: float = 0.0  # our clock, when the last snapshot or batch was applied
    lag_s: float = 0.0  # engine's publish → applied here, of the last batch (wall clocks)


class KvIndex:
    def __init__(self, max_blocks_per_view: int = MAX_VIEW_BLOCKS):
        if not 1 <= max_blocks_per_view <= MAX_VIEW_BLOCKS:
            raise ValueError(f"max_blocks_per_view must be in [1, {MAX_VIEW_BLOCKS}] (what one "
                             f"KV events frame carries), got {max_blocks_per_view}")
        self._max_blocks = max_blocks_per_view
        self._holders: dict[str, dict[int, tuple[str, ...]]] = {}  # model → hash → replicas
        self._held: dict[tuple[str, str], set[int]] = {}  # (replica, model) → its hashes
        self.views: dict[tuple[str, str], ViewState] = {}
        # (replica, model) → the token of its snapshot in progress; `drop` or a newer snapshot
        # takes it away, which ends the older one at its next step
        self._snapshotting: dict[tuple[str, str], int] = {}
        self._tokens = itertools.count()

    # -- feeding ---------------------------------------------------------------------------

    def snapshot(self, replica: str, model: str, snapshot: KvSnapshot, now: float) -> bool:
        """Replaces the view at once; False (and the view dropped) when it holds more than the
        bound."""
        for _ in self.snapshot_steps(replica, model, snapshot, now):
            pass
        return (replica, model) in self.views

    def snapshot_steps(self, replica: str, model: str, snapshot: KvSnapshot,
                       now: float) -> Iterator[None]:
        """`snapshot` one step of `SNAPSHOT_STEP` blocks at a time (the caller yields to the loop
        at each `None`); the view is not live until the last step. Over the bound, the view is
        dropped and nothing stored. Dropped between steps (its replica no longer serves the
        model), it stops there: `drop` cleared what it had stored, and it stores nothing more."""
        key = (replica, model)
        view = self.views.get(key)
        if view is not None:
            view.live = False
        if len(snapshot.block_hashes) > self._max_blocks:
            self.drop(replica, model)
            return
        token = next(self._tokens)
        self._snapshotting[key] = token
        held = self._held.get(key)
        while held:
            self._remove(replica, model, list(itertools.islice(held, SNAPSHOT_STEP)))
            yield
            if self._snapshotting.get(key) != token:
                return
        hashes = snapshot.block_hashes
        for start in range(0, len(hashes), SNAPSHOT_STEP):
            self._store(replica, model, hashes[start:start + SNAPSHOT_STEP])
            yield
            if self._snapshotting.get(key) != token:
                return
        del self._snapshotting[key]
        self.views[replica, model] = ViewState(
            snapshot.epoch, snapshot.seq, len(self._held.get((replica, model), ())),
            snapshot.block_size, live=True, applied_at=now)

    def batch(self, replica: str, model: str, batch: KvEventBatch, now: float,
              wall_ns: int) -> bool:
        """Applies a batch that follows the view (or starts a new epoch with `AllBlocksCleared`);
        False, and the view no longer live, when it does not (the caller resyncs)."""
        view = self.views.get((replica, model))
        if view is None or not view.live:
            return False
        starts_epoch = bool(batch.events) and isinstance(batch.events[0], AllBlocksCleared)
        if not (batch.epoch == view.epoch and batch.seq == view.seq + 1) and not starts_epoch:
            view.live = False
            return False
        for event in batch.events:
            if isinstance(event, BlockStored):
                self._store(replica, model, event.block_hashes)
                view.block_size = event.block_size
            elif isinstance(event, BlockRemoved):
                self._remove(replica, model, event.block_hashes)
            else:
                self._clear(replica, model)
        held = self._held.get((replica, model), ())
        if len(held) > self._max_blocks:
            self.drop(replica, model)
            return False
        view.epoch, view.seq, view.blocks = batch.epoch, batch.seq, len(held)
        view.applied_at = now
        view.lag_s = max(0.0, (wall_ns - batch.timestamp_ns) / 1e9)
        return True

    def stale(self, replica: str) -> None:
        """The replica's stream broke: its views stop counting until the next snapshot (their
        blocks are kept, unused, so the snapshot's arrival is the only change routing sees)."""
        for (holder, _), view in self.views.items():
            if holder == replica:
                view.live = False

    def drop(self, replica: str, model: str | None = None) -> None:
        """Forgets a replica's view of `model` (None: of every model): it left, or is broken.
        Also what a first snapshot in progress has stored (no view yet), and ends that snapshot."""
        keys = {*self.views, *self._held, *self._snapshotting}
        for key in [k for k in keys if k[0] == replica and model in (None, k[1])]:
            self._clear(*key)
            self._held.pop(key, None)
            self.views.pop(key, None)
            self._snapshotting.pop(key, None)

    def _store(self, replica: str, model: str, hashes: Iterable[int]) -> None:
        held = self._held.setdefault((replica, model), set())
        holders = self._holders.setdefault(model, {})
        for block in hashes:
            if block in held:
                continue
            held.add(block)
            holders[block] = (*holders.get(block, ()), replica)

    def _remove(self, replica: str, model: str, hashes: Iterable[int]) -> None:
        held = self._held.get((replica, model))
        if not held:
            return
        holders = self._holders[model]
        for block in hashes:
            if block not in held:
                continue
            held.discard(block)
            left = tuple(r for r in holders[block] if r != replica)
            if left:
                holders[block] = left
            else:
                del holders[block]

    def _clear(self, replica: str, model: str) -> None:
        held = self._held.get((replica, model))
        if held:
            self._remove(replica, model, list(held))

    # -- reading ---------------------------------------------------------------------------

    def live(self, replica: str, model: str) -> bool:
        view = self.views.get((replica, model))
        return view is not None and view.live

    def matches(self, model: str, hashes: Sequence[int]) -> dict[str, int]:
        """Replica → how many of `hashes`' leading blocks it holds (live views and not alike:
        the scorer asks `live`); replicas holding none are absent."""
        holders = self._holders.get(model)
        if not holders or not hashes:
            return {}
        matched: dict[str, int] = {}
        alive: set[str] = set(holders.get(hashes[0], ()))
        length = 0
        for block in hashes:
            still = alive.intersection(holders.get(block, ())) if length else alive
            for replica in alive - still:
                matched[replica] = length
            if not still:
                return matched
            alive = still
            length += 1
        for replica in alive:
            matched[replica] = length
        return matched

    def blocks(self) -> int:
        """Block entries held (a block held by two replicas counts twice)."""
        return sum(len(held) for held in self._held.values())

    def bytes_per_million_blocks(self) -> float:
        """The index's memory per million block entries: its containers' own sizes, and the
        keys and holder tuples of at most `MEMORY_SAMPLE` entries scaled to all of them (a walk
        of a million entries would hold up the loop)."""
        entries = self.blocks()
        if not entries:
            return 0.0
        size = sum(sys.getsizeof(holders) for holders in self._holders.values())
        size += sum(sys.getsizeof(held) for held in self._held.values())
        hashes = sum(len(holders) for holders in self._holders.values())
        sample = [item for holders in self._holders.values()
                  for item in itertools.islice(holders.items(), MEMORY_SAMPLE)][:MEMORY_SAMPLE]
        if sample:
            sampled = sum(sys.getsizeof(block) + sys.getsizeof(replicas)
                          for block, replicas in sample)
            size += sampled / len(sample) * hashes
        return size / entries * 1e6
