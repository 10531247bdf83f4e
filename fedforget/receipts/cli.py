"""Command-line pieces: ``fedforget keys generate|rotate|revoke``, ``fedforget receipt
verify`` and ``fedforget receipt open-record``.

Hook into the main parser with :func:`add_subcommands` and run with :func:`dispatch`::

    add_subcommands(sub)             # sub = parser.add_subparsers(dest="command")
    ...
    code = dispatch(args)            # None when the command is not one of these
    if code is not None:
        return code

``receipt verify`` exits 0 and prints the one-line summary when every check passes;
otherwise it prints ``FAILED <check>: <what was found and expected>`` to stderr and exits 1
(2 for unusable arguments or unreadable files).

``keys rotate DIR`` makes a new key current through ``DIR/manifest.json`` (created on the
first rotation), each version signed by the key before; ``keys revoke DIR --key-id ID --at
TIME`` revokes a rotated-out key from ``TIME``. Verifiers that trusted an older key follow the
manifest (``receipt verify --key OLD.pub --manifest DIR/manifest.json``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedforget.receipts.errors import ReceiptError
from fedforget.receipts.keys import generate_keys, public_key_from_pem
from fedforget.receipts.manifest import KeyManifest
from fedforget.receipts.records import RecordOpening, open_record
from fedforget.receipts.run_keys import revoke_key, rotate_keys
from fedforget.receipts.tree_head import TreeHead
from fedforget.receipts.verify import summary_line, verify_receipt

__all__ = ["add_subcommands", "dispatch"]

_HANDLER = "receipts_handler"


def add_subcommands(subparsers: Any) -> None:
    """Add ``keys generate DIR`` and ``receipt verify RECEIPT ...`` to ``subparsers``.

    Parameters
    ----------
    subparsers
        The object returned by ``ArgumentParser.add_subparsers()``.
    """
    keys = subparsers.add_parser("keys", help="manage the server's receipt signing keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    generate = keys_sub.add_parser(
        "generate", help="write signing.key (0600) and signing.pub into DIR; never overwrites"
    )
    generate.add_argument("directory", metavar="DIR")
    generate.set_defaults(**{_HANDLER: _cmd_keys_generate})
    rotate = keys_sub.add_parser(
        "rotate", help="make a new signing key current through DIR/manifest.json (signed by "
        "the current key); the old pair moves to DIR/retired/"
    )
    rotate.add_argument("directory", metavar="DIR")
    rotate.add_argument("--revoke-current", action="store_true",
                        help="also revoke the outgoing key from the rotation time")
    rotate.add_argument("--at", metavar="TIME", help="RFC 3339 UTC time of the rotation "
                        "(default: now)")
    rotate.set_defaults(**{_HANDLER: _cmd_keys_rotate})
    revoke = keys_sub.add_parser(
        "revoke", help="revoke a rotated-out key from TIME in a new manifest version"
    )
    revoke.add_argument("directory", metavar="DIR")
    revoke.add_argument("--key-id", required=True, metavar="ID", help="hex key id to revoke")
    revoke.add_argument("--at", required=True, metavar="TIME",
                        help="RFC 3339 UTC time from which its signatures are refused (may lie "
                        "in the past, before a suspected compromise)")
    revoke.set_defaults(**{_HANDLER: _cmd_keys_revoke})

    receipt = subparsers.add_parser("receipt", help="check erasure receipts")
    receipt_sub = receipt.add_subparsers(dest="receipt_command", required=True)
    verify = receipt_sub.add_parser(
        "verify", help="verify a receipt offline; exit 0 only if every check passes"
    )
    verify.add_argument("receipt", metavar="RECEIPT", help="receipt file (DSSE envelope)")
    verify.add_argument("--key", required=True, metavar="PUB",
                        help="the server's public key (PEM) you trust")
    verify.add_argument("--manifest", metavar="FILE",
                        help="key manifest, for receipts signed by a rotated key")
    verify.add_argument("--model", metavar="FILE", help="the unlearned model file (model.fft)")
    verify.add_argument("--head", metavar="FILE", help="the tree head your client saved")
    verify.add_argument("--salt", metavar="HEX", help="your commitment salt (with --client)")
    verify.add_argument("--client", metavar="ID", help="your client id (with --salt)")
    verify.add_argument("--record-opening", metavar="FILE",
                        help="an opening of one record (receipt open-record): check that "
                             "the receipt covers that record")
    verify.set_defaults(**{_HANDLER: _cmd_receipt_verify})
    opening = receipt_sub.add_parser(
        "open-record", help="(client side) prove that a record-level receipt covers one of "
                            "your records, revealing no other; prints the opening (JSON)")
    opening.add_argument("--records-salt", required=True, metavar="FILE",
                         help="the <receipt-id>.records-salt file you received")
    opening.add_argument("--records", required=True, metavar="FILE",
                         help="the <receipt-id>.records file (the ids you asked to forget)")
    opening.add_argument("--record", required=True, metavar="ID", help="the record to open")
    opening.set_defaults(**{_HANDLER: _cmd_open_record})


def dispatch(args: argparse.Namespace) -> int | None:
    """Run the command parsed into ``args`` if it is one of ours; else return None."""
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, _HANDLER, None)
    if handler is None:
        return None
    return handler(args)


def _cmd_keys_generate(args: argparse.Namespace) -> int:
    try:
        keys = generate_keys(args.directory)
    except ReceiptError as exc:
        print(f"FAILED {exc}", file=sys.stderr)
        return 1
    print(f"key id {keys.key_id}: wrote {keys.private_key_path} and {keys.public_key_path}")
    return 0


def _cmd_keys_rotate(args: argparse.Namespace) -> int:
    try:
        done = rotate_keys(args.directory, revoke_current=args.revoke_current, at=args.at)
    except ReceiptError as exc:
        print(f"FAILED {exc}", file=sys.stderr)
        return 1
    print(f"rotated {args.directory}: key {done.new_key_id} is current (was {done.old_key_id}"
          f"{', revoked' if args.revoke_current else ''}); {done.manifest_path} is at version "
          f"{done.manifest_version}; retired: {', '.join(str(p) for p in done.retired)}")
    return 0


def _cmd_keys_revoke(args: argparse.Namespace) -> int:
    try:
        manifest = revoke_key(args.directory, args.key_id, at=args.at)
    except ReceiptError as exc:
        print(f"FAILED {exc}", file=sys.stderr)
        return 1
    print(f"revoked key {args.key_id} from {args.at} in {args.directory}/manifest.json "
          f"(version {manifest.version})")
    return 0


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise _UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


class _UsageError(Exception):
    pass


def _cmd_receipt_verify(args: argparse.Namespace) -> int:
    try:
        if (args.salt is None) != (args.client is None):
            raise _UsageError("--salt and --client go together")
        salt = None
        if args.salt is not None:
            try:
                salt = bytes.fromhex(args.salt)
            except ValueError:
                raise _UsageError(f"--salt {args.salt!r} is not hex") from None
        receipt = _read(args.receipt, "receipt")
        key_bytes = _read(args.key, "public key")
        manifest_bytes = None if args.manifest is None else _read(args.manifest, "manifest")
        model = None if args.model is None else _read(args.model, "model file")
        head_bytes = None if args.head is None else _read(args.head, "saved head")
        opening_bytes = (None if args.record_opening is None
                         else _read(args.record_opening, "record opening"))
    except _UsageError as exc:
        print(f"receipt verify: {exc}", file=sys.stderr)
        return 2
    try:
        public_key = public_key_from_pem(key_bytes, args.key)
        manifest = None
        if manifest_bytes is not None:
            manifest = KeyManifest.from_json(manifest_bytes, trusted_key=public_key)
        saved_head = None if head_bytes is None else TreeHead.from_json(head_bytes)
        verified = verify_receipt(
            receipt,
            public_key=None if manifest is not None else public_key,
            manifest=manifest,
            model_bytes=model,
            saved_head=saved_head,
            salt=salt,
            client_id=args.client,
            record_opening=(None if opening_bytes is None
                            else RecordOpening.from_json(opening_bytes)),
        )
    except ReceiptError as exc:
        print(f"FAILED {exc}", file=sys.stderr)
        return 1
    print(summary_line(verified))
    return 0


def _cmd_open_record(args: argparse.Namespace) -> int:
    try:
        salt_text = _read(args.records_salt, "records salt").decode().strip()
        ids = [line.strip() for line in _read(args.records, "records").decode().splitlines()
               if line.strip()]
        try:
            salt = bytes.fromhex(salt_text)
        except ValueError:
            raise _UsageError(f"{args.records_salt} does not hold a hex salt") from None
    except _UsageError as exc:
        print(f"receipt open-record: {exc}", file=sys.stderr)
        return 2
    try:
        print(open_record(salt, ids, args.record).to_json())
    except ReceiptError as exc:
        print(f"FAILED {exc}", file=sys.stderr)
        return 1
    return 0
