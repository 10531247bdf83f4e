"""The client protocol of fedforget: what travels between the server and each ClientApp.

fedforget's client mod (:func:`fedforget.clients.mod.unlearning_mod`) speaks it for any
ClientApp; an app that does not use the mod speaks it itself:

1. **Identify.** At the start of each run the server sends every node a Flower *train*
   message (the one handler every ClientApp has, so that a client mod sees it: Flower
   applies an app's mods only around the handlers it registered) whose ``ConfigRecord``
   ``"config"`` has :data:`TASK` = :data:`IDENTIFY` and which carries no arrays. The client
   answers without training: a ``ConfigRecord`` under :data:`CLIENT_RECORD`
   (``"fedforget"``) holding :data:`CLIENT_ID` (``"client-id"``), its stable,
   pseudonymous id. That id comes from the node config ``client-id`` if the operator set
   one, else from ``partition-id`` as ``client-%03d``. Flower's node ids are random per
   run and never used as identity.
2. **Tag every reply.** Every train and evaluate reply carries the same ``ConfigRecord``
   (``"fedforget"`` → ``{"client-id": ...}``); a train reply without it, or with another
   client's id, is refused.
3. **Seed local training.** Each train message's config has :data:`SEED`
   (``fedforget.seed``), this client's seed for this round; the client seeds everything
   its training draws from (``random``, ``numpy``, ``torch``: data order, dropout) with it,
   so that a replay of the round gives the same update — which is what makes ``rollback``
   and ``retrain`` exact.
4. **Epochs asked by a method.** A method may ask for other local epochs than the app's
   (FedEraser's calibration trains r·E): the config then has :data:`LOCAL_EPOCHS` and
   :data:`LOCAL_EPOCHS_KEY` (the name of the app's own setting, e.g. ``local-epochs``);
   the client trains that many epochs.
5. **Keep the tree head.** Train messages carry the latest signed tree head under
   :data:`TREE_HEAD` (canonical JSON); the client keeps the largest one it has seen as
   ``head.json`` in its state directory (node config ``state-dir``; in simulation
   ``<fedforget.out-dir>/client-state/<client-id>``), so that it can later check that an
   erasure receipt extends the history it saw.
6. **A client asks to leave.** A client whose operator ran ``fedforget client withdraw``
   adds to every reply's ``"fedforget"`` record :data:`WITHDRAW` (the reason),
   :data:`WITHDRAW_ASKED_AT` and :data:`HEAD` (the tree head it kept), until it holds its
   receipt. The server records the request bound to that node and stops selecting the
   client from the next round on.
7. **Receipt delivery.** The server sends the client a train message whose config has
   :data:`TASK` = :data:`DELIVER` and :data:`RECEIPT` (the DSSE envelope), :data:`SALT` (hex),
   :data:`PUBLIC_KEY` (PEM), :data:`RECEIPT_ID` and :data:`REQUEST_ID`; the client stores
   them in its state directory (``receipts/<id>.json``, ``receipts/<id>.salt``,
   ``server.pub``) and answers :data:`DELIVERED` = the receipt id.
8. **Forgotten labels.** Once a class-level erasure is in force, every train message's
   config has :data:`FORGET_LABELS` (``"3"`` or ``"3,5"``); the client trains without the
   examples of those labels (:mod:`fedforget.erasure`).
9. **Forgotten records.** A client that asked to have some of its records forgotten keeps
   their ids in ``forgotten-records.json`` of its state directory and trains without them
   (:mod:`fedforget.erasure`); the server sends nothing for them.
10. **Packed arrays (deployments).** The identify reply has :data:`PACKING` = ``True`` when
   the client can unpack arrays packed by :mod:`fedforget.transport`; a deployment's server
   then sends its ``ArrayRecord`` s packed (one ``ConfigRecord`` ``"fedforget.packed:<key>"``
   each), and the client unpacks them before its handler runs and packs the reply's.
"""

from __future__ import annotations

from dataclasses import dataclass

IDENTIFY = "identify"
"""Value of :data:`TASK` in the identify message."""

CLIENT_RECORD = "fedforget"
"""Key of the ``ConfigRecord`` that carries the client's stable id in every reply."""

