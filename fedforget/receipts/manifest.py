"""Key rotation and revocation: a chain of key-manifest versions, each signed by the last key.

A manifest file is

.. code-block:: json

    {"_type": "https://fedforget.dev/key-manifest/v1",
     "versions": [<DSSE envelope of version 1>, <DSSE envelope of version 2>, ...]}

Each envelope (payload type ``application/vnd.fedforget.key-manifest.v1+json``) carries the
canonical JSON of one version:

.. code-block:: json

    {"version": 2, "issued-at": "2025-02-01T00:00:00Z", "current-key-id": "<hex>",
     "previous": "sha256:<hex of version 1's payload bytes>",
     "keys": [{"key-id": "<hex>", "public-key": "<base64 of 32 raw bytes>",
               "valid-from": "2025-01-01T00:00:00Z", "revoked-at": null}, ...]}

Version 1 is signed by its own current key; version :math:`k > 1` by the current key of
version :math:`k - 1`. A version keeps every key of the one before with the same public key
and valid-from, and never lifts or moves a revocation. A verifier trusts the manifest when the
key it already trusts (the public key it was given when it enrolled) is the current key of
some version: every later version is then signed, link by link, from that key.

A signature made by key :math:`K` at claimed time :math:`t` is accepted when
:math:`\\text{valid-from}(K) \\le t` and :math:`K` is not revoked or
:math:`t < \\text{revoked-at}(K)`. A rotated-out key that was not revoked stays valid, so old
receipts keep verifying. The time is the one inside the signed payload: a stolen key can
still sign back-dated messages, which is why a compromised key must be revoked at a time
before the compromise.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedforget.receipts._util import (
    b64decode,
    b64encode,
    canonical_json,
    parse_canonical_json,
    parse_utc,
    require_fields,
    require_hex64,
    require_int,
    utc_now,
)
from fedforget.receipts.dsse import (
    Envelope,
    envelope_from_mapping,
    sign_envelope,
    verify_signature,
)
from fedforget.receipts.errors import KeyManifestError, SigningKeyError
from fedforget.receipts.keys import key_id, raw_public_key

__all__ = [
    "MANIFEST_PAYLOAD_TYPE",
    "MANIFEST_TYPE",
    "KeyManifest",
    "ManifestKey",
    "check_key_valid",
    "verify_envelope_signature",
]

MANIFEST_TYPE = "https://fedforget.dev/key-manifest/v1"
"""Value of ``_type`` in a manifest file."""

MANIFEST_PAYLOAD_TYPE = "application/vnd.fedforget.key-manifest.v1+json"
"""DSSE payload type of one manifest version."""

_VERSION_FIELDS = ("current-key-id", "issued-at", "keys", "previous", "version")
_KEY_FIELDS = ("key-id", "public-key", "revoked-at", "valid-from")


@dataclass(frozen=True, slots=True)
class ManifestKey:
    """One key listed in a manifest version.

    Attributes
    ----------
    key_id
        Hex SHA-256 of the raw public key.
    public_key
        The Ed25519 public key.
    valid_from
        RFC 3339 UTC time from which its signatures are accepted.
    revoked_at
        RFC 3339 UTC time from which its signatures are refused, or None.
    """

    key_id: str
    public_key: Ed25519PublicKey
    valid_from: str
    revoked_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of the entry."""
        return {
            "key-id": self.key_id,
            "public-key": b64encode(raw_public_key(self.public_key)),
            "valid-from": self.valid_from,
            "revoked-at": self.revoked_at,
        }


def _parse_key(data: object, where: str) -> ManifestKey:
    fields = require_fields(data, where, KeyManifestError, _KEY_FIELDS)
    kid = require_hex64(fields["key-id"], f"{where} key-id", KeyManifestError)
    raw = b64decode(fields["public-key"], f"{where} public-key", KeyManifestError)
    if len(raw) != 32:
        raise KeyManifestError(f"{where} public-key has {len(raw)} bytes; expected 32")
    public_key = Ed25519PublicKey.from_public_bytes(raw)
    if key_id(public_key) != kid:
        raise KeyManifestError(
            f"{where} key-id is {kid}; the SHA-256 of its public key is {key_id(public_key)}"
        )
    valid_from = fields["valid-from"]
    start = parse_utc(valid_from, f"{where} valid-from", KeyManifestError)
    revoked_at = fields["revoked-at"]
    if revoked_at is not None and parse_utc(
        revoked_at, f"{where} revoked-at", KeyManifestError
    ) < start:
        raise KeyManifestError(
            f"{where} is revoked at {revoked_at}, before it became valid at {valid_from}"
        )
    return ManifestKey(kid, public_key, valid_from, revoked_at)


