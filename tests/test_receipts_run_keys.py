"""A run's signing key is never silently replaced; rotation and revocation go through the
key manifest, with a CLI; receipt verification follows the manifest."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
from trust_helpers import built_run, copy_run

from fedforget.receipts import KeyManifest, load_public_key
from fedforget.receipts.cli import add_subcommands, dispatch
from fedforget.receipts.errors import KeyManifestError, SigningKeyError
from fedforget.receipts.keys import key_id, load_private_key
from fedforget.receipts.run_keys import (
    load_manifest,
    revoke_key,
    rotate_keys,
    run_signing_key,
)


def cli(argv: list[str]) -> int | None:
    parser = argparse.ArgumentParser(prog="fedforget")
    sub = parser.add_subparsers(dest="command", required=True)
    add_subcommands(sub)
    return dispatch(parser.parse_args(argv))


@pytest.fixture
def run(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    return copy_run(built_run(tmp_path_factory), tmp_path / "run")


def test_a_new_run_gets_a_key(tmp_path: Path) -> None:
    key, pub = run_signing_key(tmp_path / "fresh")
    assert key_id(load_public_key(pub)) == key_id(key.public_key())


def test_a_deleted_key_of_a_run_that_signed_is_an_error(run: Path) -> None:
    shutil.rmtree(run / "keys")
    with pytest.raises(SigningKeyError) as info:
        run_signing_key(run)
    message = str(info.value)
    assert "keys/signing.key is missing, but the run has 6 signed tree head(s)" in message
    assert "refusing to make a new key" in message
    assert not (run / "keys").exists()  # nothing was generated


def test_a_replaced_key_is_an_error(run: Path) -> None:
    shutil.rmtree(run / "keys")
    cli(["keys", "generate", str(run / "keys")])
    with pytest.raises(SigningKeyError, match=r"but the run's heads were signed by [0-9a-f]{64}, "
                       r"and no key manifest .* the signing key was replaced"):
        run_signing_key(run)


def test_rotation_through_the_manifest(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = run / "keys"
    old = load_private_key(keys / "signing.key")
    old_pub = keys / "old.pub"
    shutil.copyfile(keys / "signing.pub", old_pub)
    assert cli(["keys", "rotate", str(keys)]) == 0
    out = capsys.readouterr().out
    new = load_private_key(keys / "signing.key")
    assert key_id(new.public_key()) != key_id(old.public_key())
    assert f"(was {key_id(old.public_key())})" in out and "version 2" in out
    assert (keys / "retired" / f"{key_id(old.public_key())}.key").exists()
    # A verifier that enrolled with the old key follows the manifest to the new one.
    manifest = KeyManifest.from_json((keys / "manifest.json").read_bytes(),
                                     trusted_key=load_public_key(old_pub))
    assert manifest.current_key_id == key_id(new.public_key())
    key, _ = run_signing_key(run)  # the run accepts the rotated key
    assert key_id(key.public_key()) == key_id(new.public_key())
    # The receipt signed by the old key still verifies through the manifest.
    receipt = next((run / "receipts").glob("*.json"))
    assert cli(["receipt", "verify", str(receipt), "--key", str(old_pub), "--manifest",
                str(keys / "manifest.json")]) == 0
    assert "checked: signature, predicate, key validity" in capsys.readouterr().out


def test_revocation_refuses_what_the_key_signed_afterwards(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = run / "keys"
    old = key_id(load_private_key(keys / "signing.key").public_key())
    receipt = next((run / "receipts").glob("*.json"))
    old_pub = keys / "old.pub"
    shutil.copyfile(keys / "signing.pub", old_pub)
    rotate_keys(keys)
    # Revoked from 2000: everything it signed claims a later time and is refused.
    assert cli(["keys", "revoke", str(keys), "--key-id", old, "--at",
                "2000-01-01T00:00:00Z"]) == 0
    assert load_manifest(keys).key(old).revoked_at == "2000-01-01T00:00:00Z"  # type: ignore[union-attr]
    capsys.readouterr()
    assert cli(["receipt", "verify", str(receipt), "--key", str(old_pub), "--manifest",
                str(keys / "manifest.json")]) == 1
    assert f"but key {old} was revoked at 2000-01-01T00:00:00Z" in capsys.readouterr().err


def test_the_current_key_cannot_be_revoked_without_a_rotation(run: Path) -> None:
    keys = run / "keys"
    kid = key_id(load_private_key(keys / "signing.key").public_key())
    with pytest.raises(KeyManifestError, match="only a key rotated out can be revoked"):
        revoke_key(keys, kid, at="2000-01-01T00:00:00Z")


def test_an_interrupted_rotation_is_finished_by_the_next(run: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    keys = run / "keys"
    import fedforget.receipts.run_keys as run_keys

    def crash(*args: object, **kwargs: object) -> tuple[Path, ...]:
        raise KeyboardInterrupt  # killed after the manifest, before the keys moved

    monkeypatch.setattr(run_keys, "_finish", crash)
    with pytest.raises(KeyboardInterrupt):
        rotate_keys(keys)
    monkeypatch.undo()
    with pytest.raises(SigningKeyError, match="a key rotation .* was interrupted"):
        run_signing_key(run)
    done = rotate_keys(keys)  # finishes the same rotation
    assert done.manifest_version == 2
    run_signing_key(run)


def test_keys_generate_where_no_directory_can_be_made(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("not a directory")
    assert cli(["keys", "generate", str(tmp_path / "file" / "keys")]) == 1
    err = capsys.readouterr().err
    assert "cannot create the key directory" in err and "not a directory" in err


def test_a_flipped_public_key_is_a_clear_error(run: Path, capsys: pytest.CaptureFixture[str]
                                               ) -> None:
    pub = run / "keys" / "signing.pub"
    data = bytearray(pub.read_bytes())
    data[30] ^= 0x04
    pub.write_bytes(bytes(data))
    receipt = next((run / "receipts").glob("*.json"))
    code = cli(["receipt", "verify", str(receipt), "--key", str(pub)])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"FAILED key: {pub} is not a PEM public key: ")


def test_a_manifest_not_rooted_in_the_key_is_refused(run: Path) -> None:
    keys = run / "keys"
    rotate_keys(keys)
    shutil.copyfile(keys / "retired" / next(p.name for p in (keys / "retired").glob("*.pub")),
                    keys / "signing.pub")  # signing.pub no longer the manifest's current key
    manifest = load_manifest(keys)  # still rooted: the old key is version 1's current key
    assert manifest is not None and manifest.version == 2
    other = copy_run(run, run.parent / "other")
    shutil.rmtree(other / "keys")
    cli(["keys", "generate", str(other / "keys")])
    shutil.copyfile(keys / "manifest.json", other / "keys" / "manifest.json")
    with pytest.raises(KeyManifestError, match="not the current key of any version"):
        load_manifest(other / "keys")
