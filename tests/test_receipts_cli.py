"""Tests of fedforget.receipts.cli through its dispatch function."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from fedforget.receipts import (
    KeyManifest,
    ReceiptInput,
    build_receipt,
    commit_history,
    load_private_key,
    tree_head_for,
    write_receipt,
)
from fedforget.receipts.cli import add_subcommands, dispatch
from fedforget.tensors import encode, sha256_digest

RECORDS = [b'{"round":%d}' % t for t in range(1, 6)]
SALT = bytes(range(32))


def run(argv: list[str]) -> int | None:
    parser = argparse.ArgumentParser(prog="fedforget")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train")
    add_subcommands(sub)
    return dispatch(parser.parse_args(argv))


@pytest.fixture
def issued(tmp_path: Path) -> dict[str, Path]:
    """Keys, a saved head, a model file and its receipt, written as a server would."""
    assert run(["keys", "generate", str(tmp_path / "keys")]) == 0
    key = load_private_key(tmp_path / "keys" / "signing.key")
    head = tree_head_for(RECORDS[:2], key, timestamp="2025-01-02T00:00:00Z")
    (tmp_path / "head.json").write_bytes(head.to_json())
    model = encode({"w": np.ones((2, 2), np.float32)})
    (tmp_path / "model.fft").write_bytes(model)
    inputs = ReceiptInput(
        receipt_id="r-1",
        issuer="test",
        request_id="req-1",
        received_at="2025-01-06T00:00:00Z",
        reason="",
        client_id="client-001",
        client_salt=SALT,
        rounds_affected=[1, 2],
        history=commit_history(RECORDS, saved_head=head),
        method="retrain",
        method_version="1",
        unlearned_model_digest=sha256_digest(model),
        original_model_digest=sha256_digest(b"original"),
        issued_at="2025-01-07T00:00:00Z",
    )
    write_receipt(tmp_path / "receipt.json", build_receipt(inputs, key))
    (tmp_path / "manifest.json").write_bytes(
        KeyManifest.create(key, valid_from="2025-01-01T00:00:00Z").to_json()
    )
    return {
        "dir": tmp_path,
        "receipt": tmp_path / "receipt.json",
        "key": tmp_path / "keys" / "signing.pub",
        "head": tmp_path / "head.json",
        "model": tmp_path / "model.fft",
        "manifest": tmp_path / "manifest.json",
    }


def test_other_commands_are_not_ours() -> None:
    assert run(["train"]) is None


def test_keys_generate_prints_the_key_id_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["keys", "generate", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("key id ") and out.rstrip().endswith("signing.pub")
    assert run(["keys", "generate", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (
        f"FAILED key: {tmp_path / 'signing.key'} exists; refusing to overwrite a key file\n"
    )


def test_verify_passes_every_check_and_prints_one_line(
    issued: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = run([
        "receipt", "verify", str(issued["receipt"]), "--key", str(issued["key"]),
        "--model", str(issued["model"]), "--head", str(issued["head"]),
        "--salt", SALT.hex(), "--client", "client-001",
    ])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("\n") == 1
    assert out.startswith("OK receipt r-1: request req-1 ")
    assert out.rstrip().endswith(
        "checked: signature, predicate, consistency proof from size 2, model digest, client "
        "commitment"
    )


def test_verify_with_a_manifest(issued: dict[str, Path], capsys: pytest.CaptureFixture[str]
                                ) -> None:
    code = run([
        "receipt", "verify", str(issued["receipt"]), "--key", str(issued["key"]),
        "--manifest", str(issued["manifest"]),
    ])
    assert code == 0
    assert "key validity" in capsys.readouterr().out


def test_verify_fails_naming_the_check(
    issued: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    issued["model"].write_bytes(encode({"w": np.zeros((2, 2), np.float32)}))
    code = run([
        "receipt", "verify", str(issued["receipt"]), "--key", str(issued["key"]),
        "--model", str(issued["model"]),
    ])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert captured.err.startswith("FAILED subject digest: model file sha256:")

    code = run([
        "receipt", "verify", str(issued["receipt"]), "--key", str(issued["key"]),
        "--salt", SALT.hex(), "--client", "client-002",
    ])
    assert code == 1
    assert capsys.readouterr().err.startswith("FAILED client commitment: ")


def test_verify_refuses_unusable_arguments(
    issued: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    receipt, key = str(issued["receipt"]), str(issued["key"])
    assert run(["receipt", "verify", receipt, "--key", key, "--salt", "00"]) == 2
    assert capsys.readouterr().err == "receipt verify: --salt and --client go together\n"
    assert run(["receipt", "verify", receipt, "--key", key, "--salt", "zz", "--client", "c"]) == 2
    assert capsys.readouterr().err == "receipt verify: --salt 'zz' is not hex\n"
    missing = issued["dir"] / "nope.json"
    assert run(["receipt", "verify", str(missing), "--key", key]) == 2
    assert capsys.readouterr().err == (
        f"receipt verify: cannot read receipt {missing}: No such file or directory\n"
    )
