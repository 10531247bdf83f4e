"""DSSE envelopes (https://github.com/secure-systems-lab/dsse, protocol v1.0.0) with Ed25519.

A signature covers the pre-authentication encoding of the payload type and the payload:

.. code-block:: text

    PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body

with LEN the ASCII decimal byte length, so ``PAE("http://example.com/HelloWorld",
"hello world")`` is ``DSSEv1 29 http://example.com/HelloWorld 11 hello world``. The envelope is

.. code-block:: json

    {"payload": "<base64>", "payloadType": "<type>",
     "signatures": [{"keyid": "<sha256 of the raw public key, hex>", "sig": "<base64>"}]}

The ``keyid`` is only a hint (DSSE: it "MUST NOT be used for security decisions"); receipts
and tree heads therefore repeat the signer's key id inside the signed payload. Every
signature fedforget makes (receipts, tree heads, key manifests) goes through :func:`pae`
with a distinct payload type, so no signature can be replayed as another kind of message.

Files hold the canonical JSON of the envelope (sorted keys, no spaces) and one newline;
:func:`parse_envelope` refuses any other spelling, so that every byte of a file is checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedforget.receipts._util import b64decode, b64encode, canonical_json, parse_canonical_json
from fedforget.receipts.errors import EnvelopeError, ReceiptError, SignatureError
from fedforget.receipts.keys import key_id

__all__ = [
    "Envelope",
    "envelope_bytes",
    "pae",
    "parse_envelope",
    "sign_envelope",
    "verify_signature",
]

_ENVELOPE_KEYS = ("payload", "payloadType", "signatures")
_SIGNATURE_KEYS = ("keyid", "sig")


def pae(payload_type: str | bytes, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding of ``payload_type`` and ``payload``.

    Examples
    --------
    >>> pae("http://example.com/HelloWorld", b"hello world")
    b'DSSEv1 29 http://example.com/HelloWorld 11 hello world'
    """
    kind = payload_type.encode("utf-8") if isinstance(payload_type, str) else payload_type
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


@dataclass(frozen=True, slots=True)
class Envelope:
    """A parsed single-signature envelope (not yet verified).

    Attributes
    ----------
    payload
        The serialized body, decoded from base64.
    payload_type
        The payload type as written.
    keyid
        The unauthenticated key hint.
    signature
        The raw Ed25519 signature (64 bytes).
    """

    payload: bytes
    payload_type: str
    keyid: str
    signature: bytes

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of the envelope."""
        return {
            "payload": b64encode(self.payload),
            "payloadType": self.payload_type,
            "signatures": [{"keyid": self.keyid, "sig": b64encode(self.signature)}],
        }


def sign_envelope(
    payload: bytes, payload_type: str, private_key: Ed25519PrivateKey
) -> dict[str, Any]:
    """Sign ``PAE(payload_type, payload)`` with ``private_key``; return the envelope dict."""
    signature = private_key.sign(pae(payload_type, payload))
    return Envelope(payload, payload_type, key_id(private_key.public_key()), signature).to_dict()


def envelope_bytes(envelope: Mapping[str, Any]) -> bytes:
    """The file form of an envelope: canonical JSON and one newline."""
    return canonical_json(dict(envelope), EnvelopeError) + b"\n"


def envelope_from_mapping(
    data: object, what: str = "envelope", error: type[ReceiptError] = EnvelopeError
) -> Envelope:
    """Check the shape of a JSON envelope (exactly one signature, known fields only)."""
    if not isinstance(data, dict):
        raise error(f"{what} is {type(data).__name__}; expected a JSON object")
    for key in sorted(data):
        if key not in _ENVELOPE_KEYS:
            raise error(f"unknown field {key!r} in {what}")
    for key in _ENVELOPE_KEYS:
        if key not in data:
            raise error(f"missing field {key!r} in {what}")
    payload = b64decode(data["payload"], f"{what} payload", error)
    payload_type = data["payloadType"]
    if not isinstance(payload_type, str):
        raise error(f"{what} payloadType is {payload_type!r}; expected a string")
    signatures = data["signatures"]
    if not isinstance(signatures, list) or len(signatures) != 1:
        count = len(signatures) if isinstance(signatures, list) else repr(signatures)
        raise error(f"{what} has {count} signatures; expected exactly 1")
    sig = signatures[0]
    if not isinstance(sig, dict):
        raise error(f"{what} signature is {sig!r}; expected a JSON object")
    for key in sorted(sig):
        if key not in _SIGNATURE_KEYS:
            raise error(f"unknown field {key!r} in {what} signature")
    for key in _SIGNATURE_KEYS:
        if key not in sig:
            raise error(f"missing field {key!r} in {what} signature")
    keyid = sig["keyid"]
    if not isinstance(keyid, str):
        raise error(f"{what} keyid is {keyid!r}; expected a string")
    signature = b64decode(sig["sig"], f"{what} signature", error)
    if len(signature) != 64:
        raise error(f"{what} signature has {len(signature)} bytes; expected 64 (Ed25519)")
    return Envelope(payload, payload_type, keyid, signature)


def parse_envelope(data: bytes) -> Envelope:
    """Parse the bytes of an envelope file, refusing anything but its canonical form.

    Raises
    ------
    EnvelopeError
        If the bytes are not UTF-8 canonical JSON followed by one newline, or the envelope has
        unknown or missing fields, non-canonical base64, or other than one signature.
    """
    if not isinstance(data, bytes | bytearray):
        raise EnvelopeError(f"envelope is a {type(data).__name__}; expected bytes")
    if not data.endswith(b"\n"):
        raise EnvelopeError("file does not end with one newline after the JSON envelope")
    parsed = parse_canonical_json(bytes(data[:-1]), "envelope", EnvelopeError)
    return envelope_from_mapping(parsed)


def verify_signature(envelope: Envelope, public_key: Ed25519PublicKey, what: str) -> None:
    """Check the envelope's Ed25519 signature over PAE under ``public_key``.

    Raises
    ------
    SignatureError
        If the signature does not verify, or verifies but the envelope's keyid names another
        key.
    """
    expected = key_id(public_key)
    try:
        public_key.verify(envelope.signature, pae(envelope.payload_type, envelope.payload))
    except InvalidSignature:
        raise SignatureError(
            f"{what} does not verify under key {expected} (the envelope names key "
            f"{envelope.keyid!r})"
        ) from None
    if envelope.keyid != expected:
        raise SignatureError(
            f"{what} envelope names key {envelope.keyid!r}; the key that verifies it is "
            f"{expected}"
        )
