"""RFC 6962 Merkle trees: the frontier, proofs and their RFC 9162 checks, against a plain
recursive definition of the tree hash, for every tree and leaf up to a small size."""

from __future__ import annotations

import hashlib

import pytest

from services.auditor import merkle

LEAVES = [merkle.leaf_hash(f"record {i}".encode()) for i in range(34)]


def mth(leaves: list[bytes]) -> bytes:
    """RFC 6962 §2.1, written as the RFC writes it."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return merkle.node_hash(mth(leaves[:k]), mth(leaves[k:]))


def frontier_of(leaves: list[bytes]) -> merkle.Frontier:
    frontier = merkle.Frontier()
    for leaf in leaves:
        frontier.append(leaf)
    return frontier


def test_hashes_are_domain_separated() -> None:
    assert merkle.leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    assert merkle.node_hash(b"a", b"b") == hashlib.sha256(b"\x01ab").digest()
    assert mth([]) == merkle.EMPTY_ROOT


@pytest.mark.parametrize("size", range(len(LEAVES) + 1))
def test_the_frontier_gives_the_tree_hash(size: int) -> None:
    frontier = frontier_of(LEAVES[:size])
    assert frontier.root() == mth(LEAVES[:size])
    assert len(frontier.hashes) == size.bit_count()
    assert merkle.Frontier(frontier.size, frontier.hashes).root() == frontier.root()


def test_a_frontier_with_the_wrong_number_of_hashes_is_refused() -> None:
    with pytest.raises(ValueError, match="3 leaves has 2 hashes"):
        merkle.Frontier(3, [LEAVES[0]])


@pytest.mark.parametrize("size", range(1, len(LEAVES) + 1))
def test_inclusion_proofs_for_every_leaf(size: int) -> None:
    leaves, root = LEAVES[:size], mth(LEAVES[:size])
    for index in range(size):
        ranges = merkle.inclusion_ranges(index, size)
        path = [mth(leaves[lo:hi]) for lo, hi in ranges]
        hashes, whole = merkle.range_hashes(ranges, leaves)
        assert (hashes, whole) == (path, root)
        assert merkle.verify_inclusion(index, size, leaves[index], path, root)
        assert not merkle.verify_inclusion(index, size, LEAVES[-1] if index != 33 else
                                           LEAVES[0], path, root)
        if path:
            assert not merkle.verify_inclusion(index, size, leaves[index], path[:-1], root)
        # From a kept frontier, as after retention dropped the leaves before `base`:
        for base in range(0, index + 1, 3):
            hashes, whole = merkle.range_hashes(ranges, leaves[base:], frontier_of(leaves[:base]))
            assert (hashes, whole) == (path, root)


@pytest.mark.parametrize("new_size", range(1, len(LEAVES) + 1))
def test_consistency_proofs_for_every_pair(new_size: int) -> None:
    new_root = mth(LEAVES[:new_size])
    for old_size in range(new_size + 1):
        old_root = mth(LEAVES[:old_size])
        ranges = merkle.consistency_ranges(old_size, new_size)
        path = [mth(LEAVES[lo:hi]) for lo, hi in ranges]
        assert merkle.range_hashes(ranges, LEAVES[:new_size])[0] == path
        assert merkle.verify_consistency(old_size, new_size, old_root, new_root, path)
        if 0 < old_size < new_size:
            assert not merkle.verify_consistency(old_size, new_size, old_root,
                                                 mth(LEAVES[1:new_size + 1]), path)
            assert not merkle.verify_consistency(old_size, new_size, bytes(32), new_root, path)


def test_proofs_needing_dropped_leaves_are_refused() -> None:
    base = frontier_of(LEAVES[:6])  # subtrees [0, 4) and [4, 6) are kept, not leaf 1
    with pytest.raises(ValueError, match="not kept"):
        merkle.range_hashes(merkle.inclusion_ranges(0, 8), LEAVES[6:8], base)
