"""Tests of fedforget.receipts.dsse: PAE, envelope signing, strict parsing."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedforget.receipts.dsse import (
    envelope_bytes,
    pae,
    parse_envelope,
    sign_envelope,
    verify_signature,
)
from fedforget.receipts.errors import EnvelopeError, SignatureError
from fedforget.receipts.keys import key_id

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def test_pae_reproduces_the_spec_example() -> None:
    # The example of the DSSE protocol, secure-systems-lab/dsse protocol.md, "Test Vectors".
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_pae_counts_bytes_not_characters() -> None:
    assert pae("t\u00e9", b"") == b"DSSEv1 3 t\xc3\xa9 0 "


def test_sign_then_parse_and_verify_round_trip() -> None:
    # Prepare
    envelope = sign_envelope(b"hello world", "http://example.com/HelloWorld", KEY)
    # Execute
    parsed = parse_envelope(envelope_bytes(envelope))
    # Assert
    assert parsed.payload == b"hello world"
    assert parsed.payload_type == "http://example.com/HelloWorld"
    assert parsed.keyid == key_id(KEY.public_key())
    assert envelope["payload"] == "aGVsbG8gd29ybGQ="  # as in the spec's example envelope
    verify_signature(parsed, KEY.public_key(), "message")
    KEY.public_key().verify(parsed.signature, pae(parsed.payload_type, parsed.payload))


def test_another_key_fails_closed_with_both_key_ids_named() -> None:
    parsed = parse_envelope(envelope_bytes(sign_envelope(b"x", "t", KEY)))
    with pytest.raises(SignatureError) as info:
        verify_signature(parsed, OTHER.public_key(), "message")
    assert str(info.value) == (
        f"signature: message does not verify under key {key_id(OTHER.public_key())} (the "
        f"envelope names key '{key_id(KEY.public_key())}')"
    )


def test_a_wrong_keyid_hint_is_refused_even_if_the_signature_verifies() -> None:
    envelope = sign_envelope(b"x", "t", KEY)
    envelope["signatures"][0]["keyid"] = "0" * 64
    with pytest.raises(SignatureError) as info:
        verify_signature(parse_envelope(envelope_bytes(envelope)), KEY.public_key(), "message")
    assert str(info.value) == (
        f"signature: message envelope names key '{'0' * 64}'; the key that verifies it is "
        f"{key_id(KEY.public_key())}"
    )


def test_url_safe_base64_is_accepted_as_the_spec_requires() -> None:
    payload = b"\xfb\xff\xfe"  # standard base64 "+//+", URL-safe "-__-"
    envelope = sign_envelope(payload, "t", KEY)
    envelope["payload"] = base64.urlsafe_b64encode(payload).decode()
    parsed = parse_envelope(envelope_bytes(envelope))
    assert parsed.payload == payload
    verify_signature(parsed, KEY.public_key(), "message")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda e: e.update(payload="aGVsbG8gd29ybGR="),
         "envelope: envelope payload is not canonical base64 (padding or unused bits differ)"),
        (lambda e: e.update(payload="aGVsbG8gd29ybGQ"),
         "envelope: envelope payload is not valid base64: Incorrect padding"),
        (lambda e: e.update(extra=1), "envelope: unknown field 'extra' in envelope"),
        (lambda e: e.pop("payloadType"), "envelope: missing field 'payloadType' in envelope"),
        (lambda e: e["signatures"].append(e["signatures"][0]),
         "envelope: envelope has 2 signatures; expected exactly 1"),
        (lambda e: e["signatures"][0].update(cert="x"),
         "envelope: unknown field 'cert' in envelope signature"),
        (lambda e: e["signatures"][0].update(sig="AAAA"),
         "envelope: envelope signature has 3 bytes; expected 64 (Ed25519)"),
    ],
)
def test_malformed_envelopes_are_refused_with_the_field_named(
    mutate: Callable[[dict[str, Any]], object], message: str
) -> None:
    envelope = sign_envelope(b"hello world", "t", KEY)
    mutate(envelope)
    with pytest.raises(EnvelopeError) as info:
        parse_envelope(envelope_bytes(envelope))
    assert str(info.value) == message


def test_a_non_canonical_file_is_refused() -> None:
    envelope = sign_envelope(b"hello world", "t", KEY)
    pretty = json.dumps(envelope, indent=2).encode() + b"\n"
    with pytest.raises(EnvelopeError) as info:
        parse_envelope(pretty)
    assert str(info.value) == (
        "envelope: envelope is not RFC 8785 canonical JSON (sorted keys, no spaces, UTF-8, "
        "ECMAScript numbers); it was altered or not written by this fedforget"
    )
    with pytest.raises(EnvelopeError) as info:
        parse_envelope(envelope_bytes(envelope)[:-1])
    assert str(info.value) == (
        "envelope: file does not end with one newline after the JSON envelope"
    )