@dataclass(frozen=True, slots=True)
class _Version:
    number: int
    issued_at: str
    current_key_id: str
    previous: str | None
    keys: tuple[ManifestKey, ...]

    def payload(self) -> bytes:
        return canonical_json(
            {
                "version": self.number,
                "issued-at": self.issued_at,
                "current-key-id": self.current_key_id,
                "previous": self.previous,
                "keys": [k.to_dict() for k in self.keys],
            },
            KeyManifestError,
        )

    def key(self, kid: str) -> ManifestKey | None:
        for entry in self.keys:
            if entry.key_id == kid:
                return entry
        return None


def _parse_version(envelope: Envelope, number: int) -> _Version:
    where = f"version {number}"
    if envelope.payload_type != MANIFEST_PAYLOAD_TYPE:
        raise KeyManifestError(
            f"{where} has payloadType {envelope.payload_type!r}; expected "
            f"{MANIFEST_PAYLOAD_TYPE!r}"
        )
    data = parse_canonical_json(envelope.payload, where, KeyManifestError)
    fields = require_fields(data, where, KeyManifestError, _VERSION_FIELDS)
    found = require_int(fields["version"], f"{where} version", KeyManifestError, minimum=1)
    if found != number:
        raise KeyManifestError(f"{where} says it is version {found}; expected {number}")
    issued_at = fields["issued-at"]
    parse_utc(issued_at, f"{where} issued-at", KeyManifestError)
    current = require_hex64(fields["current-key-id"], f"{where} current-key-id", KeyManifestError)
    previous = fields["previous"]
    if not (previous is None or isinstance(previous, str)):
        raise KeyManifestError(f"{where} previous is {previous!r}; expected a digest or null")
    raw_keys = fields["keys"]
    if not isinstance(raw_keys, list) or not raw_keys:
        raise KeyManifestError(f"{where} keys is {raw_keys!r}; expected a non-empty list")
    keys = tuple(_parse_key(k, f"{where} key {i}") for i, k in enumerate(raw_keys))
    ids = [k.key_id for k in keys]
    if len(set(ids)) != len(ids):
        raise KeyManifestError(f"{where} lists a key more than once: {ids}")
    version = _Version(number, issued_at, current, previous, keys)
    entry = version.key(current)
    if entry is None:
        raise KeyManifestError(f"{where} current-key-id {current} is not among its keys {ids}")
    if entry.revoked_at is not None:
        raise KeyManifestError(
            f"{where} current key {current} is revoked at {entry.revoked_at}; the current "
            "key cannot be revoked"
        )
    return version


def _check_extends(old: _Version, new: _Version) -> None:
    where = f"version {new.number}"
    expected_previous = "sha256:" + hashlib.sha256(old.payload()).hexdigest()
    if new.previous != expected_previous:
        raise KeyManifestError(
            f"{where} previous is {new.previous!r}; expected {expected_previous} (the digest "
            f"of version {old.number})"
        )
    if parse_utc(new.issued_at, "", KeyManifestError) < parse_utc(
        old.issued_at, "", KeyManifestError
    ):
        raise KeyManifestError(
            f"{where} is issued at {new.issued_at}, before version {old.number} "
            f"({old.issued_at})"
        )
    for entry in old.keys:
        kept = new.key(entry.key_id)
        if kept is None:
            raise KeyManifestError(f"{where} drops key {entry.key_id} of version {old.number}")
        if kept.valid_from != entry.valid_from:
            raise KeyManifestError(
                f"{where} moves valid-from of key {entry.key_id} from {entry.valid_from} to "
                f"{kept.valid_from}"
            )
        if entry.revoked_at is not None and kept.revoked_at != entry.revoked_at:
            raise KeyManifestError(
                f"{where} changes revoked-at of key {entry.key_id} from {entry.revoked_at} "
                f"to {kept.revoked_at}"
            )


