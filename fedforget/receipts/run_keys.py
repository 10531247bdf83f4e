"""A run's signing key: never silently replaced; rotated and revoked through the manifest.

* :func:`run_signing_key` is what a server calls to get its key: it makes a key only for a
  run that has never signed anything, and refuses a missing or foreign key for a run whose
  heads or receipts were signed (a new key would orphan everything signed before).
* :func:`rotate_keys` makes a new key current through the key manifest
  (:class:`~fedforget.receipts.manifest.KeyManifest`, ``<keys>/manifest.json``), each
  version signed by the key before, so that verifiers holding the old public key follow.
* :func:`revoke_key` revokes a listed key from a given time (e.g. before a suspected theft).

Files of a key directory::

    signing.key, signing.pub        the current key pair (PKCS #8 / SubjectPublicKeyInfo PEM)
    manifest.json                   the key manifest (after the first rotation)
    retired/<key-id>.{key,pub}      keys rotated out (delete retired private keys you do not
                                    want to keep; the manifest keeps their public halves)

Rotation is crash-safe: the new pair is written as ``signing.{key,pub}.new``, then the
manifest naming it, then the pair is moved into place; a rotation interrupted after the
manifest was written is finished by the next ``rotate_keys`` (or refused with that advice by
:func:`run_signing_key`); one interrupted before is started again.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedforget.fileio import fsync_directory, guard_storage, write_atomic, write_new
from fedforget.receipts._util import parse_utc
from fedforget.receipts.errors import KeyManifestError, ReceiptError, SigningKeyError
from fedforget.receipts.keys import (
    PRIVATE_KEY_FILENAME,
    PUBLIC_KEY_FILENAME,
    generate_keys,
    key_id,
    load_private_key,
    public_key_pem,
)
from fedforget.receipts.manifest import KeyManifest
from fedforget.receipts.tree_head import TreeHead
from fedforget.rundir import RunDirectory

__all__ = [
    "MANIFEST_FILENAME",
    "RETIRED_DIRNAME",
    "KeyRotation",
    "load_manifest",
    "revoke_key",
    "rotate_keys",
    "run_signing_key",
    "signed_key_ids",
]

MANIFEST_FILENAME = "manifest.json"
RETIRED_DIRNAME = "retired"
_NEW = ".new"
_EPOCH = "1970-01-01T00:00:00Z"


def signed_key_ids(run_dir: str | os.PathLike[str]) -> dict[str, int]:
    """Key id -> number of heads in the run's ``tree_heads.jsonl`` it signed (lines that do
    not parse are skipped: verification reports them)."""
    counts: dict[str, int] = {}
    path = RunDirectory(run_dir).tree_heads
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return counts
    except OSError as exc:
        raise SigningKeyError(f"cannot read {path}: {exc.strerror or exc}") from exc
    for line in lines:
        try:
            head = TreeHead.from_json(line)
        except ReceiptError:
            continue
        counts[head.key_id] = counts.get(head.key_id, 0) + 1
    return counts


def load_manifest(keys_dir: str | os.PathLike[str]) -> KeyManifest | None:
    """The manifest of a key directory, verified against its current public key (None when
    there is none).

    Raises
    ------
    KeyManifestError
        If the manifest is damaged or not rooted in ``signing.pub``.
    """
    folder = Path(keys_dir)
    path = folder / MANIFEST_FILENAME
    if not path.exists():
        return None
    from fedforget.receipts.keys import load_public_key

    public = load_public_key(folder / PUBLIC_KEY_FILENAME)
    try:
        return KeyManifest.from_json(path.read_bytes(), trusted_key=public)
    except OSError as exc:
        raise KeyManifestError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except KeyManifestError as exc:
        raise KeyManifestError(f"{path}: {exc.detail}") from None


def run_signing_key(
    run_dir: str | os.PathLike[str], keys_dir: str | os.PathLike[str] | None = None
) -> tuple[Ed25519PrivateKey, Path]:
    """The run's private key and the path of its public key; never a silent replacement.

    A key is generated only when the key directory has none **and** the run has signed
    nothing (no head in ``tree_heads.jsonl``, no receipt). Otherwise the key must exist and
    be the key that signed the run's last head, or the manifest's current key with every
    signer of the run's heads listed in the manifest.

    Parameters
    ----------
    run_dir
        The run directory.
    keys_dir
        Where the keys are (default ``<run>/keys``).

    Raises
    ------
    SigningKeyError
        If the key is missing for a run that has signed heads or receipts, or is another key
        than the one that signed them; or a rotation was interrupted (the message says to
        finish it with ``fedforget keys rotate``).
    """
    run = RunDirectory(run_dir)
    folder = Path(keys_dir) if keys_dir is not None else run.default_keys
    private_path = folder / PRIVATE_KEY_FILENAME
    signers = signed_key_ids(run.path)
    receipts = sorted(run.receipts.glob("*.json")) if run.receipts.is_dir() else []
    if (folder / (PRIVATE_KEY_FILENAME + _NEW)).exists():
        raise SigningKeyError(
            f"a key rotation in {folder} was interrupted ({PRIVATE_KEY_FILENAME}{_NEW} "
            f"exists); finish it with `fedforget keys rotate {folder}`"
        )
    if not private_path.exists():
        if signers or receipts:
            what = (f"{sum(signers.values())} signed tree head(s) in {run.tree_heads}"
                    if signers else f"{len(receipts)} receipt(s) in {run.receipts}")
            raise SigningKeyError(
                f"{private_path} is missing, but the run has {what} signed by key(s) "
                f"{', '.join(sorted(signers)) or 'unknown'}; refusing to make a new key, "
                "which would silently replace the run's signing key. Restore the key file "
                "from a backup (or, if it is lost, rotate the run's clients to a new key "
                "with a manifest signed by the old one: impossible without it)"
            )
        generate_keys(folder)
    key = load_private_key(private_path)
    kid = key_id(key.public_key())
    if signers and kid not in signers:
        manifest = load_manifest(folder)
        listed = set() if manifest is None else {k.key_id for k in manifest.keys}
        if manifest is None or manifest.current_key_id != kid or not set(signers) <= listed:
            raise SigningKeyError(
                f"{private_path} holds key {kid}, but the run's heads were signed by "
                f"{', '.join(sorted(signers))}, and no key manifest in {folder} rotates from "
                "that key to this one: the signing key was replaced. Restore the original "
                "key, or rotate with `fedforget keys rotate`"
            )
    return key, folder / PUBLIC_KEY_FILENAME


@dataclass(frozen=True, slots=True)
class KeyRotation:
    """What :func:`rotate_keys` did."""

    old_key_id: str
    new_key_id: str
    manifest_path: Path
    manifest_version: int
    retired: tuple[Path, ...]


def _private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _finish(folder: Path, old: Ed25519PrivateKey | None) -> tuple[Path, ...]:
    """Move the rotated-out pair to retired/ and the new pair into place."""
    retired: list[Path] = []
    with guard_storage(folder, "finish the key rotation in"):
        if old is not None:
            rdir = folder / RETIRED_DIRNAME
            rdir.mkdir(exist_ok=True)
            kid = key_id(old.public_key())
            for name, suffix in ((PRIVATE_KEY_FILENAME, ".key"), (PUBLIC_KEY_FILENAME, ".pub")):
                source = folder / name
                if source.exists():
                    target = rdir / f"{kid}{suffix}"
                    os.replace(source, target)
                    retired.append(target)
            fsync_directory(rdir)
        for name in (PRIVATE_KEY_FILENAME, PUBLIC_KEY_FILENAME):
            os.replace(folder / (name + _NEW), folder / name)
        fsync_directory(folder)
    return tuple(retired)


def rotate_keys(
    keys_dir: str | os.PathLike[str], *, revoke_current: bool = False, at: str | None = None
) -> KeyRotation:
    """Make a new signing key current through the key manifest.

    The manifest is created on the first rotation (version 1: the current key, valid from
    the epoch, since it signed before the manifest existed); the new version, signed by the
    current key, adds the new key valid from ``at`` (default: now) and makes it current;
    with ``revoke_current`` the outgoing key is revoked from ``at`` (its signatures dated
    ``at`` or later are refused). The old pair moves to ``retired/``.

    Raises
    ------
    SigningKeyError
        If the directory holds no current key.
    KeyManifestError
        If the existing manifest is damaged or not rooted in the current key.
    StorageError
        If a file cannot be written; a rotation cut short is finished by the next call.
    """
    folder = Path(keys_dir)
    private_path = folder / PRIVATE_KEY_FILENAME
    if not private_path.exists():
        raise SigningKeyError(f"{private_path} does not exist: there is no key to rotate from")
    old = load_private_key(private_path)
    manifest_path = folder / MANIFEST_FILENAME
    pending = folder / (PRIVATE_KEY_FILENAME + _NEW)
    if pending.exists():
        new = load_private_key(pending)
        manifest = load_manifest_raw(manifest_path, old, new)
        if manifest is not None and manifest.current_key_id == key_id(new.public_key()):
            retired = _finish(folder, old)  # the manifest was written: finish
            return KeyRotation(key_id(old.public_key()), key_id(new.public_key()),
                               manifest_path, manifest.version, retired)
        for name in (PRIVATE_KEY_FILENAME, PUBLIC_KEY_FILENAME):  # not yet: start again
            with contextlib.suppress(FileNotFoundError):
                (folder / (name + _NEW)).unlink()
    manifest = load_manifest(folder)
    if manifest is None:
        manifest = KeyManifest.create(old, valid_from=_EPOCH)
    elif manifest.current_key_id != key_id(old.public_key()):
        raise KeyManifestError(
            f"{manifest_path}: its current key is {manifest.current_key_id}, not the key in "
            f"{private_path} ({key_id(old.public_key())})"
        )
    when = at
    if when is not None:
        parse_utc(when, "--at", KeyManifestError)
    new = Ed25519PrivateKey.generate()
    rotated = manifest.rotate(old, new.public_key(), at=when, revoke_current=revoke_current)
    write_new(folder / (PRIVATE_KEY_FILENAME + _NEW), _private_pem(new), mode=0o600)
    write_new(folder / (PUBLIC_KEY_FILENAME + _NEW), public_key_pem(new.public_key()))
    write_atomic(manifest_path, rotated.to_json(), fsync=True)
    retired = _finish(folder, old)
    return KeyRotation(key_id(old.public_key()), key_id(new.public_key()), manifest_path,
                       rotated.version, retired)


def load_manifest_raw(path: Path, old: Ed25519PrivateKey, new: Ed25519PrivateKey
                      ) -> KeyManifest | None:
    """The manifest at ``path`` verified against ``new`` or ``old`` (mid-rotation, either
    may be the one it is rooted in), or None."""
    if not path.exists():
        return None
    data = path.read_bytes()
    for key in (new, old):
        with contextlib.suppress(KeyManifestError):
            return KeyManifest.from_json(data, trusted_key=key.public_key())
    return None


def revoke_key(keys_dir: str | os.PathLike[str], revoked_key_id: str, *, at: str) -> KeyManifest:
    """Revoke ``revoked_key_id`` from ``at`` in a new manifest version signed by the current
    key (``at`` may lie in the past: revoke from before a suspected compromise).

    Raises
    ------
    KeyManifestError
        If there is no manifest yet (rotate first: the current key cannot be revoked), the
        key is unknown, already revoked, or the current key.
    """
    folder = Path(keys_dir)
    manifest = load_manifest(folder)
    if manifest is None:
        raise KeyManifestError(
            f"{folder / MANIFEST_FILENAME} does not exist: only a key rotated out can be "
            "revoked; rotate first (`fedforget keys rotate --revoke-current` revokes the "
            "outgoing key)"
        )
    current = load_private_key(folder / PRIVATE_KEY_FILENAME)
    revised = manifest.revoke(current, revoked_key_id, at=at)
    write_atomic(folder / MANIFEST_FILENAME, revised.to_json(), fsync=True)
    return revised
