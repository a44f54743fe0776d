"""RFC 6962 / RFC 9162 Merkle hashing and proofs against the published reference vectors, plus properties.

The vectors are the Certificate Transparency reference set, copied from transparency-dev/merkle
(proof/verify_test.go and rfc6962/rfc6962_test.go); google/certificate-transparency-go
(merkletree/merkle_verifier_test.go) carries the same leaves, roots, inclusion and consistency proofs. In those
files inclusion vectors number leaves from 1; here indices are 0-based.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeshield.audit import merkle
from edgeshield.errors import InvalidArgumentError

h = bytes.fromhex

LEAVES = [h(x) for x in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                         "606162636465666768696a6b6c6d6e6f")]

EMPTY_ROOT = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
ROOTS = {  # MTH(LEAVES[:size])
    1: "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    2: "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    3: "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    4: "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    5: "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    6: "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    7: "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    8: "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
}

INCLUSION = [  # (leaf index, tree size, audit path)
    (0, 1, []),
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (1, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]

CONSISTENCY = [  # (old size, new size, proof)
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
    (6, 7, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]

SOME_HASH = h("abacaba000000000000000000000000000000000000000000060061e00123456")


def root_of(size: int) -> bytes:
    return h(EMPTY_ROOT) if size == 0 else h(ROOTS[size])


# --- hashing --------------------------------------------------------------------------------------------------------
def test_hasher_vectors() -> None:
    # transparency-dev/merkle rfc6962/rfc6962_test.go
    assert merkle.EMPTY_ROOT.hex() == EMPTY_ROOT
    assert merkle.leaf_hash(b"").hex() == "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    assert merkle.leaf_hash(b"L123456").hex() == "395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56"
    assert merkle.node_hash(b"N123", b"N456").hex() == (
        "aa217fe888e47007fa15edab33c2b492a722cb106c64667fc2b044444de66bbb")
    assert merkle.EMPTY_ROOT == hashlib.sha256(b"").digest()


@pytest.mark.parametrize("size", range(9))
def test_roots_match_reference(size: int) -> None:
    assert merkle.root(LEAVES[:size]) == root_of(size)


def test_frontier_gives_every_reference_root() -> None:
    frontier: merkle.Frontier = ()
    assert merkle.frontier_root(frontier) == root_of(0)
    for size, leaf in enumerate(LEAVES, start=1):
        frontier = merkle.frontier_append(frontier, merkle.leaf_hash(leaf))
        assert merkle.frontier_root(frontier) == root_of(size)


# --- inclusion ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("index", "size", "path"), INCLUSION)
def test_inclusion_vectors(index: int, size: int, path: list[str]) -> None:
    proof = [h(p) for p in path]
    assert merkle.inclusion_proof(index, LEAVES[:size]) == proof
    assert merkle.verify_inclusion(merkle.leaf_hash(LEAVES[index]), index, size, proof, root_of(size))


@pytest.mark.parametrize(("index", "size", "path"), [v for v in INCLUSION if v[2]])
def test_inclusion_vectors_corrupted(index: int, size: int, path: list[str]) -> None:
    """The corruption probes of transparency-dev/merkle's verifierCheck: every one must fail."""
    proof, root, leaf = [h(p) for p in path], root_of(size), merkle.leaf_hash(LEAVES[index])
    probes = [
        (leaf, index - 1, size, proof, root), (leaf, index + 1, size, proof, root),
        (leaf, index ^ 2, size, proof, root),
        (leaf, index, size * 2, proof, root), (leaf, index, size // 2, proof, root),
        (b"WrongLeaf", index, size, proof, root), (leaf, index, size, proof, merkle.EMPTY_ROOT),
        (leaf, index, size, proof, SOME_HASH),
        (leaf, index, size, [*proof, b""], root), (leaf, index, size, [*proof, root], root),
        (leaf, index, size, [b"", *proof], root), (leaf, index, size, [root, *proof], root),
        (leaf, index, size, proof[:-1], root),
    ]
    for i in range(len(proof)):
        flipped = list(proof)
        flipped[i] = bytes([flipped[i][0] ^ 8]) + flipped[i][1:]
        probes.append((leaf, index, size, flipped, root))
    if len(proof) > 1:
        probes.append((leaf, index, size, [proof[0], SOME_HASH, *proof[1:]], root))
    for probe in probes:
        assert not merkle.verify_inclusion(*probe), probe


def test_inclusion_invalid_parameters() -> None:
    for index, size in ((0, 0), (1, 0), (2, 1), (-1, 1)):
        assert not merkle.verify_inclusion(SOME_HASH, index, size, [], merkle.EMPTY_ROOT)
    with pytest.raises(InvalidArgumentError):
        merkle.inclusion_proof(8, LEAVES)
    with pytest.raises(InvalidArgumentError):
        merkle.inclusion_proof(0, [])


# --- consistency ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("m", "n", "path"), CONSISTENCY)
def test_consistency_vectors(m: int, n: int, path: list[str]) -> None:
    proof = [h(p) for p in path]
    assert merkle.consistency_proof(m, LEAVES[:n]) == proof
    assert merkle.verify_consistency(m, n, root_of(m), root_of(n), proof)


@pytest.mark.parametrize(("m", "n", "path"), [v for v in CONSISTENCY if v[2]])
def test_consistency_vectors_corrupted(m: int, n: int, path: list[str]) -> None:
    """The corruption probes of transparency-dev/merkle's verifierConsistencyCheck."""
    proof, r1, r2 = [h(p) for p in path], root_of(m), root_of(n)
    probes = [
        (m - 1, n, r1, r2, proof), (m + 1, n, r1, r2, proof), (m ^ 2, n, r1, r2, proof),
        (m, n * 2, r1, r2, proof), (m, n // 2, r1, r2, proof),
        (m, n, b"WrongRoot", r2, proof), (m, n, r1, b"WrongRoot", proof), (m, n, r2, r1, proof),
        (m, n, r1, r2, []),
        (m, n, r1, r2, [*proof, b""]), (m, n, r1, r2, [*proof, r1]), (m, n, r1, r2, [*proof, r2]),
        (m, n, r1, r2, [b"", *proof]), (m, n, r1, r2, [r1, *proof]), (m, n, r1, r2, [r2, *proof]),
        (m, n, r1, r2, [proof[0], *proof]), (m, n, r1, r2, proof[:-1]),
    ]
    for i in range(len(proof)):
        flipped = list(proof)
        flipped[i] = bytes([flipped[i][0] ^ 16]) + flipped[i][1:]
        probes.append((m, n, r1, r2, flipped))
    for probe in probes:
        assert not merkle.verify_consistency(*probe), probe


def test_consistency_edge_cases() -> None:
    e = merkle.EMPTY_ROOT
    assert merkle.verify_consistency(0, 0, e, e, [])
    assert merkle.verify_consistency(0, 8, e, root_of(8), [])  # every tree extends the empty one
    assert not merkle.verify_consistency(0, 8, root_of(1), root_of(8), [])
    assert merkle.verify_consistency(3, 3, root_of(3), root_of(3), [])
    assert not merkle.verify_consistency(3, 3, root_of(3), root_of(4), [])
    assert not merkle.verify_consistency(3, 3, root_of(3), root_of(3), [e])  # same size, non-empty proof
    assert not merkle.verify_consistency(2, 1, root_of(2), root_of(1), [])  # time travel
    assert not merkle.verify_consistency(1, 2, root_of(1), root_of(2), [])  # empty proof
    with pytest.raises(InvalidArgumentError):
        merkle.consistency_proof(9, LEAVES)


# --- properties -----------------------------------------------------------------------------------------------------
leaf_lists = st.lists(st.binary(max_size=12), min_size=1, max_size=40, unique=True)  # equal leaves share proofs


@settings(max_examples=60, deadline=None)
@given(leaves=leaf_lists, data=st.data())
def test_every_inclusion_proof_verifies_and_tampering_fails(leaves: list[bytes], data: st.DataObject) -> None:
    n = len(leaves)
    index = data.draw(st.integers(0, n - 1))
    hashes = [merkle.leaf_hash(x) for x in leaves]
    root = merkle.root(leaves)
    proof = merkle.inclusion_proof(index, leaves)
    assert merkle.verify_inclusion(hashes[index], index, n, proof, root)
    assert merkle.inclusion_proof_from_hashes(index, hashes) == proof
    # Any other index, any other leaf, any flipped bit in the proof, any dropped or added node: rejected.
    for other in range(n):
        if other != index:
            assert not merkle.verify_inclusion(hashes[index], other, n, proof, root)
    assert not merkle.verify_inclusion(merkle.leaf_hash(leaves[index] + b"x"), index, n, proof, root)
    if proof:
        i = data.draw(st.integers(0, len(proof) - 1))
        bit = data.draw(st.integers(0, 255))
        bad = list(proof)
        bad[i] = bad[i][: bit // 8] + bytes([bad[i][bit // 8] ^ (1 << (bit % 8))]) + bad[i][bit // 8 + 1:]
        assert not merkle.verify_inclusion(hashes[index], index, n, bad, root)
        assert not merkle.verify_inclusion(hashes[index], index, n, proof[:-1], root)
    assert not merkle.verify_inclusion(hashes[index], index, n, [*proof, SOME_HASH], root)


@pytest.mark.parametrize("n", range(1, 18))
def test_consistency_between_all_sizes(n: int) -> None:
    leaves = [bytes([i]) * (i % 5) for i in range(n)]
    hashes = [merkle.leaf_hash(x) for x in leaves]
    roots = [merkle.root_from_hashes(hashes[:m]) for m in range(n + 1)]
    for m in range(n + 1):
        proof = merkle.consistency_proof_from_hashes(m, hashes)
        assert merkle.verify_consistency(m, n, roots[m], roots[n], proof), (m, n)
        if 0 < m < n:
            assert not merkle.verify_consistency(m, n, roots[m], merkle.leaf_hash(b"other"), proof)
            assert not merkle.verify_consistency(m, n, merkle.leaf_hash(b"other"), roots[n], proof)
            for i in range(len(proof)):
                bad = list(proof)
                bad[i] = bytes([bad[i][0] ^ 1]) + bad[i][1:]
                assert not merkle.verify_consistency(m, n, roots[m], roots[n], bad), (m, n, i)


@settings(max_examples=40, deadline=None)
@given(leaves=st.lists(st.binary(max_size=8), min_size=2, max_size=64), data=st.data())
def test_consistency_property(leaves: list[bytes], data: st.DataObject) -> None:
    n = len(leaves)
    m = data.draw(st.integers(1, n - 1))
    proof = merkle.consistency_proof(m, leaves)
    old, new = merkle.root(leaves[:m]), merkle.root(leaves)
    assert merkle.verify_consistency(m, n, old, new, proof)
    # A tree that rewrote one of the first m leaves is not an extension of the old one.
    j = data.draw(st.integers(0, m - 1))
    forked = [*leaves[:j], leaves[j] + b"!", *leaves[j + 1:]]
    assert not merkle.verify_consistency(m, n, old, merkle.root(forked), merkle.consistency_proof(m, forked))


@settings(max_examples=40, deadline=None)
@given(leaves=st.lists(st.binary(max_size=8), max_size=70))
def test_frontier_matches_recursive_root(leaves: list[bytes]) -> None:
    frontier: merkle.Frontier = ()
    for x in leaves:
        frontier = merkle.frontier_append(frontier, merkle.leaf_hash(x))
    assert merkle.frontier_root(frontier) == merkle.root(leaves)
