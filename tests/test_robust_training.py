"""Poisoned replies through the recording strategy: each refused or clipped as configured,
the round goes on without it, accuracy stays near the clean run's; a robust Flower strategy
(FedMedian) through the same wrapper, with rollback still bit-identical to retrain."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from conftest import run_config_for, small_config, train_small
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp

from fedforget.arrays import load_tensors
from fedforget.engine import run_unlearning
from fedforget.engine.apps import find_project
from fedforget.engine.inprocess import run_inprocess
from fedforget.errors import RoundFailedError
from fedforget.history import HistoryStore
from fedforget.task import load_test_set, new_model
from fedforget.tensors import decode, tensors_digest
from fedforget.training import evaluate

ATTACKER = "client-003"
ROUNDS = 6


def _attacked_app(attack: str) -> ClientApp:
    """fedforget's ClientApp, except that client-003 poisons every train reply."""
    _, honest = find_project().load()
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = honest(msg, context)
        if context.node_config["partition-id"] != 3 or "arrays" not in msg.content:
            return reply
        sent = msg.content["arrays"]
        arrays = reply.content["arrays"]
        for key in list(arrays):
            local = arrays[key].numpy().astype(np.float32)
            if attack == "scale":  # the honest update times 1e6
                local = sent[key].numpy() + 1e6 * (local - sent[key].numpy())
            elif attack == "huge":  # every value 3e38
                local = np.full_like(local, 3e38)
            arrays[key] = Array(local.astype(np.float32))
        metrics = reply.content["metrics"]
        if attack == "count":
            metrics["num-examples"] = 10**9
        if attack == "overflow":
            metrics["num-examples"] = 1e300
        return reply

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return honest(msg, context)

    return app


def _accuracy(out: Path) -> float:
    cfg = small_config(**{"num-rounds": ROUNDS})
    with HistoryStore.open(out) as store:
        model = store.global_model(store.last_round)
    return evaluate(load_tensors(new_model(cfg), model), load_test_set(cfg)).accuracy


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> float:
    out = tmp_path_factory.mktemp("clean") / "run"
    train_small(out, **{"num-rounds": ROUNDS})
    return _accuracy(out)


@pytest.mark.parametrize(("attack", "settings", "outcome"), [
    ("scale", {"max-update-norm": 5.0}, "refused"),
    ("scale", {"max-update-norm": 5.0, "update-norm-policy": "clip"}, "clipped"),
    ("huge", {"max-update-norm": 5.0}, "refused"),
    ("count", {"max-examples-factor": 1.0}, "refused"),
    ("count", {"max-examples-factor": 1.0, "num-examples-policy": "cap"}, "capped"),
    ("overflow", {"max-examples-factor": 1.0}, "refused"),
])
def test_a_poisoned_reply_is_screened_and_training_goes_on(
        tmp_path: Path, clean: float, attack: str, settings: dict[str, object],
        outcome: str) -> None:
    # Prepare / Execute
    out = tmp_path / "run"
    server, _ = find_project().load()
    cfg = small_config(**{"num-rounds": ROUNDS, **settings})
    run_inprocess(server, _attacked_app(attack), num_nodes=4,
                  run_config=run_config_for(cfg, out))
    # Assert: every round committed; the attacker refused (with the reason) or aggregated
    # clipped / capped; the model stays near the clean run's
    with HistoryStore.open(out) as store:
        assert store.last_round == ROUNDS
        for record in store.rounds():
            refused = {r.client_id: r.reason for r in record.refused}
            joined = {p.client_id: p for p in record.participants}
            if outcome == "refused":
                assert ATTACKER in refused and ATTACKER not in joined
                assert ("exceeds" in refused[ATTACKER] or "NaN" in refused[ATTACKER]
                        or "refused" in refused[ATTACKER])
            else:
                assert ATTACKER in joined
                p = joined[ATTACKER]
                if outcome == "clipped":
                    assert p.metrics["fedforget-update-norm"] > 5.0  # before clipping
                    update = store.client_update(record.round, ATTACKER)
                    norm = float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64)))
                                             for v in update.values())))
                    assert norm <= 5.0
                else:  # capped at its recorded size
                    assert p.num_examples < 10**9
                    assert p.metrics["fedforget-reported-examples"] == 1e9
    assert abs(_accuracy(out) - clean) <= 0.02


def test_the_robust_strategy_keeps_rollback_exact(tmp_path: Path) -> None:
    # Prepare: FedMedian through the recording wrapper
    out = tmp_path / "run"
    train_small(out, strategy="fedmedian")
    # Execute
    outcome = run_unlearning(out, client="client-001", method="rollback", progress=False)
    # Assert: the model file equals the retrained reference's, digest computed here
    assert outcome is not None
    key = hashlib.sha256(b"client-001").hexdigest()[:12]
    reference = out / "unlearned" / f"reference-{key}" / "model.fft"
    rolled = out / outcome.model_path
    assert tensors_digest(decode(rolled.read_bytes())) == tensors_digest(
        decode(reference.read_bytes()))


@pytest.mark.parametrize("attack", ["scale", "count"])
def test_without_a_policy_the_same_attack_does_harm(tmp_path: Path, clean: float,
                                                    attack: str) -> None:
    # The attacks above are real: unscreened, they take the model far from the clean run
    # (the scaled update makes every client's next reply NaN, so a later round fails).
    out = tmp_path / "run"
    server, _ = find_project().load()
    try:
        run_inprocess(server, _attacked_app(attack), num_nodes=4,
                      run_config=run_config_for(small_config(**{"num-rounds": ROUNDS}), out))
    except RoundFailedError as exc:
        assert "NaN/Inf" in str(exc)
        return
    assert clean - _accuracy(out) > 0.02
