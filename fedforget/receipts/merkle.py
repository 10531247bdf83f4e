"""The history commitment: an RFC 9162 Merkle tree over the round records.

Leaf ``i`` (0-based) is the canonical bytes of the record of round ``i + 1``. Following
RFC 9162 §2.1.1 (https://www.rfc-editor.org/rfc/rfc9162#section-2.1.1), the Merkle Tree Hash
of ``n`` inputs :math:`D_n = (d_0, \\dots, d_{n-1})` is

.. math::

    \\mathrm{MTH}(\\{\\}) &= \\mathrm{SHA256}()\\\\
    \\mathrm{MTH}(\\{d_0\\}) &= \\mathrm{SHA256}(\\mathtt{0x00} \\,\\|\\, d_0)\\\\
    \\mathrm{MTH}(D_n) &= \\mathrm{SHA256}(\\mathtt{0x01} \\,\\|\\,
        \\mathrm{MTH}(D[0{:}k]) \\,\\|\\, \\mathrm{MTH}(D[k{:}n]))

where :math:`k` is the largest power of two smaller than :math:`n` (not :math:`n/2`).

Roots are computed in a stream (:class:`MerkleAccumulator`) holding at most
:math:`\\lceil\\log_2 n\\rceil + 1` hashes; proofs are computed from a list of leaf hashes
(:func:`inclusion_proof`, :func:`consistency_proof`, RFC 9162 §2.1.3 and §2.1.4) and checked
by the verification algorithms of RFC 9162 §2.1.3.2 and §2.1.4.2, which raise on any failure.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from fedforget.receipts.errors import ConsistencyProofError, InclusionProofError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "MerkleAccumulator",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "leaf_hashes",
    "node_hash",
    "root_from_leaf_hashes",
    "tree_root",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
"""Bytes in a SHA-256 hash, hence in every node of the tree."""

EMPTY_ROOT = hashlib.sha256(b"").digest()
"""MTH of the empty tree: SHA-256 of the empty string."""


def leaf_hash(data: bytes) -> bytes:
    """Hash of a leaf: :math:`\\mathrm{SHA256}(\\mathtt{0x00} \\| d)`."""
    return hashlib.sha256(b"\x00" + bytes(data)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Hash of an interior node: :math:`\\mathrm{SHA256}(\\mathtt{0x01} \\| l \\| r)`."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


class MerkleAccumulator:
    """Streaming MTH: append leaves one by one, read the root at any size.

    The stack holds the roots of the perfect subtrees of the current size, one per set bit of
    the size, largest first; appending a leaf merges equal-sized subtrees like a binary carry.
    Memory is :math:`O(\\log n)` hashes whatever the number of leaves.

    Examples
    --------
    >>> acc = MerkleAccumulator()
    >>> acc.append(b"")
    >>> acc.root().hex()[:16]
    '6e340b9cffb37a98'
    """

    __slots__ = ("_size", "_stack")

    def __init__(self) -> None:
        self._size = 0
        self._stack: list[bytes] = []

    @property
    def size(self) -> int:
        """Number of leaves appended."""
        return self._size

    def append(self, data: bytes) -> None:
        """Append the leaf whose input bytes are ``data``."""
        self.append_leaf_hash(leaf_hash(data))

    def append_leaf_hash(self, hashed: bytes) -> None:
        """Append a leaf given its leaf hash (32 bytes)."""
        if len(hashed) != HASH_SIZE:
            raise ValueError(f"a leaf hash has {HASH_SIZE} bytes; got {len(hashed)}")
        node = bytes(hashed)
        carry = self._size
        while carry & 1:
            node = node_hash(self._stack.pop(), node)
            carry >>= 1
        self._stack.append(node)
        self._size += 1

    def root(self) -> bytes:
        """MTH of the leaves appended so far."""
        if not self._stack:
            return EMPTY_ROOT
        node = self._stack[-1]
        for left in reversed(self._stack[:-1]):
            node = node_hash(left, node)
        return node


def tree_root(leaves: Iterable[bytes]) -> tuple[int, bytes]:
    """Size and MTH of the leaves' input bytes, streamed (``O(log n)`` memory)."""
    acc = MerkleAccumulator()
    for data in leaves:
        acc.append(data)
    return acc.size, acc.root()


