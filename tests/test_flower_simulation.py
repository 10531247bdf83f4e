"""The same ServerApp/ClientApp under Flower's simulation engine (`flwr run`, Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import small_config, train_small

from fedforget.engine import run_training
from fedforget.history import HistoryStore, verify_store

# Clients aggregate in client-id order and train single-threaded with the same seeds, so
# the engines should agree to the last bit; the stated tolerance allows only float noise.
TOLERANCE = 1e-6


@pytest.mark.flower
@pytest.mark.slow
def test_flwr_run_gives_the_in_process_model_within_tolerance(tmp_path: Path) -> None:
    # Prepare / Execute
    overrides = {"num-clients": 3, "num-rounds": 3}
    run_training(small_config(**overrides), out=tmp_path / "sim", engine="simulation",
                 progress=False)
    train_small(tmp_path / "inproc", **overrides)
    # Assert
    assert verify_store(tmp_path / "sim").ok
    with HistoryStore.open(tmp_path / "sim") as sim, HistoryStore.open(tmp_path / "inproc") as ref:
        assert sim.last_round == ref.last_round == 3
        assert sim.clients() == ref.clients()
        a, b = sim.global_model(3), ref.global_model(3)
        assert list(a) == list(b)
        worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert worst <= TOLERANCE


@pytest.mark.flower
@pytest.mark.slow
def test_rollback_equals_retrain_bit_for_bit_under_flwr_run(tmp_path: Path) -> None:
    from fedforget.engine import run_unlearning
    from fedforget.tensors import decode, tensors_digest

    # Prepare: a history trained in-process; unlearning runs under Flower's simulation.
    run = tmp_path / "run"
    train_small(run, **{"num-clients": 3, "num-rounds": 3})
    # Execute
    info = run_unlearning(run, client="client-001", method="rollback", engine="simulation",
                          progress=False)
    # Assert: the digests of the two model files, computed here.
    assert info is not None
    rolled = tensors_digest(decode((run / info.model_path).read_bytes()))
    assert info.engine == "simulation"
    reference = next((run / "unlearned").glob("reference-*")) / "model.fft"
    assert rolled == tensors_digest(decode(reference.read_bytes()))