class KeyManifest:
    """A verified chain of key-manifest versions; the last version decides.

    Obtain one with :meth:`create` (and :meth:`rotate`, :meth:`revoke`) on the server, or with
    :meth:`from_json` (which verifies the chain against a trusted key) anywhere else.
    """

    __slots__ = ("_envelopes", "_versions")

    def __init__(self, versions: Sequence[_Version], envelopes: Sequence[dict[str, Any]]) -> None:
        self._versions = tuple(versions)
        self._envelopes = tuple(envelopes)

    # ------------------------------------------------------------------ building
    @classmethod
    def create(
        cls, signing_key: Ed25519PrivateKey, *, valid_from: str | None = None
    ) -> KeyManifest:
        """Version 1, listing ``signing_key`` as the current key, signed by itself."""
        start = valid_from or utc_now()
        parse_utc(start, "valid_from", KeyManifestError)
        entry = ManifestKey(key_id(signing_key.public_key()), signing_key.public_key(), start)
        version = _Version(1, start, entry.key_id, None, (entry,))
        envelope = sign_envelope(version.payload(), MANIFEST_PAYLOAD_TYPE, signing_key)
        return cls([version], [envelope])

    def _next(
        self, current_key: Ed25519PrivateKey, keys: tuple[ManifestKey, ...], current: str, at: str
    ) -> KeyManifest:
        last = self._versions[-1]
        signer = key_id(current_key.public_key())
        if signer != last.current_key_id:
            raise KeyManifestError(
                f"version {last.number + 1} must be signed by the current key "
                f"{last.current_key_id}; got key {signer}"
            )
        previous = "sha256:" + hashlib.sha256(last.payload()).hexdigest()
        version = _Version(last.number + 1, at, current, previous, keys)
        _check_extends(last, version)
        envelope = sign_envelope(version.payload(), MANIFEST_PAYLOAD_TYPE, current_key)
        # Parse what a verifier will parse, so that nothing unverifiable is ever handed out.
        parsed = _parse_version(
            envelope_from_mapping(envelope, "key manifest", KeyManifestError), version.number
        )
        return KeyManifest([*self._versions, parsed], [*self._envelopes, envelope])

    def rotate(
        self,
        current_key: Ed25519PrivateKey,
        new_public_key: Ed25519PublicKey,
        *,
        at: str | None = None,
        revoke_current: bool = False,
    ) -> KeyManifest:
        """A new version whose current key is ``new_public_key``, valid from ``at``.

        Parameters
        ----------
        current_key
            The private key of the current version's current key; it signs the new version.
        new_public_key
            The key that becomes current.
        at
            RFC 3339 UTC time of the rotation (default: now).
        revoke_current
            Also revoke the outgoing key from ``at`` (its signatures claiming ``at`` or later
            are refused); by default it stays valid for what it signed.

        Raises
        ------
        KeyManifestError
            If ``current_key`` is not the current key, or the new key is already listed.
        """
        when = at or utc_now()
        parse_utc(when, "at", KeyManifestError)
        new_id = key_id(new_public_key)
        last = self._versions[-1]
        if last.key(new_id) is not None:
            raise KeyManifestError(f"key {new_id} is already in the manifest")
        keys = tuple(
            replace(k, revoked_at=when) if revoke_current and k.key_id == last.current_key_id
            else k
            for k in last.keys
        )
        keys += (ManifestKey(new_id, new_public_key, when),)
        return self._next(current_key, keys, new_id, when)

    def revoke(
        self,
        current_key: Ed25519PrivateKey,
        revoked_key_id: str,
        *,
        at: str,
        issued_at: str | None = None,
    ) -> KeyManifest:
        """A new version in which ``revoked_key_id`` is revoked from ``at``.

        ``at`` may lie in the past (revoke from before a suspected compromise); the new
        version is dated ``issued_at`` (default: now, or the last version's date if later).

        Raises
        ------
        KeyManifestError
            If the key is unknown, already revoked, or the current key (rotate first).
        """
        parse_utc(at, "at", KeyManifestError)
        last = self._versions[-1]
        entry = last.key(revoked_key_id)
        if entry is None:
            raise KeyManifestError(f"key {revoked_key_id} is not in the manifest")
        if entry.revoked_at is not None:
            raise KeyManifestError(f"key {revoked_key_id} is already revoked at {entry.revoked_at}")
        if revoked_key_id == last.current_key_id:
            raise KeyManifestError(
                f"key {revoked_key_id} is the current key; rotate to a new key with "
                "revoke_current=True instead"
            )
        keys = tuple(
            replace(k, revoked_at=at) if k.key_id == revoked_key_id else k for k in last.keys
        )
        when = issued_at or utc_now()
        if parse_utc(when, "issued_at", KeyManifestError) < parse_utc(
            last.issued_at, "issued-at", KeyManifestError
        ):
            when = last.issued_at
        return self._next(current_key, keys, last.current_key_id, when)

    # ------------------------------------------------------------------ reading
    @property
    def version(self) -> int:
        """Number of the last version."""
        return self._versions[-1].number

    @property
    def current_key_id(self) -> str:
        """Key id of the current key of the last version."""
        return self._versions[-1].current_key_id

    @property
    def keys(self) -> tuple[ManifestKey, ...]:
        """The keys of the last version."""
        return self._versions[-1].keys

    def key(self, kid: str) -> ManifestKey:
        """The entry of ``kid`` in the last version.

        Raises
        ------
        SigningKeyError
            If the manifest does not list ``kid``.
        """
        entry = self._versions[-1].key(kid)
        if entry is None:
            listed = ", ".join(k.key_id for k in self.keys)
            raise SigningKeyError(
                f"key {kid!r} is not in the key manifest (version {self.version} lists {listed})"
            )
        return entry

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of the manifest file."""
        return {"_type": MANIFEST_TYPE, "versions": [dict(e) for e in self._envelopes]}

    def to_json(self) -> bytes:
        """The manifest file: canonical JSON and one newline."""
        return canonical_json(self.to_dict(), KeyManifestError) + b"\n"

    @classmethod
    def from_json(cls, data: bytes, *, trusted_key: Ed25519PublicKey) -> KeyManifest:
        """Parse and verify a manifest file against the key the verifier already trusts.

        Raises
        ------
        KeyManifestError
            If the file is malformed, a version does not extend the one before, or
            ``trusted_key`` is not the current key of any version.
        SignatureError
            If a version's signature does not verify under the previous current key.
        """
        try:
            parsed = json.loads(bytes(data).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise KeyManifestError(f"file is not UTF-8 JSON: {exc}") from exc
        return cls.from_dict(parsed, trusted_key=trusted_key)

    @classmethod
    def from_dict(cls, data: object, *, trusted_key: Ed25519PublicKey) -> KeyManifest:
        """As :meth:`from_json`, from the parsed JSON object."""
        fields = require_fields(data, "key manifest", KeyManifestError, ("_type", "versions"))
        if fields["_type"] != MANIFEST_TYPE:
            raise KeyManifestError(f"_type is {fields['_type']!r}; expected {MANIFEST_TYPE!r}")
        raw_versions = fields["versions"]
        if not isinstance(raw_versions, list) or not raw_versions:
            raise KeyManifestError(f"versions is {raw_versions!r}; expected a non-empty list")
        versions: list[_Version] = []
        for number, raw in enumerate(raw_versions, start=1):
            what = f"key manifest version {number}"
            envelope = envelope_from_mapping(raw, f"version {number}", KeyManifestError)
            version = _parse_version(envelope, number)
            if versions:
                _check_extends(versions[-1], version)
                signer = versions[-1].key(versions[-1].current_key_id)
            else:
                signer = version.key(version.current_key_id)
            if signer is None:  # pragma: no cover - _parse_version guarantees it
                raise KeyManifestError(f"{what} has no signer key")
            verify_signature(envelope, signer.public_key, what)
            versions.append(version)
        trusted = key_id(trusted_key)
        if not any(v.current_key_id == trusted for v in versions):
            raise KeyManifestError(
                f"the trusted key {trusted} is not the current key of any version; the "
                "manifest is not rooted in it"
            )
        return cls(versions, [dict(r) for r in raw_versions])

    def __repr__(self) -> str:
        return (
            f"KeyManifest(version={self.version}, current_key_id={self.current_key_id!r}, "
            f"keys={len(self.keys)})"
        )


def check_key_valid(entry: ManifestKey, at: str, what: str) -> None:
    """Refuse a signature of ``entry`` that claims time ``at`` outside the key's validity.

    Raises
    ------
    SigningKeyError
        If ``at`` is before valid-from or at/after revoked-at.
    """
    when = parse_utc(at, f"{what} time", SigningKeyError)
    if when < parse_utc(entry.valid_from, "valid-from", SigningKeyError):
        raise SigningKeyError(
            f"{what} is dated {at}, before key {entry.key_id} became valid at {entry.valid_from}"
        )
    if entry.revoked_at is not None and when >= parse_utc(
        entry.revoked_at, "revoked-at", SigningKeyError
    ):
        raise SigningKeyError(
            f"{what} is dated {at}, but key {entry.key_id} was revoked at {entry.revoked_at}"
        )


def verify_envelope_signature(
    envelope: Envelope,
    *,
    public_key: Ed25519PublicKey | None,
    manifest: KeyManifest | None,
    what: str,
) -> tuple[str, ManifestKey | None]:
    """Verify ``envelope`` under ``public_key``, or under the manifest key its keyid names.

    Returns the key id of the verifying key and, when a manifest is used, its manifest entry
    (the caller must then check its validity at the signed time with
    :func:`check_key_valid`).

    Raises
    ------
    SigningKeyError
        If not exactly one of ``public_key`` and ``manifest`` is given, or the manifest does
        not list the named key.
    SignatureError
        If the signature does not verify.
    """
    if public_key is not None and manifest is None:
        verify_signature(envelope, public_key, what)
        return key_id(public_key), None
    if manifest is not None and public_key is None:
        entry = manifest.key(envelope.keyid)
        verify_signature(envelope, entry.public_key, what)
        return entry.key_id, entry
    given = "both" if public_key is not None else "neither"
    raise SigningKeyError(f"give exactly one of public_key and manifest; got {given}")