def leaf_hashes(leaves: Iterable[bytes]) -> list[bytes]:
    """Leaf hashes of the leaves' input bytes, as a list for :func:`inclusion_proof` etc."""
    return [leaf_hash(data) for data in leaves]


def _mth(hashes: Sequence[bytes], lo: int, hi: int) -> bytes:
    n = hi - lo
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return hashes[lo]
    k = _split(n)
    return node_hash(_mth(hashes, lo, lo + k), _mth(hashes, lo + k, hi))


def _check_size(hashes: Sequence[bytes], size: int | None) -> int:
    n = len(hashes) if size is None else size
    if not 0 <= n <= len(hashes):
        raise ValueError(f"tree size {n} is outside 0..{len(hashes)} (the leaves given)")
    return n


def root_from_leaf_hashes(hashes: Sequence[bytes], size: int | None = None) -> bytes:
    """MTH of the first ``size`` leaf hashes (all of them by default)."""
    return _mth(hashes, 0, _check_size(hashes, size))


def inclusion_proof(hashes: Sequence[bytes], index: int, size: int | None = None) -> list[bytes]:
    """Audit path of leaf ``index`` (0-based) in the tree of the first ``size`` leaves.

    RFC 9162 §2.1.3.1: for :math:`n > 1` and :math:`k` the largest power of two below
    :math:`n`, PATH(m, D_n) is PATH(m, D[0:k]) : MTH(D[k:n]) when :math:`m < k`, else
    PATH(m - k, D[k:n]) : MTH(D[0:k]); PATH(0, {d_0}) is empty.
    """
    n = _check_size(hashes, size)
    if not 0 <= index < n:
        raise ValueError(f"leaf index {index} is outside 0..{n - 1}")
    path: list[bytes] = []
    lo, hi, m = 0, n, index
    while hi - lo > 1:
        k = _split(hi - lo)
        if m < k:
            path.append(_mth(hashes, lo + k, hi))
            hi = lo + k
        else:
            path.append(_mth(hashes, lo, lo + k))
            lo, m = lo + k, m - k
    path.reverse()
    return path


def consistency_proof(
    hashes: Sequence[bytes], old_size: int, new_size: int | None = None
) -> list[bytes]:
    """Proof that the tree of the first ``old_size`` leaves is a prefix of ``new_size``.

    RFC 9162 §2.1.4.1: PROOF(m, D_n) = SUBPROOF(m, D_n, true), with SUBPROOF(m, D_m, b) empty
    when b is true and [MTH(D_m)] otherwise, and for :math:`m < n`, :math:`k` the largest power
    of two below :math:`n`: SUBPROOF(m, D[0:k], b) : MTH(D[k:n]) when :math:`m \\le k`, else
    SUBPROOF(m - k, D[k:n], false) : MTH(D[0:k]). The proof is empty when ``old_size`` is 0
    or equals ``new_size``.
    """
    n = _check_size(hashes, new_size)
    if not 0 <= old_size <= n:
        raise ValueError(f"old tree size {old_size} is outside 0..{n}")
    if old_size in (0, n):
        return []
    proof: list[bytes] = []
    lo, hi, m, complete = 0, n, old_size, True
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:
            proof.append(_mth(hashes, lo + k, hi))
            hi = lo + k
        else:
            proof.append(_mth(hashes, lo, lo + k))
            lo, m, complete = lo + k, m - k, False
    if not complete:
        proof.append(_mth(hashes, lo, hi))
    proof.reverse()
    return proof


