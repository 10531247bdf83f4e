"""Tests of fedforget.receipts.tree_head: signed tree heads of the history."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedforget.receipts.dsse import pae
from fedforget.receipts.errors import (
    ConsistencyProofError,
    SignatureError,
    SigningKeyError,
    TreeHeadError,
)
from fedforget.receipts.keys import key_id
from fedforget.receipts.manifest import KeyManifest
from fedforget.receipts.merkle import consistency_proof, leaf_hashes, tree_root
from fedforget.receipts.tree_head import (
    TREE_HEAD_PAYLOAD_TYPE,
    TreeHead,
    sign_tree_head,
    tree_head_for,
    verify_head_extends,
    verify_tree_head,
)

KEY = Ed25519PrivateKey.from_private_bytes(b"\x07" * 32)
OTHER = Ed25519PrivateKey.from_private_bytes(b"\x08" * 32)
RECORDS = [json.dumps({"round": t}, separators=(",", ":")).encode() for t in range(1, 11)]
EMPTY = hashlib.sha256(b"").hexdigest()
WHEN = "2025-03-01T12:00:00.000001Z"


def test_signed_bytes_are_the_pae_of_the_canonical_body() -> None:
    # Prepare
    head = tree_head_for(RECORDS[:4], KEY, timestamp=WHEN)
    size, root = tree_root(RECORDS[:4])
    kid = key_id(KEY.public_key())
    empty = hashlib.sha256(b"").hexdigest()  # the empty ledger's root (RFC 9162: MTH({}))
    body = (f'{{"key-id":"{kid}","ledger-root":"{empty}","ledger-size":0,'
            f'"root":"{root.hex()}","size":4,"timestamp":"{WHEN}"}}').encode()
    # Assert
    assert (head.size, head.root) == (size, root.hex())
    assert head.signed_bytes() == pae(TREE_HEAD_PAYLOAD_TYPE, body)
    KEY.public_key().verify(base64.b64decode(head.signature), head.signed_bytes())


def test_sign_verify_and_json_round_trip() -> None:
    head = sign_tree_head(3, tree_root(RECORDS[:3])[1], KEY, timestamp=WHEN)
    verify_tree_head(head, public_key=KEY.public_key())
    again = TreeHead.from_json(head.to_json())
    assert again == head
    verify_tree_head(again, public_key=KEY.public_key())
    assert head.to_json().endswith(b"\n")


def test_a_head_with_any_field_changed_does_not_verify() -> None:
    head = tree_head_for(RECORDS, KEY, timestamp=WHEN)
    changed = [
        TreeHead(9, head.root, head.timestamp, head.key_id, head.signature),
        TreeHead(head.size, "0" * 64, head.timestamp, head.key_id, head.signature),
        TreeHead(head.size, head.root, "2025-03-01T12:00:00Z", head.key_id, head.signature),
    ]
    for bad in changed:
        with pytest.raises(SignatureError) as info:
            verify_tree_head(bad, public_key=KEY.public_key())
        assert str(info.value) == (
            f"signature: tree head does not verify under key {head.key_id} (the envelope "
            f"names key '{head.key_id}')"
        )


def test_another_key_does_not_verify() -> None:
    head = tree_head_for(RECORDS, KEY, timestamp=WHEN)
    with pytest.raises(SignatureError) as info:
        verify_tree_head(head, public_key=OTHER.public_key())
    assert str(info.value) == (
        f"signature: tree head does not verify under key {key_id(OTHER.public_key())} (the "
        f"envelope names key '{head.key_id}')"
    )


def test_with_a_manifest_the_key_must_be_valid_at_the_head_time() -> None:
    manifest = KeyManifest.create(KEY, valid_from="2025-04-01T00:00:00Z")
    head = tree_head_for(RECORDS, KEY, timestamp=WHEN)
    with pytest.raises(SigningKeyError) as info:
        verify_tree_head(head, manifest=manifest)
    assert str(info.value) == (
        f"key: tree head is dated {WHEN}, before key {head.key_id} became valid at "
        "2025-04-01T00:00:00Z"
    )
    verify_tree_head(tree_head_for(RECORDS, KEY, timestamp="2025-05-01T00:00:00Z"),
                     manifest=manifest)


def test_exactly_one_key_source_is_required() -> None:
    head = tree_head_for(RECORDS, KEY, timestamp=WHEN)
    with pytest.raises(SigningKeyError) as info:
        verify_tree_head(head)
    assert str(info.value) == "key: give exactly one of public_key and manifest; got neither"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"size": 1}, "tree head: missing field 'key-id' in tree head"),
        ({"key-id": "0" * 64, "root": "0" * 64, "signature": "A" * 88, "size": -1,
          "timestamp": WHEN, "ledger-size": 0, "ledger-root": EMPTY},
         "tree head: tree head size is -1; expected an integer >= 0"),
        ({"key-id": "0" * 64, "root": "0" * 64, "signature": "A" * 86 + "==", "size": 1,
          "timestamp": "2025-03-01 12:00:00", "ledger-size": 0, "ledger-root": EMPTY},
         "tree head: tree head timestamp is '2025-03-01 12:00:00'; expected RFC 3339 UTC such "
         "as '2025-01-31T12:00:00.000001Z'"),
        ({"key-id": "0" * 64, "root": "0" * 64, "signature": "A" * 86 + "==", "size": 1,
          "timestamp": WHEN, "x": 1}, "tree head: unknown field 'x' in tree head"),
        ({"key-id": "0" * 64, "root": "0" * 64, "signature": "A" * 86 + "==", "size": 1,
          "timestamp": WHEN, "ledger-size": 0, "ledger-root": "1" * 64},
         f"tree head: tree head ledger-root is {'1' * 64} for an empty ledger; expected "
         f"{EMPTY}"),
        ({"key-id": "0" * 64, "root": "0" * 64, "signature": "A" * 86 + "==", "size": 1,
          "timestamp": WHEN},
         "tree head: tree head is a version 1 tree head (no ledger-size, ledger-root); this "
         "fedforget signs and reads version 2 heads only (RFC 8785, withdrawal ledger "
         "bound): heads of runs trained before cannot be checked"),
    ],
)
def test_malformed_heads_are_refused(data: dict[str, object], message: str) -> None:
    with pytest.raises(TreeHeadError) as info:
        TreeHead.from_dict(data)
    assert str(info.value) == message


def test_a_new_head_extends_the_saved_one_and_a_rewrite_is_caught() -> None:
    # Prepare: the client saved the head of size 4; the history grew to 10.
    saved = tree_head_for(RECORDS[:4], KEY, timestamp=WHEN)
    hashes = leaf_hashes(RECORDS)
    new = tree_head_for(RECORDS, KEY, timestamp=WHEN)
    # Execute / Assert: honest growth
    verify_head_extends(saved, new, [p.hex() for p in consistency_proof(hashes, 4)])
    # A history rewritten in round 2 gives a head that does not extend the saved one.
    rewritten = list(RECORDS)
    rewritten[1] = b'{"round":2,"forged":true}'
    forged = tree_head_for(rewritten, KEY, timestamp=WHEN)
    with pytest.raises(ConsistencyProofError) as info:
        verify_head_extends(saved, forged, consistency_proof(leaf_hashes(rewritten), 4))
    assert str(info.value).startswith(
        "consistency proof: head of size 10 does not extend head of size 4: proof leads to "
        "new root "
    )
