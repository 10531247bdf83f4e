"""The exceptions of :mod:`fedforget.receipts`.

Every failure of a receipt check raises a subclass of :class:`ReceiptError`; nothing returns a
soft ``False``. The message starts with the name of the check that failed (``"signature: "``,
``"consistency proof: "``, ...) and then says what was found and what was expected, so that a
command line can print it as is.
"""

from __future__ import annotations

from typing import ClassVar

from fedforget.errors import FedForgetError

__all__ = [
    "ClientCommitmentError",
    "ConsistencyProofError",
    "EnvelopeError",
    "InclusionProofError",
    "KeyManifestError",
    "PayloadTypeError",
    "PredicateError",
    "PredicateVersionError",
    "PreviousReceiptError",
    "ReceiptError",
    "SignatureError",
    "SigningKeyError",
    "StatementError",
    "SubjectDigestError",
    "TreeHeadError",
]


class ReceiptError(FedForgetError):
    """Base class: a receipt, tree head, proof or key failed a check, or cannot be made.

    Attributes
    ----------
    check
        Name of the check that failed; the message is ``f"{check}: {detail}"``.
    detail
        What was found and what was expected.
    """

    check: ClassVar[str] = "receipt"

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"{self.check}: {detail}")

    def __reduce__(self) -> tuple[type[ReceiptError], tuple[str]]:
        return (type(self), (self.detail,))


class EnvelopeError(ReceiptError):
    """The file is not a well-formed, canonical DSSE envelope."""

    check = "envelope"


class SignatureError(ReceiptError):
    """A signature does not verify, or the envelope names another key than the signer's."""

    check = "signature"


class SigningKeyError(ReceiptError):
    """A key cannot be loaded, written, found, or was not valid at the time of signing."""

    check = "key"


class KeyManifestError(ReceiptError):
    """A key manifest is malformed, badly chained, or not rooted in the trusted key."""

    check = "key manifest"


class PayloadTypeError(ReceiptError):
    """The envelope's payloadType is not ``application/vnd.in-toto+json``."""

    check = "payload type"


class StatementError(ReceiptError):
    """The payload is not an in-toto Statement v1 with the two expected subjects."""

    check = "statement"


class PredicateVersionError(ReceiptError):
    """The predicateType is not the erasure-receipt version this code understands."""

    check = "predicate version"


class PredicateError(ReceiptError):
    """A predicate field is missing, unknown, or has a value of the wrong form."""

    check = "predicate"


class SubjectDigestError(ReceiptError):
    """A model file's digest differs from the receipt's subject."""

    check = "subject digest"


class ConsistencyProofError(ReceiptError):
    """A Merkle consistency proof does not show that one tree extends another."""

    check = "consistency proof"


class InclusionProofError(ReceiptError):
    """A Merkle inclusion proof does not lead from the leaf to the root."""

    check = "inclusion proof"


class TreeHeadError(ReceiptError):
    """A signed tree head is malformed or does not match the history it should describe."""

    check = "tree head"


class ClientCommitmentError(ReceiptError):
    """The salted commitment does not open to the given client id."""

    check = "client commitment"


class PreviousReceiptError(ReceiptError):
    """The receipt's chain link does not name the given previous receipt."""

    check = "previous receipt"
