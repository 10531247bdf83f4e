"""Ed25519 signing keys of the server: key ids, generation, loading.

The key id of a public key is the SHA-256 of its 32 raw bytes, in hex:

.. math:: \\mathrm{keyid} = \\mathrm{hex}(\\mathrm{SHA256}(\\mathrm{raw}(pk)))

:func:`generate_keys` writes ``signing.key`` (PKCS #8 PEM, unencrypted, mode 0600) and
``signing.pub`` (SubjectPublicKeyInfo PEM) and refuses to replace either.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedforget.fileio import storage_error
from fedforget.receipts._util import write_new_file
from fedforget.receipts.errors import SigningKeyError

__all__ = [
    "PRIVATE_KEY_FILENAME",
    "PUBLIC_KEY_FILENAME",
    "GeneratedKeys",
    "generate_keys",
    "key_id",
    "load_private_key",
    "load_public_key",
    "public_key_from_pem",
    "public_key_pem",
    "raw_public_key",
]

PRIVATE_KEY_FILENAME = "signing.key"
PUBLIC_KEY_FILENAME = "signing.pub"


def raw_public_key(public_key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of an Ed25519 public key."""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey) -> str:
    """Hex SHA-256 of the raw public key."""
    if not isinstance(public_key, Ed25519PublicKey):
        raise SigningKeyError(
            f"key is a {type(public_key).__name__}; expected an Ed25519 public key"
        )
    return hashlib.sha256(raw_public_key(public_key)).hexdigest()


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM of ``public_key``."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True, slots=True)
class GeneratedKeys:
    """What :func:`generate_keys` wrote."""

    private_key_path: Path
    public_key_path: Path
    key_id: str


def generate_keys(directory: str | os.PathLike[str]) -> GeneratedKeys:
    """Generate an Ed25519 key pair into ``directory`` (created if missing).

    Writes ``signing.key`` (PKCS #8 PEM, no encryption, mode 0600) and ``signing.pub``
    (SubjectPublicKeyInfo PEM); each file appears complete or not at all.

    Raises
    ------
    SigningKeyError
        If either file already exists (nothing is written then).
    """
    folder = Path(directory)
    private_path = folder / PRIVATE_KEY_FILENAME
    public_path = folder / PUBLIC_KEY_FILENAME
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise SigningKeyError(f"{path} exists; refusing to overwrite a key file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SigningKeyError(
            f"cannot create the key directory {folder}: {storage_error(exc, folder, 'create')}"
        ) from exc
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        write_new_file(private_path, private_pem, mode=0o600)
    except FileExistsError:
        raise SigningKeyError(f"{private_path} exists; refusing to overwrite a key file") from None
    try:
        write_new_file(public_path, public_key_pem(private_key.public_key()), mode=0o644)
    except FileExistsError:
        private_path.unlink()
        raise SigningKeyError(f"{public_path} exists; refusing to overwrite a key file") from None
    except BaseException:
        private_path.unlink(missing_ok=True)  # nothing half-written: no key without its pub
        raise
    return GeneratedKeys(private_path, public_path, key_id(private_key.public_key()))


def _read(path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read key file {path}: {exc.strerror or exc}") from exc


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load an unencrypted PKCS #8 PEM Ed25519 private key.

    Raises
    ------
    SigningKeyError
        If the file cannot be read or holds something else.
    """
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SigningKeyError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} holds a {type(key).__name__}; expected an Ed25519 key")
    return key


def public_key_from_pem(data: bytes, what: str = "public key") -> Ed25519PublicKey:
    """Parse a SubjectPublicKeyInfo PEM Ed25519 public key.

    Raises
    ------
    SigningKeyError
        If ``data`` is not such a key.
    """
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SigningKeyError(f"{what} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{what} holds a {type(key).__name__}; expected an Ed25519 key")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load a SubjectPublicKeyInfo PEM Ed25519 public key from ``path``."""
    return public_key_from_pem(_read(path), str(path))
