"""Tests of fedforget.receipts.merkle: RFC 9162 tree hashes, inclusion and consistency proofs.

The known answers are the published reference vectors of Certificate Transparency,
google/certificate-transparency, ``cpp/merkletree/merkle_tree_test.cc`` (kInputs,
kSHA256Roots, kSHA256Paths, kSHA256Proofs; its leaf numbers are 1-based, ours 0-based),
copied verbatim. The brute-force tests compare against a naive recursive implementation of
the RFC's definitions written here, independently of the module under test.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedforget.receipts.errors import ConsistencyProofError, InclusionProofError
from fedforget.receipts.merkle import (
    EMPTY_ROOT,
    MerkleAccumulator,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    leaf_hashes,
    root_from_leaf_hashes,
    tree_root,
    verify_consistency,
    verify_inclusion,
)

# ------------------------------------------------ published vectors (certificate-transparency)
CT_EMPTY_ROOT = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
CT_INPUTS = [
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
]
CT_ROOTS = [  # roots of the trees of sizes 1..8
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_PATHS = [  # (1-based leaf, tree size, audit path)
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (3, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        2,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]
CT_PROOFS = [  # (old size, new size, consistency proof)
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]

CT_LEAVES = [bytes.fromhex(x) for x in CT_INPUTS]
CT_HASHES = leaf_hashes(CT_LEAVES)


def unhex(hashes: list[str]) -> list[bytes]:
    return [bytes.fromhex(h) for h in hashes]


# ------------------------------------------------ naive reference (the RFC's definitions)
def ref_split(n: int) -> int:
    """Largest power of two smaller than n, by doubling (as the CT reference code does)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(data: list[bytes]) -> bytes:
    if not data:
        return hashlib.sha256(b"").digest()
    if len(data) == 1:
        return hashlib.sha256(b"\x00" + data[0]).digest()
    k = ref_split(len(data))
    return hashlib.sha256(b"\x01" + ref_mth(data[:k]) + ref_mth(data[k:])).digest()


def ref_path(m: int, data: list[bytes]) -> list[bytes]:
    if len(data) <= 1:
        return []
    k = ref_split(len(data))
    if m < k:
        return ref_path(m, data[:k]) + [ref_mth(data[k:])]
    return ref_path(m - k, data[k:]) + [ref_mth(data[:k])]


def ref_subproof(m: int, data: list[bytes], complete: bool) -> list[bytes]:
    n = len(data)
    if m == n:
        return [] if complete else [ref_mth(data)]
    k = ref_split(n)
    if m <= k:
        return ref_subproof(m, data[:k], complete) + [ref_mth(data[k:])]
    return ref_subproof(m - k, data[k:], False) + [ref_mth(data[:k])]


def ref_proof(m: int, data: list[bytes]) -> list[bytes]:
    return [] if m == 0 else ref_subproof(m, data, True)


MAX_N = 70
DATA = [bytes([i, (7 * i) % 256]) + b"x" * (i % 3) for i in range(MAX_N)]  # all distinct
HASHES = leaf_hashes(DATA)
REF_ROOTS = [ref_mth(DATA[:n]) for n in range(MAX_N + 1)]


# ------------------------------------------------ known answers
def test_empty_tree_root_is_sha256_of_nothing() -> None:
    assert EMPTY_ROOT.hex() == CT_EMPTY_ROOT
    assert tree_root([]) == (0, bytes.fromhex(CT_EMPTY_ROOT))
    assert root_from_leaf_hashes([]).hex() == CT_EMPTY_ROOT


@pytest.mark.parametrize("size", range(1, 9))
def test_roots_match_published_vectors(size: int) -> None:
    # Prepare / Execute
    streamed_size, streamed = tree_root(CT_LEAVES[:size])
    from_list = root_from_leaf_hashes(CT_HASHES, size)
    # Assert
    assert streamed_size == size
    assert streamed.hex() == CT_ROOTS[size - 1]
    assert from_list.hex() == CT_ROOTS[size - 1]


