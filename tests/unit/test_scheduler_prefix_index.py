import pytest

from services.common.prefix import BLOCK_CHARS, MAX_BLOCKS, prompt_block_hashes
from services.scheduler.prefix_index import PrefixIndex


def test_hashes_chain_full_blocks_only():
    text = "x" * BLOCK_CHARS * 3 + "tail"
    hashes = prompt_block_hashes(text)
    assert len(hashes) == 3 and all(0 <= h < 2**64 for h in hashes)
    assert len(set(hashes)) == 3  # equal blocks, different positions: the chain tells them apart
    assert prompt_block_hashes(text[: BLOCK_CHARS * 2]) == hashes[:2]
    changed = prompt_block_hashes("y" + text[1:])
    assert all(a != b for a, b in zip(changed, hashes, strict=True))  # a change carries on
    assert prompt_block_hashes("short") == []
    assert len(prompt_block_hashes("z" * BLOCK_CHARS * (MAX_BLOCKS + 5))) == MAX_BLOCKS


def test_longest_leading_chain_per_replica():
    index = PrefixIndex()
    index.record("m", [1, 2, 3], "a")
    index.record("m", [1, 2, 7, 8], "b")
    assert index.matches("m", [1, 2, 3, 4]) == {"a": 3, "b": 2}
    assert index.matches("m", [1, 2, 7, 8, 9]) == {"a": 2, "b": 4}
    assert index.matches("m", [5, 2, 3]) == {}  # not a leading chain
    assert index.matches("other", [1, 2]) == {}


def test_the_index_is_bounded_and_evicts_least_recent_tails_first():
    index = PrefixIndex(max_blocks=4)
    index.record("m", [1, 2, 3], "a")
    index.record("m", [10, 11], "b")
    assert index.blocks("m") == 4
    assert index.matches("m", [10, 11]) == {"b": 2}
    assert index.matches("m", [1, 2, 3]) == {"a": 2}  # block 3, a's chain's tail, went first


def test_holders_per_block_are_bounded_most_recent_kept():
    index = PrefixIndex(holders_per_block=2)
    for rid in ("a", "b", "c"):
        index.record("m", [1], rid)
    assert index.matches("m", [1]) == {"b": 1, "c": 1}


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError, match="max_blocks"):
        PrefixIndex(max_blocks=0)
    with pytest.raises(ValueError, match="holders_per_block"):
        PrefixIndex(holders_per_block=0)


def test_held_counts_follow_records_caps_and_evictions():
    index = PrefixIndex(max_blocks=3, holders_per_block=2)
    index.record("m", [1, 2], "a")
    index.record("m", [1], "b")
    assert index.held("m") == {"a": 2, "b": 1}
    index.record("m", [1], "c")  # block 1 keeps its two most recent holders: b and c
    assert index.held("m") == {"a": 1, "b": 1, "c": 1}
    index.record("m", [7, 8], "c")  # four blocks: the least recent (2, a's) is evicted
    assert index.held("m") == {"b": 1, "c": 3}
    assert index.held("other") == {}