CLIENT_ID = "client-id"
"""The stable id's key inside :data:`CLIENT_RECORD` (and the node-config key that sets it)."""

PACKING = "packing"
"""Key of the identify reply's ``CLIENT_RECORD``: True if the client unpacks packed arrays."""

NUM_EXAMPLES = "num-examples"
"""(In :data:`CLIENT_RECORD` of the identify reply, optional) the client's training data size,
against which a robust policy caps the example counts it reports later."""

WANT_NUM_EXAMPLES = "fedforget.want-num-examples"
"""Identify-config key, True when the server will cap reported example counts (a robust
policy with ``max-examples-factor``) and so wants :data:`NUM_EXAMPLES`; a client computes its
data size only then (at 1,000 clients, sizing every client's data at every identify took
about a third of the identification)."""

SEED = "fedforget.seed"
"""Train-config key of the client's training seed for the round."""

TREE_HEAD = "fedforget.tree-head"
"""Train-config key of the latest signed tree head."""

LOCAL_EPOCHS = "fedforget.local-epochs"
"""Train-config key of the local epochs a method asks for (when it differs from the app's)."""

LOCAL_EPOCHS_KEY = "fedforget.local-epochs-key"
"""Train-config key naming the app's own local-epochs setting that :data:`LOCAL_EPOCHS`
overrides for this message."""

TASK = "fedforget.task"
"""Train-config key naming a procedure other than training: :data:`IDENTIFY`, or a
client-side step of a method (e.g. ``pga``)."""

FORGET_LABELS = "fedforget.forget-labels"
"""Train-config key of the labels forgotten across the federation (class-level erasure)."""

CONFIG_RECORD = "config"
"""Key of the ``ConfigRecord`` of a train message (as Flower's strategies name it)."""

UNRECORDED_CONFIG = (SEED, TREE_HEAD)
"""Train-config keys that are not part of a round record's ``config`` (the seed is recorded
per participant; the tree head is a copy of what the server signed)."""


def default_client_id(partition_id: int) -> str:
    """The stable id of the client of partition ``partition_id``: ``client-%03d``."""
    return f"client-{int(partition_id):03d}"


# --------------------------------------------------------------- client-asked withdrawal
WITHDRAW = "withdraw"
"""Key (in :data:`CLIENT_RECORD` of a reply) of the reason of a client's own withdrawal."""

WITHDRAW_ASKED_AT = "withdraw-asked-at"
"""When the client's operator asked (RFC 3339 UTC)."""

HEAD = "head"
"""The tree head the client kept (canonical JSON), sent with its withdrawal."""

DELIVER = "deliver-receipt"
"""Value of :data:`TASK` in a receipt-delivery message."""

RECEIPT = "fedforget.receipt"
SALT = "fedforget.salt"
PUBLIC_KEY = "fedforget.public-key"
RECEIPT_ID = "fedforget.receipt-id"
REQUEST_ID = "fedforget.request-id"

RECORDS_SALT = "fedforget.records-salt"
RECORDS = "fedforget.records"
"""With a record-level receipt: the salt of its record commitment and the ids it covers
(one per line), stored as ``receipts/<id>.records-salt`` and ``receipts/<id>.records``."""

DELIVERED = "delivered"
"""Key (in :data:`CLIENT_RECORD` of the delivery reply) of the receipt id stored."""


@dataclass(frozen=True)
class WithdrawalAsk:
    """A client's own withdrawal request, as its reply carried it."""

    client_id: str
    node_id: int
    reason: str
    asked_at: str
    head: str | None  # the tree head it kept (canonical JSON), if any


def read_ask(record: object, client_id: str, node_id: int) -> WithdrawalAsk | None:
    """The withdrawal request in a reply's :data:`CLIENT_RECORD`, if it carries one."""
    get = getattr(record, "get", None)
    if get is None or get(WITHDRAW) is None:
        return None
    head = get(HEAD)
    return WithdrawalAsk(client_id=client_id, node_id=node_id, reason=str(get(WITHDRAW)),
                         asked_at=str(get(WITHDRAW_ASKED_AT) or ""),
                         head=head if isinstance(head, str) and head else None)
