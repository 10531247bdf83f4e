"""The client side of fedforget for any Flower ClientApp, in one line.

.. code-block:: python

    from fedforget.flower import unlearning_mod

    app = ClientApp(mods=[unlearning_mod])

:func:`unlearning_mod` speaks the client protocol of :mod:`fedforget.protocol` around the
app's own handlers:

* it answers the identify message with the client's stable id (node config ``client-id``,
  else ``client-%03d`` of ``partition-id``) without calling the app;
* it unpacks the arrays a deployment's server packed (:mod:`fedforget.transport`) before
  the app's handler sees them, and packs that handler's reply the same way;
* it tags every reply with that id (a ``ConfigRecord`` ``"fedforget"``);
* before a train or evaluate handler runs it seeds ``random``, ``numpy`` and ``torch``
  with the per-client, per-round seed the server sent (and restores their state after),
  so that the app's data order and dropout are the same in a replay of the round — what
  keeps ``rollback`` and ``retrain`` exact on the app;
* when a method asks for other local epochs (FedEraser's calibration), it sets the app's
  own run-config setting named by the server (e.g. ``local-epochs``) for that one call;
* it keeps the latest signed tree head the server showed in ``head.json`` of the client's
  state directory (node config ``state-dir``; in simulation
  ``<fedforget.out-dir>/client-state/<client-id>``);
* it refuses (an error reply) the measurement of a forgotten client's own data
  (:mod:`fedforget.evaluation.on_client`) unless the node's operator consented (node
  config ``fedforget-consent=true``);
* when the client's operator asked to leave (:func:`ask_withdrawal`, the command
  ``fedforget client withdraw``), it tells the server in every reply, with the saved head,
  until the receipt arrives; it stores a delivered receipt, its salt and the server's
  public key in the state directory (``receipts/``, ``server.pub``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod
from numpy.random import BitGenerator, mtrand

from fedforget import protocol, transport
from fedforget.errors import ConfigError
from fedforget.evaluation.on_client import CONSENT_KEY, MEASURE_TASK, consents
from fedforget.fileio import write_atomic
from fedforget.rundir import CLIENT_STATE_DIR, HEAD_FILE, RunDirectory
from fedforget.settings import PREFIX

log = logging.getLogger("fedforget.clients")

__all__ = ["ask_withdrawal", "client_id_of", "state_dir_of", "unlearning_mod",
           "unlearning_mod_with", "withdrawal_status"]

NO_CONSENT = 0
"""Error code of the reply to a measurement the node's operator did not consent to
(Flower's ``ErrorCode.UNKNOWN``: Flower has no code of its own for a refusal)."""

WITHDRAWAL_FILE = "withdrawal.json"
"""The client's own withdrawal request (in its state directory)."""


def client_id_of(context: Context) -> str:
    """The stable, pseudonymous id of this client (node config ``client-id``, else
    ``client-%03d`` of ``partition-id``)."""
    explicit = context.node_config.get(protocol.CLIENT_ID)
    if explicit:
        return str(explicit)
    if "partition-id" not in context.node_config:
        raise ConfigError(
            "node config has neither 'client-id' nor 'partition-id'; expected e.g. "
            "--node-config \"partition-id=0 num-partitions=10\""
        )
    return protocol.default_client_id(int(context.node_config["partition-id"]))


def state_dir_of(context: Context) -> Path | None:
    """This client's own state directory: node config ``state-dir``, else (simulation)
    ``<fedforget.out-dir>/client-state/<client-id>``; None if neither is known."""
    explicit = context.node_config.get("state-dir")
    if explicit:
        return _state_dir(str(explicit), "", "")
    out = context.run_config.get(PREFIX + "out-dir")
    if out:
        return _state_dir("", str(out), client_id_of(context))
    return None


@lru_cache(maxsize=16384)
def _state_dir(explicit: str, out_dir: str, client_id: str) -> Path:
    """The path :func:`state_dir_of` names, built once per client (it is looked up on
    every train message)."""
    if explicit:
        return Path(explicit)
    return RunDirectory(out_dir).client_state(client_id)


def _config(msg: Message) -> ConfigRecord | None:
    record = msg.content.get(protocol.CONFIG_RECORD) if msg.has_content() else None
    return record if isinstance(record, ConfigRecord) else None


def unlearning_mod_with(data_size: Callable[[Context], int] | None = None) -> Mod:
    """The client mod, telling the server at identify how many training examples this
    client holds (``data_size(context)``), so that a robust policy can cap the counts it
    reports later (``max-examples-factor``); ``data_size`` is called only when the identify
    message asks for it (:data:`fedforget.protocol.WANT_NUM_EXAMPLES`: such a cap is on).
    ``unlearning_mod`` is this without a size."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        return _mod(msg, context, call_next, data_size)

    mod.__doc__ = unlearning_mod.__doc__
    return mod


def unlearning_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: identify, seed, keep the tree head, tag the reply (see module)."""
    return _mod(msg, context, call_next, None)


def _mod(msg: Message, context: Context, call_next: ClientAppCallable,
         data_size: Callable[[Context], int] | None) -> Message:
    packed = msg.has_content() and transport.is_packed(msg.content)
    if packed:  # the deployment Grid packed its arrays (fedforget.transport)
        msg.content = transport.unpack(msg.content)
    reply = _serve(msg, context, call_next, data_size)
    if packed and reply.has_content():
        reply.content = transport.pack(reply.content, whole=True)
    return reply


def _serve(msg: Message, context: Context, call_next: ClientAppCallable,
           data_size: Callable[[Context], int] | None) -> Message:
    conf = _config(msg)
    cid = client_id_of(context)
    task = conf.get(protocol.TASK) if conf is not None else None
    if conf is not None:
        _keep_tree_head(context, conf, cid)
    if task == protocol.IDENTIFY:
        record = _identity(context, cid)
        record[protocol.PACKING] = True  # this mod unpacks packed arrays
        if data_size is not None and conf is not None and conf.get(
                protocol.WANT_NUM_EXAMPLES) is True:
            record[protocol.NUM_EXAMPLES] = int(data_size(context))
        return Message(content=RecordDict({protocol.CLIENT_RECORD: record}), reply_to=msg)
    if task == MEASURE_TASK and not consents(context.node_config):
        return Message(Error(code=NO_CONSENT, reason=(
            f"client {cid} does not consent to figures on its own data (its node config "
            f"has no {CONSENT_KEY}=true)")), reply_to=msg)
    if task == protocol.DELIVER and conf is not None:
        record = _identity(context, cid)
        record[protocol.DELIVERED] = _store_receipt(context, cid, conf)
        return Message(content=RecordDict({protocol.CLIENT_RECORD: record}), reply_to=msg)
    seed = conf.get(protocol.SEED) if conf is not None else None
    with _seeded(seed), _epochs_override(context, conf):
        reply = call_next(msg, context)
    if reply.has_content():
        reply.content[protocol.CLIENT_RECORD] = _identity(context, cid)
    return reply


def _identity(context: Context, cid: str) -> ConfigRecord:
    """``{"client-id": ...}``, and the client's own withdrawal while it has no receipt."""
    record = ConfigRecord({protocol.CLIENT_ID: cid})
    # Every reply carries this: one stat of a path built once per client, and the state
    # directory only looked at when the client asked to leave.
    asked = _withdrawal_path(context.node_config.get("state-dir"),
                             context.run_config.get(PREFIX + "out-dir"), cid)
    if asked is None or not os.path.exists(asked):
        return record
    state = state_dir_of(context)
    ask = withdrawal_status(state) if state is not None else None
    if ask is not None and ask.get("state") == "asked":
        record[protocol.WITHDRAW] = str(ask.get("reason", ""))
        record[protocol.WITHDRAW_ASKED_AT] = str(ask.get("asked_at", ""))
        head = state / HEAD_FILE  # type: ignore[operator]
        if head.exists():
            record[protocol.HEAD] = head.read_text()
    return record


# -------------------------------------------------------------- the client asks
def ask_withdrawal(state_dir: str | os.PathLike[str], *, reason: str) -> dict[str, str]:
    """Record, in the client's own state directory, that it asks to leave and be forgotten.

    The request reaches the server at the node's next contact (every reply carries it) and
    stays until the client holds its receipt. Asking again keeps the first request.
    """
    from fedforget.history.records import utc_now

    directory = Path(state_dir)
    existing = withdrawal_status(directory)
    if existing is not None:
        return existing
    directory.mkdir(parents=True, exist_ok=True)
    ask = {"state": "asked", "reason": reason, "asked_at": utc_now()}
    write_atomic(directory / WITHDRAWAL_FILE, json.dumps(ask, indent=2, sort_keys=True))
    return ask


def withdrawal_status(state_dir: str | os.PathLike[str] | None) -> dict[str, str] | None:
    """The client's own withdrawal request, if it made one (``state``: ``asked`` until a
    receipt arrives, then ``receipted`` with ``receipt_id``)."""
    if state_dir is None:
        return None
    path = Path(state_dir) / WITHDRAWAL_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not a withdrawal request this client wrote: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a withdrawal request this client wrote")
    return {str(k): str(v) for k, v in data.items()}


def _store_receipt(context: Context, cid: str, conf: ConfigRecord) -> str:
    """Keep a delivered receipt, its salt and the server's public key; return its id."""
    state = state_dir_of(context)
    if state is None:
        raise ConfigError("a receipt was delivered but this client has no state directory "
                          "(set node config state-dir)")
    receipt_id = str(conf[protocol.RECEIPT_ID])
    receipts = state / "receipts"
    receipts.mkdir(parents=True, exist_ok=True)
    write_atomic(receipts / f"{receipt_id}.json", str(conf[protocol.RECEIPT]))
    salt = receipts / f"{receipt_id}.salt"
    write_atomic(salt, str(conf[protocol.SALT]) + "\n")
    os.chmod(salt, 0o600)
    if protocol.RECORDS_SALT in conf:  # a record-level receipt: its record commitment
        records_salt = receipts / f"{receipt_id}.records-salt"
        write_atomic(records_salt, str(conf[protocol.RECORDS_SALT]) + "\n")
        os.chmod(records_salt, 0o600)
        write_atomic(receipts / f"{receipt_id}.records", str(conf.get(protocol.RECORDS, "")))
    write_atomic(state / "server.pub", str(conf[protocol.PUBLIC_KEY]))
    ask = withdrawal_status(state) or {}
    ask.update({"state": "receipted", "receipt_id": receipt_id,
                "request_id": str(conf[protocol.REQUEST_ID])})
    write_atomic(state / WITHDRAWAL_FILE, json.dumps(ask, indent=2, sort_keys=True))
    log.info("client %s stored receipt %s", cid, receipt_id)
    return receipt_id


# ------------------------------------------------------------------------ seeding
@contextlib.contextmanager
def _seeded(seed: object) -> Iterator[None]:
    """Seed ``random``, ``numpy.random`` and torch's CPU generator with ``seed`` for the
    duration of the call, then restore their states."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        yield
        return
    py_state, np_state = random.getstate(), _numpy_state()
    torch_state = torch.get_rng_state()
    # The CPU generator alone: torch.manual_seed would also queue a seeding of every
    # accelerator backend, each formatting a stack trace when none is initialised (about a
    # millisecond per message).
    generator = torch.default_generator
    random.seed(seed)
    np.random.seed(seed % 2**32)
    generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        _restore_numpy_state(np_state)
        torch.set_rng_state(torch_state)


# numpy's global RandomState, saved and restored without get_state / set_state where that is
# exact. Those two copy the Mersenne Twister's 624 words one Python object at a time (about
# 80 us each, the largest share of seeding a message); the raw state struct that numpy
# exposes through ``bit_generator.ctypes.state_address`` (``uint32 key[624]; int pos``) is
# copied with one memmove. The legacy RandomState also caches a Gaussian (``has_gauss``,
# ``gauss``), which is reachable only through get_state / set_state; the fast path is taken
# only when that cache is known to be empty, and ``np.random.seed`` (which empties it) runs
# before the memmove puts the words back, so the state after a restore is the one
# set_state would have left: the same key, pos, has_gauss and gauss.
_MT_STATE_BYTES = 624 * 4 + 4


@dataclass(frozen=True)
class _NumpyState:
    """numpy's global state as :func:`_numpy_state` saved it: the raw MT19937 words at
    ``address`` of ``bit_generator`` (Gaussian cache empty), or the whole ``legacy`` state
    of ``np.random.get_state()``."""

    bit_generator: BitGenerator | None = None
    address: int = 0
    raw: bytes = b""
    legacy: Any = None


_known_state: tuple[BitGenerator, bytes] | None = None
"""(bit generator, raw state) as the last fast restore left them, Gaussian cache empty."""


def _numpy_state() -> _NumpyState:
    """numpy's global state: the raw MT19937 words when its Gaussian cache is empty, else
    the whole ``np.random.get_state()``.

    The cache is known to be empty without asking numpy when the words are the ones the
    last fast restore wrote: every legacy draw that fills the cache also advances the words.
    (Not seen: a ``set_state`` to the very same words with a cached Gaussian between two
    messages.)
    """
    bit_generator = mtrand.get_bit_generator()
    if type(bit_generator) is np.random.MT19937:
        address = int(bit_generator.ctypes.state_address)
        raw = ctypes.string_at(address, _MT_STATE_BYTES)
        known = _known_state
        if known is not None and known[0] is bit_generator and known[1] == raw:
            return _NumpyState(bit_generator, address, raw)
        state = np.random.get_state(legacy=True)
        if isinstance(state, tuple) and state[3] == 0 and state[4] == 0.0:
            return _NumpyState(bit_generator, address, raw)
        return _NumpyState(legacy=state)
    return _NumpyState(legacy=np.random.get_state())


def _restore_numpy_state(saved: _NumpyState) -> None:
    """Put back what :func:`_numpy_state` saved."""
    global _known_state
    if saved.bit_generator is None:
        np.random.set_state(saved.legacy)
        _known_state = None
        return
    if mtrand.get_bit_generator() is not saved.bit_generator:  # the call swapped it
        mtrand.set_bit_generator(saved.bit_generator)
    np.random.seed(0)  # empties the Gaussian cache; the words are overwritten next
    ctypes.memmove(saved.address, saved.raw, _MT_STATE_BYTES)
    _known_state = (saved.bit_generator, saved.raw)


@contextlib.contextmanager
def _epochs_override(context: Context, conf: ConfigRecord | None) -> Iterator[None]:
    """Set the app's local-epochs run-config setting to what a method asked, for one call."""
    if conf is None or protocol.LOCAL_EPOCHS not in conf:
        yield
        return
    key = conf.get(protocol.LOCAL_EPOCHS_KEY)
    epochs = conf.get(protocol.LOCAL_EPOCHS)
    if (not isinstance(key, str) or key not in context.run_config
            or isinstance(epochs, bool) or not isinstance(epochs, int)):
        yield
        return
    before = context.run_config[key]
    context.run_config[key] = epochs
    try:
        yield
    finally:
        context.run_config[key] = before


# --------------------------------------------------------------------- tree heads
def _keep_tree_head(context: Context, conf: ConfigRecord, cid: str) -> None:
    """Keep the latest signed tree head the server showed (``head.json``), so that a later
    erasure receipt can be checked to extend the history this client saw.

    The head is saved before the reply is sent, every time it grows. The first head goes
    to a new file (written to a temporary file and renamed into place); later ones
    overwrite it in place with one ``pwrite`` at offset 0 (see :func:`_save_head`).
    """
    head = conf.get(protocol.TREE_HEAD)
    if not isinstance(head, str) or not head:
        return
    path = _head_path(context.node_config.get("state-dir"),
                      context.run_config.get(PREFIX + "out-dir"), cid)
    if path is None:
        return
    size = _tree_size(head)
    data = head.encode()
    saved = _saved_heads.get(path)
    if saved is None:  # first time in this process: one read of what is saved, if any
        try:
            with open(path, "rb") as fh:
                kept = fh.read()
        except FileNotFoundError:
            pass
        else:  # the same head (a process that starts again) needs no parsing
            kept_size = size if kept == data else int(json.loads(kept).get("size", 0))
            saved = _saved_heads[path] = (kept_size, len(kept))
    if saved is not None and saved[0] >= size:
        return
    _save_head(path, data, saved_length=None if saved is None else saved[1])
    _saved_heads[path] = (size, len(data))


@lru_cache(maxsize=64)
def _tree_size(head: str) -> int:
    """The ``size`` of a signed tree head (JSON), parsed once per head: the server shows
    the same head to every client of a round."""
    return int(json.loads(head).get("size", 0))


@lru_cache(maxsize=64)
def _client_states(out_dir: str) -> str:
    """The directory of the simulated clients' state directories of the run ``out_dir``
    (:meth:`RunDirectory.client_state` without the client), with a trailing separator."""
    return os.path.join(str(RunDirectory(out_dir).path / CLIENT_STATE_DIR), "")


def _state_file(explicit_state_dir: object, out_dir: object, client_id: str,
                name: str) -> str | None:
    """``state_dir_of(context) / name`` as a string, with string joins (a ``Path`` join
    costs about ten times more, and this runs once per client per process: 10,000 times
    when a 10,000-client run is identified)."""
    if explicit_state_dir:
        return os.path.join(str(explicit_state_dir), name)
    if out_dir:
        return os.path.join(_client_states(str(out_dir)) + client_id, name)
    return None


@lru_cache(maxsize=16384)
def _withdrawal_path(explicit_state_dir: object, out_dir: object, client_id: str) -> str | None:
    """``state_dir_of(context) / WITHDRAWAL_FILE`` as a string, built once per client."""
    return _state_file(explicit_state_dir, out_dir, client_id, WITHDRAWAL_FILE)


@lru_cache(maxsize=16384)
def _head_path(explicit_state_dir: object, out_dir: object, client_id: str) -> str | None:
    """``state_dir_of(context) / "head.json"`` as a string, built once per client."""
    return _state_file(explicit_state_dir, out_dir, client_id, HEAD_FILE)


# A head is a few hundred bytes; a write of at most one page at offset 0 is never torn by
# a killed process (the kernel copies one page under the inode lock).
_PAGE = 4096


def _save_head(path: str, data: bytes, *, saved_length: int | None) -> None:
    """Replace the content of ``path`` with ``data``, atomically for readers after a crash
    of the process.

    When ``path`` holds a head no longer than ``data`` (heads only grow: their ``size``
    field does), a single ``pwrite`` at offset 0 replaces all of it: no new inode, no
    rename, which on ext4 costs a flush of the file's data per rename (``auto_da_alloc``),
    i.e. milliseconds per client per round. Otherwise (first head, a shorter head, a file
    with other links or of another length than saved) it is written to a temporary file
    that is renamed over ``path``. Neither way is fsync'ed: the head is a copy of what the
    server logs and can show again.
    """
    if saved_length is not None and saved_length <= len(data) <= _PAGE:
        try:
            fd = os.open(path, os.O_WRONLY)
        except FileNotFoundError:
            pass
        else:
            try:
                stat = os.fstat(fd)
                if (stat.st_nlink == 1 and stat.st_size == saved_length
                        and os.pwrite(fd, data, 0) == len(data)):
                    return
            finally:
                os.close(fd)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


_saved_heads: dict[str, tuple[int, int]] = {}
"""head.json path -> (tree size, file length) of the head this process saved there last."""
