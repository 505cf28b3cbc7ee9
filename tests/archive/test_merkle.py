"""The Merkle log against the RFC 6962 reference vectors (the leaf inputs and roots
used by the Certificate Transparency implementations), and every proof for every
pair of sizes up to 40 - with every single-bit tampering refused."""

from __future__ import annotations

import pytest

from gateway.archive.merkle import (
    EMPTY_ROOT,
    Frontier,
    consistency_proof,
    inclusion_proof,
    inclusion_proof_at,
    leaf_hash,
    levels,
    root,
    verify_consistency,
    verify_inclusion,
)

INPUTS = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
]
ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def test_the_reference_roots():
    leaves = [leaf_hash(d) for d in INPUTS]
    assert root([]) == EMPTY_ROOT
    assert [root(leaves[:n]).hex() for n in range(1, 9)] == ROOTS


LEAVES = [leaf_hash(f"record {i}".encode()) for i in range(40)]


def flip(b: bytes, bit: int) -> bytes:
    return bytes([b[0] ^ (1 << bit)]) + b[1:]


@pytest.mark.parametrize("n", range(1, 41))
def test_every_inclusion_proof_verifies_and_tampering_does_not(n):
    tree = LEAVES[:n]
    r = root(tree)
    for i in range(n):
        proof = inclusion_proof(i, tree)
        assert verify_inclusion(tree[i], i, n, proof, r)
        assert not verify_inclusion(flip(tree[i], i % 8), i, n, proof, r)
        if proof:
            assert not verify_inclusion(tree[i], i, n, [flip(proof[0], 0), *proof[1:]], r)
            assert not verify_inclusion(tree[i], i, n, proof[:-1], r)
        if n > 1:
            assert not verify_inclusion(tree[i], (i + 1) % n, n, proof, r)


@pytest.mark.parametrize("n", range(1, 41))
def test_every_consistency_proof_verifies_and_an_altered_history_does_not(n):
    tree = LEAVES[:n]
    second = root(tree)
    for m in range(1, n + 1):
        proof = consistency_proof(m, tree)
        first = root(tree[:m])
        assert verify_consistency(m, n, proof, first, second)
        # a prefix with one record altered (or removed) is not consistent
        altered = [*tree[: m - 1], leaf_hash(b"forged")]
        assert not verify_consistency(m, n, proof, root(altered), second)
        if m < n:
            assert not verify_consistency(m, n, proof, first, root([*tree[:-1], leaf_hash(b"x")]))
            assert not verify_consistency(m, n, [], first, second)


def test_the_frontier_and_the_levels_give_the_same_roots_and_proofs_as_the_recursion():
    leaves = [leaf_hash(bytes([n])) for n in range(70)]
    frontier = Frontier()
    for size in range(1, 71):
        frontier.append(leaves[size - 1])
        assert frontier.size == size
        assert frontier.root() == root(leaves[:size])
        tree = levels(leaves[:size])
        assert tree[-1] == [root(leaves[:size])]
        for index in range(size):
            assert inclusion_proof_at(index, tree) == inclusion_proof(index, leaves[:size])
    assert Frontier().root() == EMPTY_ROOT
