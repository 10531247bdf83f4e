"""Receipts handed to the clients they are about.

An erasure receipt names its client only by a salted commitment; the client needs the salt
(and the receipt, and the server's public key) to check it. The server keeps the salt in the
request's outbox (``withdrawals/<request>/outbox/<receipt-id>.salt``) until the client has it:
:func:`deliver_receipts` sends every waiting receipt to its client when the client is
connected (right after an unlearning, and at the start of every later run, so a client that
was away gets it at its next contact), through the client protocol's delivery message
(:mod:`fedforget.protocol`); the client stores them in its own state directory, and once it
confirms, the server deletes its copy of the salt.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedforget import protocol
from fedforget.federation import GridFederation
from fedforget.rundir import RunDirectory
from fedforget.withdrawal import WithdrawalLedger

log = logging.getLogger("fedforget.server")

__all__ = ["deliver_receipts", "waiting_receipts"]


def waiting_receipts(run: RunDirectory) -> list[tuple[str, str, Path]]:
    """``(request id, receipt id, salt file)`` of every receipt not yet delivered."""
    out = []
    for outbox in run.outboxes():
        for salt in sorted(outbox.glob("*.salt")):
            out.append((outbox.parent.name, salt.stem, salt))
    return out


def deliver_receipts(run: RunDirectory, federation: GridFederation, public_key: Path,
                     *, only: str | None = None) -> list[str]:
    """Deliver every waiting receipt (of request ``only``, if given) whose client is
    connected; return the receipt ids the clients confirmed."""
    waiting = [w for w in waiting_receipts(run) if only is None or w[0] == only]
    if not waiting:
        return []
    delivered = []
    with WithdrawalLedger(run.path) as ledger:
        for request_id, receipt_id, salt in waiting:
            client = ledger.get(request_id).client_id
            receipt = run.receipt(receipt_id)
            if client not in federation.clients or not receipt.exists():
                continue
            config = {
                protocol.TASK: protocol.DELIVER,
                protocol.RECEIPT: receipt.read_text(),
                protocol.SALT: salt.read_text().strip(),
                protocol.PUBLIC_KEY: public_key.read_text(),
                protocol.RECEIPT_ID: receipt_id,
                protocol.REQUEST_ID: request_id,
            }
            extra = [salt.with_suffix(".records-salt"), salt.with_suffix(".records")]
            if extra[0].exists():
                config[protocol.RECORDS_SALT] = extra[0].read_text().strip()
                config[protocol.RECORDS] = extra[1].read_text()
            reply = federation.send_config(client, config)
            if reply is not None and reply.get(protocol.DELIVERED) == receipt_id:
                salt.unlink()
                for path in extra:
                    path.unlink(missing_ok=True)
                delivered.append(receipt_id)
                log.info("receipt %s delivered to %s", receipt_id, client)
            else:
                log.warning("receipt %s: %s did not confirm its delivery; it stays in %s",
                            receipt_id, client, salt.parent)
    return delivered