@pytest.mark.parametrize(("leaf", "size", "path"), CT_PATHS)
def test_inclusion_proofs_match_published_vectors(leaf: int, size: int, path: list[str]) -> None:
    proof = inclusion_proof(CT_HASHES, leaf - 1, size)
    assert [p.hex() for p in proof] == path
    verify_inclusion(CT_HASHES[leaf - 1], leaf - 1, size, unhex(path), bytes.fromhex(
        CT_ROOTS[size - 1]))


@pytest.mark.parametrize(("old", "new", "proof"), CT_PROOFS)
def test_consistency_proofs_match_published_vectors(old: int, new: int, proof: list[str]) -> None:
    assert [p.hex() for p in consistency_proof(CT_HASHES, old, new)] == proof
    verify_consistency(
        old, new, bytes.fromhex(CT_ROOTS[old - 1]), bytes.fromhex(CT_ROOTS[new - 1]),
        unhex(proof),
    )


# ------------------------------------------------ brute force against the reference
def test_roots_match_reference_for_every_size_up_to_70() -> None:
    acc = MerkleAccumulator()
    for n in range(1, MAX_N + 1):
        acc.append(DATA[n - 1])
        assert acc.size == n
        assert acc.root() == REF_ROOTS[n]
        assert root_from_leaf_hashes(HASHES, n) == REF_ROOTS[n]


def test_accumulator_holds_one_hash_per_set_bit_of_the_size() -> None:
    acc = MerkleAccumulator()
    for n in range(1, 1025):
        acc.append_leaf_hash(HASHES[n % MAX_N])
        assert len(acc._stack) == bin(n).count("1") <= n.bit_length()


def test_every_inclusion_proof_matches_reference_and_verifies() -> None:
    for n in range(1, MAX_N + 1):
        root = REF_ROOTS[n]
        for m in range(n):
            proof = inclusion_proof(HASHES, m, n)
            assert proof == ref_path(m, DATA[:n]), (m, n)
            verify_inclusion(HASHES[m], m, n, proof, root)


