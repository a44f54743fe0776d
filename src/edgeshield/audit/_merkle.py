"""RFC 9162 §2.1 Merkle tree hashing, inclusion and consistency proofs: pure functions over bytes.

The tree is Certificate Transparency's (RFC 6962, restated in RFC 9162): leaves are hashed as
SHA-256(0x00 || leaf), interior nodes as SHA-256(0x01 || left || right), the empty tree's hash is SHA-256(""),
and a tree of n > 1 leaves splits at k, the largest power of two smaller than n. Proof *generation* follows the
recursive definitions (§2.1.3.1 PATH, §2.1.4.1 PROOF/SUBPROOF); *verification* follows the iterative algorithms
of §2.1.3.2 and §2.1.4.2 word for word, so a proof we produce is checkable by any CT-compatible verifier.

Functions taking ``leaves`` hash the raw leaves; the ``*_from_hashes`` variants take leaf hashes (an audit log
keeps those rather than rehashing). A *frontier* (the roots of the perfect subtrees that make up a tree, largest
first) gives the root of a growing tree in O(log n) per appended leaf.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from edgeshield.errors import InvalidArgumentError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "Frontier",
    "consistency_proof",
    "consistency_proof_from_hashes",
    "decode_frontier",
    "encode_frontier",
    "frontier_append",
    "frontier_push",
    "frontier_root",
    "frontier_sizes",
    "inclusion_proof",
    "inclusion_proof_from_hashes",
    "leaf_hash",
    "node_hash",
    "root",
    "root_from_hashes",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

# (subtree size, subtree hash) pairs, sizes distinct powers of two in decreasing order: the binary digits of n.
Frontier = tuple[tuple[int, bytes], ...]


def leaf_hash(leaf: bytes) -> bytes:
    """MTH of a one-leaf tree: SHA-256(0x00 || leaf)."""
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Interior node: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """k, the largest power of two strictly smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def _mth(hashes: Sequence[bytes], lo: int, hi: int) -> bytes:
    n = hi - lo
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return hashes[lo]
    k = _split(n)
    return node_hash(_mth(hashes, lo, lo + k), _mth(hashes, lo + k, hi))


# --- roots --------------------------------------------------------------------------------------------------------
def root_from_hashes(hashes: Sequence[bytes]) -> bytes:
    """MTH(D[n]) given the n leaf hashes."""
    return _mth(hashes, 0, len(hashes))


def root(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) of the raw leaves."""
    return root_from_hashes([leaf_hash(x) for x in leaves])


def frontier_append(frontier: Frontier, leaf_hash_: bytes) -> Frontier:
    """The frontier after appending one leaf (given by its leaf hash)."""
    stack = list(frontier)
    frontier_push(stack, leaf_hash_)
    return tuple(stack)


def frontier_push(stack: list[tuple[int, bytes]], leaf_hash_: bytes) -> None:
    """:func:`frontier_append` in place, on a frontier held as a list (the bulk paths: no tuple per leaf)."""
    size, h = 1, leaf_hash_
    while stack and stack[-1][0] == size:
        left_size, left = stack.pop()
        size, h = left_size + size, hashlib.sha256(b"\x01" + left + h).digest()
    stack.append((size, h))


def frontier_root(frontier: Frontier) -> bytes:
    """MTH of the tree the frontier describes: the perfect subtrees folded right to left."""
    if not frontier:
        return EMPTY_ROOT
    acc = frontier[-1][1]
    for _, h in reversed(frontier[:-1]):
        acc = node_hash(h, acc)
    return acc


def frontier_sizes(tree_size: int) -> tuple[int, ...]:
    """The subtree sizes of a tree of ``tree_size`` leaves: its binary digits, largest first."""
    return tuple(1 << b for b in range(tree_size.bit_length() - 1, -1, -1) if tree_size >> b & 1)


def encode_frontier(frontier: Frontier) -> bytes:
    """The compact range as stored: its subtree hashes concatenated (the sizes follow from the tree size)."""
    return b"".join(h for _, h in frontier)


def decode_frontier(tree_size: int, blob: bytes) -> Frontier | None:
    """The frontier of a tree of ``tree_size`` leaves from :func:`encode_frontier`'s bytes; None when they cannot
    be one (wrong length). Whether it is the *right* one is the caller's check against a signed root."""
    sizes = frontier_sizes(tree_size)
    if not isinstance(blob, bytes) or len(blob) != HASH_SIZE * len(sizes):
        return None
    return tuple((size, blob[i * HASH_SIZE:(i + 1) * HASH_SIZE]) for i, size in enumerate(sizes))


