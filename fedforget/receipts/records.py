r"""The salted Merkle commitment to the records a record-level receipt covers.

A record-level erasure receipt must let the client prove that a given record was covered,
without revealing the ids of the other records. The receipt carries the root of an RFC 9162
Merkle tree (:mod:`fedforget.receipts.merkle`) whose leaves are salted record ids:

.. math::

    s_r = \mathrm{HMAC\text{-}SHA256}(s, \mathrm{UTF8}(r)), \qquad
    d_r = s_r \,\|\, \mathrm{UTF8}(r), \qquad
    \mathrm{leaf}_r = \mathrm{SHA256}(\mathtt{0x00} \,\|\, d_r),

for a 32-byte master salt :math:`s` that only the client receives. The leaves are ordered
by their hash, so a leaf's position says nothing about its id, and the tree's size (the
number of records) is stated in the receipt.

To show that record :math:`r` was covered, the client hands a verifier an
:class:`RecordOpening`: :math:`r`, its own salt :math:`s_r`, the leaf index and the audit
path. The verifier recomputes :math:`\mathrm{leaf}_r` and checks the path to the root
(:func:`verify_record_opening`). The path holds hashes of salted leaves only; since
:math:`s_{r'}` cannot be derived from :math:`s_r` (HMAC is a pseudo-random function of the
master salt), nothing in an opening lets anyone test guesses of the other ids. An opening
made for one record does not open for another: the leaf would differ.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fedforget.receipts.errors import InclusionProofError, ReceiptError
from fedforget.receipts.merkle import inclusion_proof, leaf_hash, root_from_leaf_hashes
from fedforget.receipts.merkle import verify_inclusion as _verify_inclusion

__all__ = [
    "RECORDS_SCHEME",
    "RecordCommitment",
    "RecordCommitmentError",
    "RecordOpening",
    "commit_records",
    "open_record",
    "record_leaf",
    "verify_record_opening",
]

RECORDS_SCHEME = (
    "rfc9162 mth over leaves hmac-sha256(salt, utf8(id)) || utf8(id), sorted by leaf hash; "
    "32-byte salt"
)
"""How ``scope.records.root`` of a receipt's predicate is computed."""

SALT_SIZE = 32


class RecordCommitmentError(ReceiptError):
    """A record opening does not lead to the receipt's record commitment."""

    check = "record commitment"


@dataclass(frozen=True, slots=True)
class RecordCommitment:
    """What a receipt states about the records it covers: the tree root and size."""

    root: str  # hex MTH
    count: int

    def to_dict(self) -> dict[str, Any]:
        """The predicate's ``scope.records`` object."""
        return {"count": self.count, "root": self.root, "scheme": RECORDS_SCHEME}


