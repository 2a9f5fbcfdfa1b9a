"""RFC 6962 (Certificate Transparency) Merkle trees: hashes, the compact frontier, and inclusion
and consistency proofs, with the RFC 9162 verification algorithms.

    leaf hash  = SHA-256(0x00 || leaf data)
    node hash  = SHA-256(0x01 || left || right)
    MTH({})    = SHA-256("")
    MTH(D[n])  = node(MTH(D[0:k]), MTH(D[k:n])) with k the largest power of two below n

Nothing here knows about files: a tree is a sequence of leaf hashes. The writer keeps only the
`Frontier` (the roots of the perfect subtrees that make up the tree, at most 64 hashes), so
appending costs O(1) amortised and memory does not grow with the log. Proofs are built in one
pass over the leaf hashes (`range_hashes`), again in O(log n) memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
Range = tuple[int, int]  # leaves [lo, hi)


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


class Frontier:
    """The compact form of the tree over leaves [0, size): one subtree root per set bit of
    `size`, largest (leftmost) first. Enough to append and to compute the root."""

    __slots__ = ("hashes", "size")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()):
        if size < 0 or len(hashes) != size.bit_count():
            raise ValueError(f"a frontier of {size} leaves has {size.bit_count()} hashes, "
                             f"got {len(hashes)}")
        self.size = size
        self.hashes = list(hashes)

    def copy(self) -> Frontier:
        return Frontier(self.size, self.hashes)

    def append(self, leaf: bytes) -> None:
        merged = leaf
        size = self.size
        while size & 1:  # every trailing one bit is a full subtree that now gets a sibling
            merged = node_hash(self.hashes.pop(), merged)
            size >>= 1
        self.hashes.append(merged)
        self.size += 1

    def root(self) -> bytes:
        if not self.hashes:
            return EMPTY_ROOT
        root = self.hashes[-1]
        for left in reversed(self.hashes[:-1]):
            root = node_hash(left, root)
        return root


def _split(size: int) -> int:
    """The largest power of two strictly below `size` (size >= 2)."""
    return 1 << ((size - 1).bit_length() - 1)


def inclusion_ranges(index: int, size: int) -> list[Range]:
    """The subtrees whose roots form the audit path of leaf `index` in a tree of `size` leaves
    (RFC 6962 PATH), nearest the leaf first. They are disjoint and cover every other leaf."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of {size} leaves")
    path: list[Range] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index - lo < k:
            path.append((lo + k, hi))
            hi = lo + k
        else:
            path.append((lo, lo + k))
            lo += k
    path.reverse()
    return path


def consistency_ranges(old_size: int, new_size: int) -> list[Range]:
    """The subtrees whose roots prove the tree of `old_size` leaves is a prefix of the tree of
    `new_size` leaves (RFC 6962 SUBPROOF), in proof order. Empty when old_size is 0 or equal."""
    if not 0 <= old_size <= new_size:
        raise ValueError(f"no consistency proof from {old_size} to {new_size} leaves")
    if old_size in (0, new_size):
        return []
    proof: list[Range] = []
    lo, hi, m, whole = 0, new_size, old_size, True
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:
            proof.append((lo + k, hi))
            hi = lo + k
        else:
            proof.append((lo, lo + k))
            lo += k
            m -= k
            whole = False
    if not whole:
        proof.append((lo, hi))
    proof.reverse()
    return proof


def range_hashes(
    ranges: Sequence[Range], leaves: Iterable[bytes], base: Frontier | None = None
) -> tuple[list[bytes], bytes]:
    """Hashes of disjoint `ranges`, and the root of the whole tree, in one pass and O(log n)
    memory. `leaves` are the leaf hashes in order from index `base.size` on (their count
    fixes the tree size); leaves before that are known only through `base`'s subtree roots,
    so a range that reaches below `base.size` must start on one of those subtrees' edges."""
    base = base or Frontier()
    nodes: dict[int, tuple[int, bytes]] = {}  # start -> (end, root) of each base subtree
    lo = 0
    for bit, digest in zip(_set_bits(base.size), base.hashes, strict=True):
        nodes[lo] = (lo + bit, digest)
        lo += bit
    results: list[bytes | None] = [None] * len(ranges)
    open_ranges: list[tuple[int, int, int]] = []  # (lo, hi, index) still needing leaves
    for index, (lo, hi) in enumerate(ranges):
        if lo not in nodes and lo < base.size:
            raise ValueError(f"leaves [{lo}, {min(hi, base.size)}) are not kept")
        if hi <= base.size:
            if nodes[lo][0] != hi:
                raise ValueError(f"leaves [{lo}, {hi}) are not kept as one subtree")
            results[index] = nodes[lo][1]
        else:
            open_ranges.append((lo, hi, index))
    open_ranges.sort()
    whole = base.copy()
    current = Frontier()
    position = 0  # into open_ranges
    for index, leaf in enumerate(leaves, start=base.size):
        whole.append(leaf)
        if position == len(open_ranges):
            continue
        lo, hi, slot = open_ranges[position]
        if index == lo or (index == base.size and lo < base.size):
            kept = [digest for start, (_end, digest) in nodes.items() if start >= lo]
            current = Frontier(max(0, base.size - lo), kept)
        if lo <= index < hi:
            current.append(leaf)
            if index == hi - 1:
                results[slot] = current.root()
                position += 1
    missing = [ranges[i] for i, value in enumerate(results) if value is None]
    if missing:
        raise ValueError(f"the tree of {whole.size} leaves does not cover {missing}")
    return [value for value in results if value is not None], whole.root()


def _set_bits(size: int) -> list[int]:
    """The sizes of the perfect subtrees that make up a tree of `size` leaves, largest first."""
    return [1 << bit for bit in reversed(range(size.bit_length())) if size >> bit & 1]


def root_of(leaves: Iterable[bytes]) -> bytes:
    tree = Frontier()
    for leaf in leaves:
        tree.append(leaf)
    return tree.root()


def verify_inclusion(
    index: int, size: int, leaf: bytes, path: Sequence[bytes], root: bytes
) -> bool:
    """RFC 9162 §2.1.3.2: does `path` prove `leaf` is leaf `index` of the tree with `root`?"""
    if not 0 <= index < size:
        return False
    fn, sn, result = index, size - 1, leaf
    for sibling in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            result = node_hash(sibling, result)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            result = node_hash(result, sibling)
        fn >>= 1
        sn >>= 1
    return sn == 0 and result == root


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 §2.1.4.2: does `proof` show the old tree is a prefix of the new one?"""
    if not 0 <= old_size <= new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is itself a node
        path.insert(0, old_root)
    if not path:
        return False
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for node in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(node, fr)
            sr = node_hash(node, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, node)
        fn >>= 1
        sn >>= 1
    return fr == old_root and sr == new_root and sn == 0
