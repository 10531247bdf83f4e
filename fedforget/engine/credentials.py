"""Certificates and node keys for a Flower deployment, made with ``cryptography``.

* :func:`make_tls_files` — a certificate authority (CA) and a SuperLink server certificate
  signed by it. The SuperLink serves TLS with ``--ssl-ca-certfile ca.pem --ssl-certfile
  superlink.pem --ssl-keyfile superlink.key``; SuperNodes and the ``flwr`` CLI trust
  ``ca.pem`` (``--root-certificates`` / ``root-certificates`` in ``config.toml``).
* :func:`make_node_key` — a SuperNode's authentication key pair: EC P-384, both halves in
  OpenSSH format, which is what ``flower-supernode --auth-supernode-private-key`` reads and
  ``flwr supernode register`` takes (the public half).

These are for loopback tests and first trials. A production CA keeps its key offline; the
server certificate must name the address the nodes dial (``hosts``).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedforget.errors import ConfigError

__all__ = ["NodeKey", "TlsFiles", "main", "make_node_key", "make_tls_files"]


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of a SuperLink's TLS: the CA certificate, the server pair."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    def superlink_args(self) -> list[str]:
        """``flower-superlink`` flags that serve TLS with these files."""
        return ["--ssl-ca-certfile", str(self.ca_cert), "--ssl-certfile",
                str(self.server_cert), "--ssl-keyfile", str(self.server_key)]


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's authentication key pair (EC P-384, OpenSSH format)."""

    private_key: Path
    public_key: Path


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only (created 0600, never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _subject_alternative_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_tls_files(
    directory: str | os.PathLike[str],
    *,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    valid_days: int = 30,
) -> TlsFiles:
    """Make a CA and a SuperLink certificate for ``hosts`` in ``directory``.

    Parameters
    ----------
    directory : path
        Where ``ca.pem``, ``ca.key``, ``superlink.pem`` and ``superlink.key`` are written
        (keys 0600).
    hosts : sequence of str
        The IP addresses and DNS names the SuperLink is reached at (subject alternative
        names of its certificate; TLS clients check them).
    valid_days : int
        Validity of both certificates, from now.

    Returns
    -------
    TlsFiles
        The CA certificate and the server certificate and key.
    """
    if not hosts:
        raise ConfigError("hosts = (): expected at least one address or name of the SuperLink")
    if valid_days < 1:
        raise ConfigError(f"valid_days = {valid_days}: expected at least 1")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)  # clock skew
    until = now + datetime.timedelta(days=valid_days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("fedforget test CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0])).issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_subject_alternative_names(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    files = TlsFiles(ca_cert=out / "ca.pem", server_cert=out / "superlink.pem",
                     server_key=out / "superlink.key")
    pem = serialization.Encoding.PEM
    files.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    _write_private(out / "ca.key", ca_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    files.server_cert.write_bytes(server_cert.public_bytes(pem))
    _write_private(files.server_key, server_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return files


def make_node_key(directory: str | os.PathLike[str], name: str) -> NodeKey:
    """Make a SuperNode key pair ``<name>`` (private, 0600) and ``<name>.pub`` in
    ``directory``: EC P-384 in OpenSSH format."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"key name {name!r}: expected a plain file name such as 'node-0'")
    out = Path(directory)
    key = ec.generate_private_key(ec.SECP384R1())
    pair = NodeKey(private_key=out / name, public_key=out / f"{name}.pub")
    _write_private(pair.private_key, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    pair.public_key.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return pair


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m fedforget.engine.credentials tls DIR --host H ...`` or
    ``... node-key DIR NAME``: make a CA and SuperLink certificate, or a node key pair."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fedforget.engine.credentials",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    tls = sub.add_parser("tls", help="a CA and a SuperLink certificate signed by it")
    tls.add_argument("dir", help="where ca.pem, ca.key, superlink.pem, superlink.key go")
    tls.add_argument("--host", action="append", required=True,
                     help="an address or DNS name the SuperLink is reached at (repeatable)")
    tls.add_argument("--days", type=int, default=30, help="validity (default 30 days)")
    key = sub.add_parser("node-key", help="a SuperNode's EC P-384 key pair, OpenSSH format")
    key.add_argument("dir", help="where NAME (private, 0600) and NAME.pub go")
    key.add_argument("name", help="the key's file name, e.g. node-0")
    args = parser.parse_args(argv)
    if args.what == "tls":
        files = make_tls_files(args.dir, hosts=args.host, valid_days=args.days)
        print(f"{files.ca_cert}\n{files.server_cert}\n{files.server_key}")
    else:
        pair = make_node_key(args.dir, args.name)
        print(f"{pair.private_key}\n{pair.public_key}")


if __name__ == "__main__":
    main()