def test_every_inclusion_proof_fails_when_tampered() -> None:
    for n in range(1, MAX_N + 1):
        root = REF_ROOTS[n]
        for m in range(n):
            proof = inclusion_proof(HASHES, m, n)
            bad_cases = [
                (HASHES[(m + 1) % n] if n > 1 else EMPTY_ROOT, m, n, proof),  # wrong leaf
                (HASHES[m], m, 2 * n, proof),  # wrong size (as in the CT reference tests)
                (HASHES[m], m, n, [*proof, EMPTY_ROOT]),  # too long
            ]
            if m + 1 < n:
                bad_cases.append((HASHES[m], m + 1, n, proof))  # wrong index
            if n > 1:
                bad_cases.append((HASHES[m], m, n // 2, proof))  # wrong size
            if proof:
                bad_cases.append((HASHES[m], m, n, proof[:-1]))  # too short
            for i in range(len(proof)):
                flipped = bytes([proof[i][0] ^ 1]) + proof[i][1:]
                bad_cases.append((HASHES[m], m, n, [*proof[:i], flipped, *proof[i + 1:]]))
            for leaf, index, size, path in bad_cases:
                with pytest.raises(InclusionProofError):
                    verify_inclusion(leaf, index, size, path, root)


def test_every_consistency_proof_matches_reference_and_verifies() -> None:
    for n in range(1, MAX_N + 1):
        for m in range(0, n + 1):
            proof = consistency_proof(HASHES, m, n)
            assert proof == ref_proof(m, DATA[:n]), (m, n)
            verify_consistency(m, n, REF_ROOTS[m], REF_ROOTS[n], proof)


def test_every_consistency_proof_fails_when_tampered() -> None:
    for n in range(2, MAX_N + 1):
        for m in range(1, n):
            proof = consistency_proof(HASHES, m, n)
            old, new = REF_ROOTS[m], REF_ROOTS[n]
            bad_cases = [
                (m, n, old, REF_ROOTS[n - 1], proof),  # another new root
                (m, n, REF_ROOTS[m - 1], new, proof),  # another old root
                (m, n, new, old, proof),  # roots swapped
                (m, n, old, new, []),  # empty
                (m, n, old, new, [*proof, proof[-1]]),  # too long
                (m, n, old, new, proof[:-1]),  # too short
                (m, 2 * n, old, new, proof),  # wrong new size (as in the CT reference tests)
                (m - 1, n, old, new, proof),  # wrong old size
            ]
            if m + 1 < n:
                bad_cases.append((m + 1, n, old, new, proof))  # wrong old size
            if n // 2 >= m:
                bad_cases.append((m, n // 2, old, new, proof))  # wrong new size
            for i in range(len(proof)):
                flipped = bytes([proof[i][0] ^ 0x80]) + proof[i][1:]
                bad_cases.append((m, n, old, new, [*proof[:i], flipped, *proof[i + 1:]]))
            for a, b, r1, r2, path in bad_cases:
                with pytest.raises(ConsistencyProofError):
                    verify_consistency(a, b, r1, r2, path)


def test_a_history_rewritten_before_the_old_size_is_caught() -> None:
    # Prepare: the server showed size 20; later it changes leaf 11 and grows to 45.
    rewritten = list(DATA[:45])
    rewritten[11] = b"another record"
    hashes = leaf_hashes(rewritten)
    # Execute: the honest-looking proof over the rewritten leaves
    proof = consistency_proof(hashes, 20, 45)
    # Assert: it does not link the root the client saw
    with pytest.raises(ConsistencyProofError) as info:
        verify_consistency(20, 45, REF_ROOTS[20], root_from_leaf_hashes(hashes), proof)
    assert str(info.value).startswith("consistency proof: proof leads to old root ")


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=MAX_N),
    data=st.data(),
)
def test_no_single_bit_flip_of_a_consistency_proof_verifies(n: int, data: st.DataObject) -> None:
    m = data.draw(st.integers(min_value=1, max_value=n - 1))
    proof = consistency_proof(HASHES, m, n)
    i = data.draw(st.integers(min_value=0, max_value=len(proof) - 1))
    bit = data.draw(st.integers(min_value=0, max_value=255))
    node = bytearray(proof[i])
    node[bit // 8] ^= 1 << (bit % 8)
    proof[i] = bytes(node)
    with pytest.raises(ConsistencyProofError):
        verify_consistency(m, n, REF_ROOTS[m], REF_ROOTS[n], proof)


# ------------------------------------------------ messages of the edge cases
def test_consistency_messages_name_what_was_found_and_expected() -> None:
    r3, r5 = REF_ROOTS[3], REF_ROOTS[5]
    cases = [
        ((5, 3, r5, r3, []),
         "consistency proof: the old tree has 5 leaves, more than the new tree's 3; a history "
         "only grows"),
        ((3, 3, r3, r5, []),
         f"consistency proof: the tree of size 3 has root {r3.hex()}; expected {r5.hex()}"),
        ((3, 3, r3, r3, [r3]),
         "consistency proof: proof from size 3 to 3 has 1 hashes; expected none"),
        ((3, 5, r3, r5, []),
         "consistency proof: proof from size 3 to 5 is empty; expected at least one hash"),
        ((3, 5, r3, r5, [b"short"]),
         "consistency proof: proof hash 0 has 5 bytes; expected 32"),
    ]
    for args, message in cases:
        with pytest.raises(ConsistencyProofError) as info:
            verify_consistency(*args)
        assert str(info.value) == message


def test_inclusion_messages_name_what_was_found_and_expected() -> None:
    with pytest.raises(InclusionProofError) as info:
        verify_inclusion(HASHES[0], 4, 4, [], REF_ROOTS[4])
    assert str(info.value) == "inclusion proof: leaf index 4 is not below the tree size 4"
    with pytest.raises(InclusionProofError) as info:
        verify_inclusion(HASHES[0], 0, 2, [HASHES[0]], REF_ROOTS[2])
    computed = hashlib.sha256(b"\x01" + HASHES[0] + HASHES[0]).hexdigest()
    assert str(info.value) == (
        f"inclusion proof: proof for leaf 0 leads to root {computed}; expected "
        f"{REF_ROOTS[2].hex()}"
    )


def test_leaf_and_node_hashes_use_the_rfc_prefixes() -> None:
    assert leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()
    assert root_from_leaf_hashes([HASHES[0], HASHES[1]]) == hashlib.sha256(
        b"\x01" + HASHES[0] + HASHES[1]
    ).digest()