def _check_hashes(
    named: dict[str, bytes],
    proof: Sequence[bytes],
    error: type[InclusionProofError | ConsistencyProofError],
) -> None:
    items = list(named.items()) + [(f"proof hash {i}", p) for i, p in enumerate(proof)]
    for name, node in items:
        if not isinstance(node, bytes | bytearray):
            raise error(f"{name} is a {type(node).__name__}; expected {HASH_SIZE} bytes")
        if len(node) != HASH_SIZE:
            raise error(f"{name} has {len(node)} bytes; expected {HASH_SIZE}")


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf`` (a leaf hash) is leaf ``index`` of the tree of ``size`` with ``root``.

    RFC 9162 §2.1.3.2. Returns nothing; raises on every failure.

    Raises
    ------
    InclusionProofError
        If the index is out of range, the proof has the wrong length, or it leads to another
        root.
    """
    _check_hashes({"leaf hash": leaf, "root": root}, proof, InclusionProofError)
    if not 0 <= index < size:
        raise InclusionProofError(f"leaf index {index} is not below the tree size {size}")
    fn, sn, r = index, size - 1, bytes(leaf)
    for p in proof:
        if sn == 0:
            raise InclusionProofError(
                f"proof has {len(proof)} hashes, more than a tree of size {size} needs for "
                f"leaf {index}"
            )
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InclusionProofError(
            f"proof has {len(proof)} hashes, fewer than a tree of size {size} needs for "
            f"leaf {index}"
        )
    if r != root:
        raise InclusionProofError(
            f"proof for leaf {index} leads to root {r.hex()}; expected {bytes(root).hex()}"
        )


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree (``new_size``, ``new_root``) extends (``old_size``, ``old_root``).

    RFC 9162 §2.1.4.2 for :math:`0 < m < n`; for :math:`m = n` the proof must be empty and
    the roots equal; for :math:`m = 0` the proof must be empty and the old root the empty
    tree's. Returns nothing; raises on every failure.

    Raises
    ------
    ConsistencyProofError
        If the sizes are out of order, the proof has the wrong length, or it does not lead to
        both roots.
    """
    _check_hashes({"old root": old_root, "new root": new_root}, proof, ConsistencyProofError)
    if old_size < 0 or new_size < 0:
        raise ConsistencyProofError(f"tree sizes {old_size} and {new_size}; expected >= 0")
    if old_size > new_size:
        raise ConsistencyProofError(
            f"the old tree has {old_size} leaves, more than the new tree's {new_size}; a "
            "history only grows"
        )
    if old_size == new_size or old_size == 0:
        if proof:
            raise ConsistencyProofError(
                f"proof from size {old_size} to {new_size} has {len(proof)} hashes; expected "
                "none"
            )
        expected = EMPTY_ROOT if old_size == 0 else new_root
        if old_root != expected:
            raise ConsistencyProofError(
                f"the tree of size {old_size} has root {bytes(old_root).hex()}; expected "
                f"{bytes(expected).hex()}"
            )
        return
    if not proof:
        raise ConsistencyProofError(
            f"proof from size {old_size} to {new_size} is empty; expected at least one hash"
        )
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = bytes(path[0])
    for c in path[1:]:
        if sn == 0:
            raise ConsistencyProofError(
                f"proof from size {old_size} to {new_size} has {len(proof)} hashes, more than "
                "needed"
            )
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ConsistencyProofError(
            f"proof from size {old_size} to {new_size} has {len(proof)} hashes, fewer than "
            "needed"
        )
    if fr != old_root:
        raise ConsistencyProofError(
            f"proof leads to old root {fr.hex()} for size {old_size}; expected "
            f"{bytes(old_root).hex()}"
        )
    if sr != new_root:
        raise ConsistencyProofError(
            f"proof leads to new root {sr.hex()} for size {new_size}; expected "
            f"{bytes(new_root).hex()}"
        )
