"""Token-block hashes and KV events: one hash everywhere, events that say what the cache holds."""

from __future__ import annotations

from transformers.generation.continuous_batching.cache_allocators.cache_allocator import (
    compute_block_hash,
)

from backends.triton.reference_engine import EngineConfig, GenerationRequest, ReferenceEngine
from services.common.kv_blocks import (
    MAX_BLOCKS,
    block_hashes,
    chain_root,
    prompt_blocks,
    word_token_ids,
)
from services.common.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    HeldBlocks,
    KvEventBatch,
    KvEventLog,
    KvSnapshot,
    merge_stores,
)


def test_block_hashes_chain_every_earlier_block() -> None:
    tokens = list(range(100, 112))
    hashes = block_hashes(tokens, 4)
    assert len(hashes) == 3 and len(set(hashes)) == 3
    assert block_hashes(tokens[:11], 4) == hashes[:2]  # a partial block is not hashed
    other = [7, *tokens[1:]]
    assert all(a != b for a, b in zip(block_hashes(other, 4), hashes, strict=True))
    assert block_hashes(tokens, 4, hashes[0], start=1) == hashes[1:]
    assert block_hashes(tokens, 4, limit=2) == hashes[:2]


def test_the_hash_is_the_one_transformers_cache_computes() -> None:
    """The torch engine's cache hashes its blocks with transformers' own function: ours must
    give the same value for the same tokens, chain and all."""
    tokens = [1, 9_000, 49_151, 0, 17, 2**31 - 1, 5, 6]
    parent = None
    for index, expected in enumerate(block_hashes(tokens, 4)):
        parent = compute_block_hash(parent, tokens[index * 4:(index + 1) * 4])
        assert expected == parent


def test_prompt_blocks_leave_the_last_token_out_salt_the_root_and_are_bounded() -> None:
    tokens = list(range(16))
    assert prompt_blocks(tokens, 4) == block_hashes(tokens, 4)[:3]  # token 15 is computed
    assert prompt_blocks([*tokens, 99], 4) == block_hashes(tokens, 4)
    salted = prompt_blocks(tokens, 4, "tenant-a")
    assert salted == block_hashes(tokens[:15], 4, chain_root("tenant-a"))
    assert not set(salted) & set(prompt_blocks(tokens, 4))
    assert len(prompt_blocks([1] * 4 * (MAX_BLOCKS + 3), 4)) == MAX_BLOCKS
    assert prompt_blocks([], 4) == []


def test_word_ids_are_stable_positive_int32() -> None:
    ids = word_token_ids(["the", "harbour", "the"])
    assert ids[0] == ids[2] != ids[1]
    assert all(0 <= i < 2**31 for i in ids)


def _held(engine: ReferenceEngine, held: HeldBlocks) -> set[int]:
    held.apply(engine.kv_events())
    return held.hashes


def test_the_reference_engines_events_say_exactly_which_blocks_it_can_find() -> None:
    engine = ReferenceEngine(EngineConfig(kv_cache_blocks=6, kv_block_tokens=4))
    events = engine.kv_events()
    assert events == [AllBlocksCleared()]
    prompt = " ".join(f"w{i}" for i in range(13))
    engine.add_request(GenerationRequest(0, prompt, max_tokens=3))
    engine.step()
    stored = engine.kv_events()
    assert len(stored) == 1 and isinstance(stored[0], BlockStored)
    ids = word_token_ids(prompt.split())
    assert stored[0].block_hashes == tuple(block_hashes(ids, 4))  # one chain, one event
    assert stored[0].parent_block_hash is None and stored[0].block_size == 4
    held = HeldBlocks()
    held.apply(events + stored)
    while engine.has_unfinished_requests():
        engine.step()
    # Other prompts fill the small pool: the first prompt's blocks are evicted, and said so.
    for request_id in range(1, 4):
        engine.add_request(GenerationRequest(
            request_id, " ".join(f"x{request_id}-{i}" for i in range(17)), max_tokens=2))
        while engine.has_unfinished_requests():
            engine.step()
        _held(engine, held)
    assert not set(stored[0].block_hashes) & held.hashes
    assert held.hashes == set(engine._pool._by_hash)  # the pool's own index


def test_merge_stores_joins_one_chain_only() -> None:
    a, b = BlockStored((1,), None, 4), BlockStored((2,), 1, 4)
    c = BlockStored((9,), None, 4)
    assert merge_stores([a, b, c, BlockRemoved((1,))]) == [
        BlockStored((1, 2), None, 4), c, BlockRemoved((1,))]


def test_a_subscriber_gets_the_snapshot_then_every_batch_and_a_laggard_is_dropped() -> None:
    log = KvEventLog(max_queued=3, epoch=5)
    log.publish([BlockStored((1, 2), None, 4)], 10)
    subscription = log.subscribe()
    log.publish([BlockRemoved((2,))], 11)
    snapshot, batch = subscription.take(0.0)
    assert isinstance(snapshot, KvSnapshot) and isinstance(batch, KvEventBatch)
    assert (snapshot.epoch, snapshot.seq, set(snapshot.block_hashes)) == (5, 1, {1, 2})
    assert (batch.seq, batch.events) == (2, (BlockRemoved((2,)),))
    for n in range(4):
        log.publish([BlockStored((10 + n,), None, 4)], 12 + n)
    assert subscription.take(0.0) is None and subscription.lost
    assert set(log.subscribe().take(0.0)[0].block_hashes) == {1, 10, 11, 12, 13}


def test_a_mirror_refuses_a_gap_and_takes_a_snapshot() -> None:
    engine, mirror = KvEventLog(epoch=1), KvEventLog()
    mirror.relay(engine.snapshot())
    first = engine.publish([BlockStored((1,), None, 4)], 1)
    engine.publish([BlockStored((2,), 1, 4)], 2)  # the mirror never sees this one
    third = engine.publish([BlockRemoved((1,))], 3)
    assert first is not None and third is not None
    assert mirror.relay(first)
    assert not mirror.relay(third)  # a gap: nothing applied
    assert set(mirror.snapshot().block_hashes) == {1}
    assert mirror.relay(engine.snapshot())
    assert mirror.snapshot() == engine.snapshot()
