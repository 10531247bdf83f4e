"""The approximate methods below whole clients: rapid retraining (records), FUCP (classes),
and the repair step after any approximate method."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_config, train_small

from fedforget.data import ArrayDataset
from fedforget.engine import run_unlearning
from fedforget.errors import ConfigError
from fedforget.models import MLP, LogisticRegression, SmallCNN
from fedforget.task import load_client_data
from fedforget.tensors import decode
from fedforget.training import train_local
from fedforget.unlearning import ClientUpdate, get_method
from fedforget.unlearning.fucp import (
    ChannelLayer,
    channel_layers,
    channels_to_prune,
    prune,
    tf_idf,
)
from fedforget.unlearning.rapid_retrain import fisher_newton_train
from fedforget.unlearning.repair import boosted_average


# ------------------------------------------------------------------ rapid retraining
def test_one_fisher_newton_step_by_hand() -> None:
    # Prepare: logistic regression on one example, all weights 0: softmax = (1/2, 1/2),
    # so the gradient of the cross-entropy with label 0 is (p - onehot) x^T = (-1/2, 1/2) x^T
    # and (p - onehot) for the bias.
    model = LogisticRegression((2,), 2)
    with torch.no_grad():
        model.linear.weight.zero_()
        model.linear.bias.zero_()
    x = np.array([[2.0, -1.0]], dtype=np.float32)
    data = ArrayDataset(x=x, y=np.array([0]), num_classes=2, name="one")
    eta, lam, b1, b2 = 0.1, 0.5, 0.9, 0.999
    # Execute
    fisher_newton_train(model, data, epochs=1, batch_size=1, seed=0, learning_rate=eta,
                        damping=lam, beta1=b1, beta2=b2)
    # Assert: after one step the bias-corrected moments are g and g*g, so each weight moves
    # by -eta * g / (g^2 + lambda).
    g_w = np.outer([-0.5, 0.5], x[0])
    g_b = np.array([-0.5, 0.5])
    np.testing.assert_allclose(model.linear.weight.detach().numpy(),
                               -eta * g_w / (g_w ** 2 + lam), rtol=1e-5)
    np.testing.assert_allclose(model.linear.bias.detach().numpy(),
                               -eta * g_b / (g_b ** 2 + lam), rtol=1e-5)


def test_rapid_retrain_serves_a_record_request_at_its_stated_cost(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_small(run, **{"num-rounds": 8, "local-epochs": 2})
    ids = load_client_data(small_config(), 1)[0].record_ids()[:10]
    outcome = run_unlearning(run, client="client-001", method="rapid-retrain", records=ids,
                             progress=False)
    assert outcome is not None
    # T_u = 8 // 4 = 2 rounds, every one of the 4 clients (the requester stays), 2 epochs
    assert outcome.cost.client_epochs == 2 * 4 * 2
    assert outcome.kind == "records"
    assert outcome.metrics["test_accuracy"]["unlearned"] > 0.5  # 4 classes: chance is 0.25
    assert "retrained 2 rounds" in outcome.notes[0]


# ------------------------------------------------------------------------- FUCP
def test_tf_idf_by_hand() -> None:
    # 3 classes x 2 channels. Channel 0 fires for class 0 only; channel 1 for every class.
    a = np.array([[4.0, 1.0],
                  [0.0, 1.0],
                  [0.0, 1.0]])
    # TF for class 0: (4/5, 1/5). Class means: 2.5, 0.5, 0.5; channel 0 is >= its class
    # mean for class 0 only (1 class), channel 1 for classes 1 and 2 (2 classes):
    # IDF = log(4/2), log(4/3).
    np.testing.assert_allclose(tf_idf(a, 0), [0.8 * math.log(2), 0.2 * math.log(4 / 3)])
    layer = ChannelLayer("hidden", 2, "output", False, 1)
    assert channels_to_prune([a], [layer], [0], 0.5) == {"hidden": [0]}


def test_channel_layers_and_pruning_of_the_models() -> None:
    mlp = channel_layers(MLP((1, 4, 4), 3, 5))
    assert mlp == [ChannelLayer("hidden", 5, "output", False, 1)]
    cnn = channel_layers(SmallCNN((1, 8, 8), 3))
    assert cnn == [ChannelLayer("conv1", 16, "conv2", True, 1),
                   ChannelLayer("conv2", 32, "output", False, 4)]  # 2x2 positions per channel
    assert channel_layers(LogisticRegression((4,), 3)) == []
    tensors = {k: v.detach().numpy().copy() for k, v in SmallCNN((1, 8, 8), 3)
               .state_dict().items()}
    pruned = prune(tensors, cnn, {"conv1": [2], "conv2": [5]})
    assert not pruned["conv1.weight"][2].any() and not pruned["conv1.bias"][2]
    assert not pruned["conv2.weight"][:, 2].any()
    assert not pruned["conv2.weight"][5].any() and not pruned["conv2.bias"][5]
    assert not pruned["output.weight"][:, 20:24].any()
    assert pruned["output.weight"][:, 16:20].all() and pruned["output.weight"][:, 24:28].all()
    assert tensors["conv1.weight"][2].any()  # the input is not changed


def test_a_pruned_relu_unit_stays_pruned_under_training() -> None:
    model = MLP((3,), 2, 4)
    layers = channel_layers(model)
    tensors = prune({k: v.detach().numpy() for k, v in model.state_dict().items()}, layers,
                    {"hidden": [1, 3]})
    model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()})
    rng = np.random.default_rng(0)
    data = ArrayDataset(x=rng.standard_normal((40, 3)).astype(np.float32),
                        y=rng.integers(0, 2, 40), num_classes=2, name="d")
    train_local(model, data, epochs=3, learning_rate=0.5, batch_size=8, seed=1)
    assert not model.hidden.weight[[1, 3]].any() and not model.hidden.bias[[1, 3]].any()
    assert not model.output.weight[:, [1, 3]].any()
    assert model.hidden.weight[0].any()


def test_fucp_forgets_a_class_and_leaves_its_channels_pruned(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_small(run, **{"num-rounds": 4, "local-epochs": 2})
    outcome = run_unlearning(run, client="operator", method="fucp", labels=[2],
                             params={"finetune-rounds": 2}, progress=False)
    assert outcome is not None and outcome.kind == "class"
    m = outcome.metrics
    assert m["forgotten_class_accuracy"]["original"] >= 0.5
    assert m["forgotten_class_accuracy"]["unlearned"] <= 0.1
    model = decode((run / outcome.model_path).read_bytes())
    dead = [j for j in range(8) if not model["hidden.weight"][j].any()]
    assert len(dead) >= math.ceil(0.3 * 8)  # R = 0.3 of the 8 hidden units
    assert not model["output.weight"][:, dead].any()
    # the activations are a forward pass: only the fine-tuning rounds cost client-epochs
    assert outcome.cost.client_epochs == 2 * 4 * 2


def test_fucp_refuses_whole_client_requests_and_models_without_hidden_layers(
    tmp_path: Path
) -> None:
    from fedforget.unlearning import UnlearningError

    run = tmp_path / "run"
    train_small(run, **{"num-rounds": 2, "model": "logreg"})
    with pytest.raises(UnlearningError, match="fucp serves class requests"):
        run_unlearning(run, client="client-001", method="fucp", progress=False)
    with pytest.raises(UnlearningError, match="model 'logreg' has none"):
        run_unlearning(run, client="operator", method="fucp", labels=[1], progress=False)


# ----------------------------------------------------------------------- repair
def test_boosted_average_by_hand() -> None:
    like = {"w": np.zeros(1, dtype=np.float32)}
    updates = [ClientUpdate("a", {"w": np.array([1.0], np.float32)}, 10),
               ClientUpdate("b", {"w": np.array([4.0], np.float32)}, 30)]
    # weights 10 * (1 + 3) = 40 and 30: (40 * 1 + 30 * 4) / 70 = 160 / 70
    out = boosted_average(updates, {"a"}, 3.0, like=like)
    assert out["w"][0] == pytest.approx(160 / 70)
    assert boosted_average(updates, set(), 3.0, like=like)["w"][0] == pytest.approx(130 / 40)


def test_repair_refuses_an_exact_or_unknown_base() -> None:
    with pytest.raises(ConfigError, match="base = 'rollback' is exact"):
        get_method("repair", {"base": "rollback"})
    with pytest.raises(ConfigError, match="base = 'nope'"):
        get_method("repair", {"base": "nope"})
    with pytest.raises(ConfigError, match="unknown parameter 'bad'"):
        get_method("repair", {"base": "pga", "base-params": {"bad": 1}})


def test_repair_after_subtraction_counts_its_rounds(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_small(run, **{"num-rounds": 3})
    base = run_unlearning(run, client="client-003", method="subtract", progress=False)
    (run / "unlearned" / "current.json").unlink()
    repaired = run_unlearning(run, client="client-003", method="repair",
                              params={"base": "subtract", "rounds": 2}, progress=False)
    assert base is not None and repaired is not None
    assert base.cost.client_epochs == 0  # subtraction asks no client
    # 2 repair rounds x 3 remaining clients x 1 local epoch
    assert repaired.cost.client_epochs == 6
    assert repaired.cost.bytes_sent > 0
    assert "repair after subtract" in repaired.notes[-1]
    assert repaired.model_digest != base.model_digest