@dataclass(frozen=True, slots=True)
class RecordOpening:
    """The proof that one record is a leaf of a record commitment."""

    record_id: str
    record_salt: str  # hex s_r
    index: int
    size: int
    proof: tuple[str, ...]  # hex hashes

    def to_json(self) -> str:
        """The opening as a JSON document (what a client hands a verifier)."""
        return json.dumps({"index": self.index, "proof": list(self.proof),
                           "record-id": self.record_id, "record-salt": self.record_salt,
                           "size": self.size}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> RecordOpening:
        """Parse :meth:`to_json`; a malformed document is a RecordCommitmentError."""
        try:
            data = json.loads(text)
            if set(data) != {"index", "proof", "record-id", "record-salt", "size"}:
                raise KeyError(f"fields {sorted(data)}")
            return cls(record_id=str(data["record-id"]), record_salt=str(data["record-salt"]),
                       index=int(data["index"]), size=int(data["size"]),
                       proof=tuple(str(p) for p in data["proof"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise RecordCommitmentError(
                f"not a record opening ({exc}); expected a JSON object with index, proof, "
                "record-id, record-salt and size") from None


def _check_salt(salt: bytes) -> None:
    if not isinstance(salt, bytes | bytearray) or len(salt) != SALT_SIZE:
        size = len(salt) if isinstance(salt, bytes | bytearray) else type(salt).__name__
        raise RecordCommitmentError(f"records salt has {size} bytes; expected {SALT_SIZE}")


def _record_salt(salt: bytes, record_id: str) -> bytes:
    return hmac.new(bytes(salt), record_id.encode("utf-8"), hashlib.sha256).digest()


def record_leaf(record_salt: bytes, record_id: str) -> bytes:
    """:math:`\\mathrm{leaf}_r` of a record given its own salt :math:`s_r`."""
    return leaf_hash(bytes(record_salt) + record_id.encode("utf-8"))


def _leaves(salt: bytes, record_ids: Iterable[str]) -> list[tuple[bytes, str]]:
    _check_salt(salt)
    ids = sorted(set(record_ids))
    if not ids or any(not isinstance(r, str) or not r for r in ids):
        raise RecordCommitmentError(f"record ids {ids[:3]!r}: expected one or more "
                                    "non-empty strings")
    return sorted((record_leaf(_record_salt(salt, r), r), r) for r in ids)


def commit_records(salt: bytes, record_ids: Iterable[str]) -> RecordCommitment:
    """The commitment to ``record_ids`` under the master ``salt``."""
    leaves = _leaves(salt, record_ids)
    return RecordCommitment(root_from_leaf_hashes([h for h, _ in leaves]).hex(), len(leaves))


def open_record(salt: bytes, record_ids: Iterable[str], record_id: str) -> RecordOpening:
    """The opening of ``record_id`` in the commitment to ``record_ids`` (the client, who
    holds the master salt and its ids, makes it).

    Raises
    ------
    RecordCommitmentError
        ``record_id`` is not one of ``record_ids``: there is nothing to open.
    """
    leaves = _leaves(salt, record_ids)
    hashes = [h for h, _ in leaves]
    index = next((i for i, (_, r) in enumerate(leaves) if r == record_id), None)
    if index is None:
        raise RecordCommitmentError(f"record {record_id!r} is not among the "
                                    f"{len(leaves)} committed records")
    return RecordOpening(record_id=record_id,
                         record_salt=_record_salt(salt, record_id).hex(), index=index,
                         size=len(leaves),
                         proof=tuple(p.hex() for p in inclusion_proof(hashes, index)))


def verify_record_opening(opening: RecordOpening, commitment: Mapping[str, Any] | RecordCommitment,
                          *, record_id: str | None = None) -> None:
    """Check that ``opening`` shows its record (``record_id``, when given, must be it) to
    be a leaf of ``commitment`` (a receipt's ``scope.records``). Raises on every failure.

    Raises
    ------
    RecordCommitmentError
        Another record than ``record_id``, a size other than the commitment's count, a
        malformed salt or path, or a path that leads to another root.
    """
    if isinstance(commitment, RecordCommitment):
        commitment = commitment.to_dict()
    if record_id is not None and opening.record_id != record_id:
        raise RecordCommitmentError(f"the opening is for record {opening.record_id!r}; "
                                    f"expected {record_id!r}")
    if commitment.get("scheme") != RECORDS_SCHEME:
        raise RecordCommitmentError(f"scheme {commitment.get('scheme')!r}; expected "
                                    f"{RECORDS_SCHEME!r}")
    if opening.size != commitment.get("count"):
        raise RecordCommitmentError(f"the opening is for a tree of {opening.size} records; "
                                    f"the receipt commits to {commitment.get('count')}")
    try:
        record_salt = bytes.fromhex(opening.record_salt)
        root = bytes.fromhex(str(commitment.get("root")))
        proof = [bytes.fromhex(p) for p in opening.proof]
    except ValueError as exc:
        raise RecordCommitmentError(f"not hex: {exc}") from None
    if len(record_salt) != SALT_SIZE:
        raise RecordCommitmentError(f"record salt has {len(record_salt)} bytes; expected "
                                    f"{SALT_SIZE}")
    try:
        _verify_inclusion(record_leaf(record_salt, opening.record_id), opening.index,
                          opening.size, proof, root)
    except InclusionProofError as exc:
        raise RecordCommitmentError(f"record {opening.record_id!r} does not open the "
                                    f"commitment: {exc.detail}") from None
