"""The KV index and the precise policy: routes follow what the engines report holding."""

from __future__ import annotations

import sys

from services.common.kv_blocks import block_hashes
from services.common.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEventBatch,
    KvSnapshot,
)
from services.scheduler.kv_index import SNAPSHOT_STEP, KvIndex
from services.scheduler.outcome import Outcome
from services.scheduler.routing import Policy, Router, RoutingConfig
from tests.unit.scheduler_builders import query, replica

SYSTEM = block_hashes(list(range(40)), 4)  # a long shared prefix: 10 blocks
OTHER = block_hashes(list(range(100, 140)), 4)


def snapshot(hashes, epoch=1, seq=0) -> KvSnapshot:
    return KvSnapshot(epoch, seq, 0, tuple(hashes), 4)


def batch(seq, *events, epoch=1) -> KvEventBatch:
    return KvEventBatch(epoch, seq, 0, tuple(events))


def test_matches_the_longest_leading_run_each_replica_holds():
    index = KvIndex()
    index.snapshot("a", "m", snapshot(SYSTEM[:6]), 0)
    index.snapshot("b", "m", snapshot(SYSTEM), 0)
    index.snapshot("c", "m", snapshot(SYSTEM[1:]), 0)  # no first block: matches nothing
    assert index.matches("m", SYSTEM) == {"a": 6, "b": 10}
    assert index.matches("other", SYSTEM) == {}
    assert index.batch("b", "m", batch(1, BlockRemoved((SYSTEM[3],))), 0, 0)
    assert index.matches("m", SYSTEM) == {"a": 6, "b": 3}
    assert index.blocks() == 6 + 9 + 9
    assert index.bytes_per_million_blocks() > 0


def test_a_gap_makes_the_view_stale_and_a_snapshot_makes_it_live_again():
    index = KvIndex()
    index.snapshot("a", "m", snapshot(()), 0)
    assert index.batch("a", "m", batch(1, BlockStored(tuple(SYSTEM), None, 4)), 0, 0)
    assert not index.batch("a", "m", batch(3, BlockRemoved(tuple(SYSTEM))), 0, 0)  # 2 is lost
    assert not index.live("a", "m")
    assert not index.batch("a", "m", batch(4, BlockRemoved(())), 0, 0)  # refused until resync
    index.snapshot("a", "m", snapshot(OTHER, seq=4), 0)
    assert index.live("a", "m") and index.matches("m", SYSTEM) == {}
    assert index.matches("m", OTHER) == {"a": 10}
    # A restarted engine's first batch clears everything, whatever its epoch and number.
    assert index.batch("a", "m", batch(1, AllBlocksCleared(), epoch=2), 0, 0)
    assert index.matches("m", OTHER) == {} and index.views["a", "m"].epoch == 2


def test_a_view_beyond_its_bound_is_dropped():
    index = KvIndex(max_blocks_per_view=5)
    assert not index.snapshot("a", "m", snapshot(SYSTEM), 0)
    assert ("a", "m") not in index.views and index.blocks() == 0
    index.snapshot("a", "m", snapshot(SYSTEM[:5]), 0)
    assert not index.batch("a", "m", batch(1, BlockStored(tuple(OTHER), None, 4)), 0, 0)
    assert index.blocks() == 0


def routed(router: Router, hashes, replicas) -> str:
    reservation = router.route(query(kv_hashes=hashes, hashes=hashes), replicas, {}, 0)
    router.release(reservation.reservation_id, Outcome.OK, 0)
    return reservation.replica.replica_id


def test_a_restarted_replica_stops_attracting_its_old_prefix_where_approximate_keeps_it():
    replicas = [replica("a"), replica("b")]
    precise, approximate = Router(RoutingConfig()), Router(RoutingConfig(Policy.KV_AWARE))
    assert precise.config.policy is Policy.PRECISE  # the default
    for router in (precise, approximate):
        first = routed(router, SYSTEM, replicas)
        router.kv.snapshot(first, "m", snapshot(SYSTEM), 0)
        router.kv.snapshot("ab".replace(first, ""), "m", snapshot(OTHER), 0)
        assert routed(router, SYSTEM, replicas) == first
        router.kv.batch(first, "m", batch(1, AllBlocksCleared(), epoch=9), 0, 0)  # restarted
        other = "ab".replace(first, "")
        router.kv.batch(other, "m", batch(1, BlockStored(tuple(SYSTEM), None, 4)), 0, 0)
        expected = other if router is precise else first
        assert routed(router, SYSTEM, replicas) == expected