# --- inclusion ----------------------------------------------------------------------------------------------------
def _path(m: int, hashes: Sequence[bytes], lo: int, hi: int) -> list[bytes]:
    n = hi - lo
    if n <= 1:
        return []
    k = _split(n)
    if m < k:
        return [*_path(m, hashes, lo, lo + k), _mth(hashes, lo + k, hi)]
    return [*_path(m - k, hashes, lo + k, hi), _mth(hashes, lo, lo + k)]


def inclusion_proof_from_hashes(index: int, hashes: Sequence[bytes]) -> list[bytes]:
    """PATH(index, D[n]) (RFC 9162 §2.1.3.1), leaf-to-root order, given the leaf hashes."""
    if not 0 <= index < len(hashes):
        raise InvalidArgumentError(f"leaf index {index} is outside a tree of {len(hashes)} leaves")
    return _path(index, hashes, 0, len(hashes))


def inclusion_proof(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PATH(index, D[n]) over the raw leaves."""
    return inclusion_proof_from_hashes(index, [leaf_hash(x) for x in leaves])


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes | bytearray) and len(value) == HASH_SIZE


def verify_inclusion(leaf_hash_: bytes, index: int, tree_size: int, proof: Sequence[bytes], root_: bytes) -> bool:
    """RFC 9162 §2.1.3.2: does ``proof`` show the leaf with hash ``leaf_hash_`` at ``index`` under ``root_``?"""
    if not (_is_hash(leaf_hash_) and _is_hash(root_) and all(_is_hash(p) for p in proof)):
        return False
    if not 0 <= index < tree_size:
        return False
    fn, sn, r = index, tree_size - 1, bytes(leaf_hash_)
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root_


# --- consistency --------------------------------------------------------------------------------------------------
def _subproof(m: int, hashes: Sequence[bytes], lo: int, hi: int, b: bool) -> list[bytes]:
    n = hi - lo
    if m == n:
        return [] if b else [_mth(hashes, lo, hi)]
    k = _split(n)
    if m <= k:
        return [*_subproof(m, hashes, lo, lo + k, b), _mth(hashes, lo + k, hi)]
    return [*_subproof(m - k, hashes, lo + k, hi, False), _mth(hashes, lo, lo + k)]


def consistency_proof_from_hashes(m: int, hashes: Sequence[bytes]) -> list[bytes]:
    """PROOF(m, D[n]) (RFC 9162 §2.1.4.1) given the n leaf hashes; empty when m is 0 or n."""
    n = len(hashes)
    if not 0 <= m <= n:
        raise InvalidArgumentError(f"old tree size {m} is outside 0..{n}")
    if m in (0, n):
        return []
    return _subproof(m, hashes, 0, n, True)


def consistency_proof(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PROOF(m, D[n]) over the raw leaves."""
    return consistency_proof_from_hashes(m, [leaf_hash(x) for x in leaves])


def verify_consistency(m: int, n: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]) -> bool:
    """RFC 9162 §2.1.4.2: does ``proof`` show the tree of size ``n`` extends the tree of size ``m``?

    The RFC defines proofs for 0 < m < n; the edge cases are pinned here: m == n needs an empty proof and equal
    roots, and m == 0 needs an empty proof and ``old_root`` equal to the empty tree's hash.
    """
    if not (_is_hash(old_root) and _is_hash(new_root) and all(_is_hash(p) for p in proof)):
        return False
    if not 0 <= m <= n:
        return False
    if m == n:
        return not proof and old_root == new_root
    if m == 0:
        return not proof and old_root == EMPTY_ROOT
    path = [bytes(p) for p in proof]
    if not path:
        return False
    if m & (m - 1) == 0:  # m is an exact power of two: the old root is itself a node of the new tree
        path.insert(0, bytes(old_root))
    fn, sn = m - 1, n - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == old_root and sr == new_root and sn == 0
