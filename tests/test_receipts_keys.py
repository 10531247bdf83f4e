"""Tests of fedforget.receipts.keys and .manifest: key files, key ids, rotation, revocation."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedforget.receipts.dsse import sign_envelope
from fedforget.receipts.errors import KeyManifestError, SignatureError, SigningKeyError
from fedforget.receipts.keys import (
    generate_keys,
    key_id,
    load_private_key,
    load_public_key,
)
from fedforget.receipts.manifest import MANIFEST_PAYLOAD_TYPE, KeyManifest, check_key_valid

K1 = Ed25519PrivateKey.from_private_bytes(b"\x01" * 32)
K2 = Ed25519PrivateKey.from_private_bytes(b"\x02" * 32)
K3 = Ed25519PrivateKey.from_private_bytes(b"\x03" * 32)
ID1, ID2, ID3 = (key_id(k.public_key()) for k in (K1, K2, K3))


# ------------------------------------------------------------------ key files
def test_key_id_is_sha256_of_the_raw_public_key() -> None:
    # RFC 8032 §7.1, TEST 1: secret key and the public key it gives.
    secret = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    public = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    key = Ed25519PrivateKey.from_private_bytes(secret).public_key()
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert raw == public
    assert key_id(key) == hashlib.sha256(public).hexdigest()


def test_generate_keys_writes_pkcs8_0600_and_pem_public_key(tmp_path: Path) -> None:
    # Execute
    keys = generate_keys(tmp_path / "keys")
    # Assert
    private_path = tmp_path / "keys" / "signing.key"
    public_path = tmp_path / "keys" / "signing.pub"
    assert (keys.private_key_path, keys.public_key_path) == (private_path, public_path)
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    private_key = load_private_key(private_path)
    assert key_id(private_key.public_key()) == keys.key_id
    assert key_id(load_public_key(public_path)) == keys.key_id
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["signing.key", "signing.pub"]


def test_generate_keys_refuses_to_overwrite_and_writes_nothing(tmp_path: Path) -> None:
    generate_keys(tmp_path)
    before = (tmp_path / "signing.key").read_bytes()
    with pytest.raises(SigningKeyError) as info:
        generate_keys(tmp_path)
    assert str(info.value) == (
        f"key: {tmp_path / 'signing.key'} exists; refusing to overwrite a key file"
    )
    assert (tmp_path / "signing.key").read_bytes() == before

    other = tmp_path / "other"
    other.mkdir()
    (other / "signing.pub").write_bytes(b"mine")
    with pytest.raises(SigningKeyError) as info:
        generate_keys(other)
    assert str(info.value) == (
        f"key: {other / 'signing.pub'} exists; refusing to overwrite a key file"
    )
    assert sorted(p.name for p in other.iterdir()) == ["signing.pub"]


def test_loading_something_else_fails_with_the_path_named(tmp_path: Path) -> None:
    path = tmp_path / "k.pub"
    path.write_bytes(b"not a key")
    with pytest.raises(SigningKeyError) as info:
        load_public_key(path)
    assert str(info.value).startswith(f"key: {path} is not a PEM public key: ")
    with pytest.raises(SigningKeyError) as info:
        load_public_key(tmp_path / "missing.pub")
    assert str(info.value) == (
        f"key: cannot read key file {tmp_path / 'missing.pub'}: No such file or directory"
    )


# ------------------------------------------------------------------ manifests
T0, T1, T2, T3, T4 = (f"2025-0{m}-01T00:00:00Z" for m in range(1, 6))


def rotated() -> KeyManifest:
    """K1 from T0, rotated to K2 at T2 (K1 stays valid)."""
    return KeyManifest.create(K1, valid_from=T0).rotate(K1, K2.public_key(), at=T2)


def test_manifest_round_trips_through_json_and_keeps_rotated_keys() -> None:
    manifest = rotated()
    loaded = KeyManifest.from_json(manifest.to_json(), trusted_key=K1.public_key())
    assert loaded.to_json() == manifest.to_json()
    assert loaded.version == 2
    assert loaded.current_key_id == ID2
    assert [(k.key_id, k.valid_from, k.revoked_at) for k in loaded.keys] == [
        (ID1, T0, None),
        (ID2, T2, None),
    ]
    # A client that enrolled after the rotation trusts K2, the current key of version 2.
    assert KeyManifest.from_json(manifest.to_json(), trusted_key=K2.public_key()).version == 2


def test_a_rotated_out_key_stays_valid_for_what_it_signed() -> None:
    manifest = rotated()
    check_key_valid(manifest.key(ID1), T1, "receipt")
    check_key_valid(manifest.key(ID1), T3, "receipt")  # rotated out, not revoked
    check_key_valid(manifest.key(ID2), T3, "receipt")


def test_a_key_is_refused_before_it_became_valid() -> None:
    with pytest.raises(SigningKeyError) as info:
        check_key_valid(rotated().key(ID2), T1, "receipt")
    assert str(info.value) == (
        f"key: receipt is dated {T1}, before key {ID2} became valid at {T2}"
    )


def test_a_revoked_key_is_refused_from_its_revocation_on() -> None:
    # Prepare: K1 rotated out at T2, then revoked from T3.
    manifest = rotated().revoke(K2, ID1, at=T3, issued_at=T4)
    loaded = KeyManifest.from_json(manifest.to_json(), trusted_key=K1.public_key())
    # Execute / Assert
    check_key_valid(loaded.key(ID1), T2, "receipt")
    for when in (T3, T4):
        with pytest.raises(SigningKeyError) as info:
            check_key_valid(loaded.key(ID1), when, "receipt")
        assert str(info.value) == (
            f"key: receipt is dated {when}, but key {ID1} was revoked at {T3}"
        )


def test_rotation_can_revoke_the_outgoing_key() -> None:
    manifest = KeyManifest.create(K1, valid_from=T0).rotate(
        K1, K2.public_key(), at=T2, revoke_current=True
    )
    assert manifest.key(ID1).revoked_at == T2
    with pytest.raises(SigningKeyError):
        check_key_valid(manifest.key(ID1), T2, "receipt")


def test_only_the_current_key_may_sign_the_next_version() -> None:
    with pytest.raises(KeyManifestError) as info:
        rotated().rotate(K1, K3.public_key(), at=T3)
    assert str(info.value) == (
        f"key manifest: version 3 must be signed by the current key {ID2}; got key {ID1}"
    )


def test_the_current_key_cannot_be_revoked_without_rotation() -> None:
    with pytest.raises(KeyManifestError) as info:
        rotated().revoke(K2, ID2, at=T3)
    assert str(info.value) == (
        f"key manifest: key {ID2} is the current key; rotate to a new key with "
        "revoke_current=True instead"
    )


def test_an_unknown_key_is_refused_with_the_listed_keys_named() -> None:
    with pytest.raises(SigningKeyError) as info:
        rotated().key(ID3)
    assert str(info.value) == (
        f"key: key '{ID3}' is not in the key manifest (version 2 lists {ID1}, {ID2})"
    )


def test_a_manifest_not_rooted_in_the_trusted_key_is_refused() -> None:
    with pytest.raises(KeyManifestError) as info:
        KeyManifest.from_json(rotated().to_json(), trusted_key=K3.public_key())
    assert str(info.value) == (
        f"key manifest: the trusted key {ID3} is not the current key of any version; the "
        "manifest is not rooted in it"
    )


def _resign(
    manifest: KeyManifest,
    index: int,
    signer: Ed25519PrivateKey,
    edit: Callable[[dict[str, Any]], None],
) -> bytes:
    """The manifest file with version ``index`` edited by ``edit`` and re-signed."""
    data = manifest.to_dict()
    payload = json.loads(base64.b64decode(data["versions"][index]["payload"]))
    edit(payload)
    body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    data["versions"][index] = sign_envelope(body, MANIFEST_PAYLOAD_TYPE, signer)
    return json.dumps(data).encode()


def test_a_version_signed_by_another_key_than_the_previous_current_is_refused() -> None:
    # An attacker holding only K3 appends a version making K3 current.
    forged = _resign(rotated(), 1, K3, lambda p: None)
    with pytest.raises(SignatureError) as info:
        KeyManifest.from_json(forged, trusted_key=K1.public_key())
    assert str(info.value) == (
        f"signature: key manifest version 2 does not verify under key {ID1} (the envelope "
        f"names key '{ID3}')"
    )


def test_a_version_that_lifts_a_revocation_is_refused() -> None:
    manifest = rotated().revoke(K2, ID1, at=T3, issued_at=T4).rotate(K2, K3.public_key(), at=T4)

    def lift(payload: dict[str, Any]) -> None:
        payload["keys"][0]["revoked-at"] = None

    forged = _resign(manifest, 3, K2, lift)
    with pytest.raises(KeyManifestError) as info:
        KeyManifest.from_json(forged, trusted_key=K1.public_key())
    assert str(info.value) == (
        f"key manifest: version 4 changes revoked-at of key {ID1} from {T3} "
        "to None"
    )


def test_a_version_that_drops_a_key_is_refused() -> None:
    def drop(payload: dict[str, Any]) -> None:
        payload["keys"] = payload["keys"][1:]

    forged = _resign(rotated(), 1, K1, drop)
    with pytest.raises(KeyManifestError) as info:
        KeyManifest.from_json(forged, trusted_key=K1.public_key())
    assert str(info.value) == f"key manifest: version 2 drops key {ID1} of version 1"