def test_evicted_blocks_stop_attracting_and_a_silent_replica_falls_back_alone():
    router = Router(RoutingConfig(Policy.PRECISE))
    replicas = [replica("a"), replica("b")]
    router.kv.snapshot("a", "m", snapshot(SYSTEM), 0)
    router.kv.snapshot("b", "m", snapshot(()), 0)
    assert routed(router, SYSTEM, replicas) == "a"
    router.kv.batch("a", "m", batch(1, BlockRemoved(tuple(SYSTEM))), 0, 0)  # evicted
    router.kv.batch("b", "m", batch(1, BlockStored(tuple(SYSTEM[:2]), None, 4)), 0, 0)
    assert routed(router, SYSTEM, replicas) == "b"
    # b's events stop: b alone is scored by the approximate index (which last routed the
    # prompt to b, a whole match), a still by what its engine holds (nothing).
    router.kv.stale("b")
    assert not router.kv.live("b", "m") and router.kv.live("a", "m")
    assert router.prefix.matches("m", SYSTEM)["b"] == len(SYSTEM)
    assert routed(router, SYSTEM, replicas) == "b"


def test_a_big_snapshot_is_applied_in_steps_and_counts_only_when_whole():
    """Review finding: a million-block snapshot in one call stalls routing; in steps the loop
    runs between them, and the view is not live (not used) until the last step."""
    old = tuple(range(1, SNAPSHOT_STEP + 2))
    new = tuple(range(10**9, 10**9 + 2 * SNAPSHOT_STEP + 1))
    index = KvIndex()
    index.snapshot("a", "m", KvSnapshot(1, 0, 0, old, 4), 0)
    steps = 0
    for _ in index.snapshot_steps("a", "m", KvSnapshot(2, 0, 0, new, 4), 1.0):
        steps += 1
        assert not index.live("a", "m")
    assert steps == 2 + 3  # the old view out, then the new one in, a step at a time
    assert index.live("a", "m") and index.views["a", "m"].blocks == len(new)
    assert index.matches("m", new[:3]) == {"a": 3} and index.matches("m", old[:1]) == {}
    assert index.blocks() == len(new)


def test_the_memory_estimate_samples_and_stays_near_the_measured_size():
    index = KvIndex()
    hashes = block_hashes(list(range(40_000)), 1)
    index.snapshot("a", "m", snapshot(hashes), 0)
    index.snapshot("b", "m", snapshot(hashes[:20_000]), 0)
    holders = index._holders["m"]
    measured = (sys.getsizeof(holders) + sum(sys.getsizeof(s) for s in index._held.values())
                + sum(sys.getsizeof(h) + sys.getsizeof(r) for h, r in holders.items()))
    estimate = index.bytes_per_million_blocks() * index.blocks() / 1e6
    assert abs(estimate - measured) / measured < 0.1


def test_a_view_dropped_during_its_stepped_snapshot_keeps_nothing():
    """Review finding: the replica stopped serving the model while its first snapshot was being
    applied; the snapshot went on storing and left a live, frozen view (and its memory)."""
    hashes = tuple(range(1, 3 * SNAPSHOT_STEP + 1))
    index = KvIndex()
    steps = index.snapshot_steps("a", "m", KvSnapshot(1, 0, 0, hashes, 4), 0)
    next(steps)  # the first step stored; no view exists yet
    assert index.blocks() == SNAPSHOT_STEP and ("a", "m") not in index.views
    index.drop("a", "m")
    assert list(steps) == []  # the snapshot ends at its next step
    assert ("a", "m") not in index.views and not index.live("a", "m")
    assert index.blocks() == 0 and index.matches("m", hashes[:3]) == {}
    assert index.bytes_per_million_blocks() == 0.0


def test_a_newer_snapshot_ends_the_older_one_in_progress():
    first, second = tuple(range(1, 2 * SNAPSHOT_STEP + 1)), (10**9, 10**9 + 1)
    index = KvIndex()
    older = index.snapshot_steps("a", "m", KvSnapshot(1, 0, 0, first, 4), 0)
    next(older)
    assert index.snapshot("a", "m", KvSnapshot(2, 0, 0, second, 4), 1.0)
    assert list(older) == []
    assert index.views["a", "m"].epoch == 2 and index.blocks() == len(second)
