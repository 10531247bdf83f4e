"""Tests of fedforget.training: seeded SGD, FedProx, evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedforget.data import ArrayDataset, load_dataset
from fedforget.errors import ConfigError, DataError
from fedforget.models import build_model
from fedforget.training import evaluate, predict_proba, train_local


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.fixture(scope="module")
def digits300() -> ArrayDataset:
    return load_dataset("digits", seed=0)[0].subset(np.arange(300))


@pytest.fixture(scope="module")
def synthetic() -> tuple[ArrayDataset, ArrayDataset]:
    return load_dataset("synthetic", seed=0)


def fresh(name: str, data: ArrayDataset, seed: int = 0) -> nn.Module:
    return build_model(name, input_shape=data.input_shape, num_classes=data.num_classes,
                       seed=seed)


def train(model: nn.Module, data: ArrayDataset, **kwargs: float) -> None:
    args = {"epochs": 2, "learning_rate": 0.05, "batch_size": 32, "seed": 5}
    args.update(kwargs)
    train_local(model, data, **args)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_same_seed_gives_bit_identical_weights(name: str, digits300: ArrayDataset) -> None:
    # Prepare
    a, b, c = (fresh(name, digits300) for _ in range(3))

    # Execute: the global RNG is reseeded differently before each run, and must not matter
    torch.manual_seed(1)
    train(a, digits300, seed=5)
    torch.manual_seed(2)
    train(b, digits300, seed=5)
    train(c, digits300, seed=6)

    # Assert
    assert torch.equal(flat(a), flat(b))
    assert not torch.equal(flat(a), flat(c))


def test_result_counts_examples_and_steps(digits300: ArrayDataset) -> None:
    # Prepare: 130 examples in batches of 32 -> ceil(130 / 32) = 5 steps per epoch
    data = digits300.subset(np.arange(130))

    # Execute
    result = train_local(
        fresh("logreg", data), data, epochs=2, learning_rate=0.1, batch_size=32, seed=0
    )

    # Assert
    assert result.num_examples == 130 and result.steps == 10


def test_reported_loss_is_measured_before_the_step() -> None:
    # Prepare: all-zero logits give cross-entropy ln K for every example; one full batch
    data = ArrayDataset(x=np.ones((8, 3)), y=np.arange(8) % 4, num_classes=4, name="d")
    model = nn.Linear(3, 4)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)

    # Execute
    result = train_local(model, data, epochs=1, learning_rate=0.1, batch_size=8, seed=0)

    # Assert
    assert result.loss == pytest.approx(math.log(4), rel=1e-6)
    assert result.steps == 1


def test_loss_decreases_on_synthetic_data(synthetic: tuple[ArrayDataset, ArrayDataset]) -> None:
    # Prepare: 4 clusters with centres ~ sqrt(2 * 20) = 6.3 apart and unit noise: the
    # Bayes error between two clusters is Phi(-3.16) < 0.1 %, so a linear model gets there.
    train_set, test_set = synthetic
    model = fresh("logreg", train_set)
    before = evaluate(model, test_set)

    # Execute
    results = [
        train_local(model, train_set, epochs=1, learning_rate=0.1, batch_size=32, seed=e)
        for e in range(5)
    ]
    after = evaluate(model, test_set)

    # Assert
    assert results[-1].loss < results[0].loss
    assert after.loss < before.loss
    assert after.accuracy >= 0.95


# ----------------------------------------------------------------------------- FedProx
def test_fedprox_with_zero_mu_is_plain_sgd(digits300: ArrayDataset) -> None:
    # Prepare: a hand-written SGD loop with the same data order
    model = fresh("mlp", digits300)
    reference = fresh("mlp", digits300)
    x, y = torch.from_numpy(digits300.x.copy()), torch.from_numpy(digits300.y.copy())
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(5)
    for _ in range(2):
        order = torch.randperm(300, generator=generator)
        for start in range(0, 300, 32):
            batch = order[start : start + 32]
            optimizer.zero_grad()
            F.cross_entropy(reference(x[batch]), y[batch]).backward()
            optimizer.step()

    # Execute
    train(model, digits300, proximal_mu=0.0)

    # Assert
    assert torch.equal(flat(model), flat(reference))


def test_fedprox_step_adds_mu_times_drift(digits300: ArrayDataset) -> None:
    # Prepare: two full-batch steps. The proximal gradient mu (w - w0) is zero at w0, so step
    # one is plain SGD, and step two is plain SGD from w1 minus lr * mu * (w1 - w0).
    lr, mu = 0.1, 3.0
    w0 = flat(fresh("logreg", digits300))
    one_step = fresh("logreg", digits300)
    train_local(one_step, digits300, epochs=1, learning_rate=lr, batch_size=300, seed=0)
    w1 = flat(one_step)
    train_local(one_step, digits300, epochs=1, learning_rate=lr, batch_size=300, seed=0)
    plain_from_w1 = flat(one_step)
    proximal = fresh("logreg", digits300)

    # Execute
    train_local(proximal, digits300, epochs=2, learning_rate=lr, batch_size=300, seed=0,
                proximal_mu=mu)

    # Assert
    expected = plain_from_w1 - lr * mu * (w1 - w0)
    torch.testing.assert_close(flat(proximal), expected, rtol=0, atol=1e-6)


def test_fedprox_with_large_mu_stays_near_the_start(digits300: ArrayDataset) -> None:
    # Prepare. For logistic regression the per-example gradient is (p - e_y) [x; 1]^T with
    # ||p - e_y|| <= sqrt(2) and x in [0, 1]^64, so every (batch) gradient has norm
    # G <= sqrt(2) * sqrt(65). With d = w - w0, a FedProx step is
    # d <- (1 - lr mu) d - lr g, so with 0 <= 1 - lr mu < 1:
    # ||d|| <= lr G / (lr mu) = G / mu.
    lr, mu = 0.05, 10.0
    bound = math.sqrt(2) * math.sqrt(65) / mu  # 1.14
    proximal, plain = fresh("logreg", digits300), fresh("logreg", digits300)
    w0 = flat(proximal)

    # Execute
    for model, m in ((proximal, mu), (plain, 0.0)):
        train_local(model, digits300, epochs=3, learning_rate=lr, batch_size=10, seed=0,
                    proximal_mu=m)

    # Assert
    assert float((flat(proximal) - w0).norm()) <= bound
    assert float((flat(plain) - w0).norm()) > bound  # the bound is not vacuous here


# ----------------------------------------------------------------------------- evaluate
@pytest.fixture
def identity_model() -> nn.Module:
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    return model


def test_evaluate_on_a_hand_built_model(identity_model: nn.Module) -> None:
    # Prepare: logits equal the inputs. Predictions 0, 1, 0, 1 against labels 0, 1, 1, 1.
    x = np.array([[1, 0], [0, 1], [2, 1], [0, 3]], dtype=np.float32)
    data = ArrayDataset(x=x, y=np.array([0, 1, 1, 1]), num_classes=2, name="hand")
    # cross-entropy = logsumexp(z) - z_y: log(1 + e^-1) twice, 1 + log(1 + e^-1), log(1 + e^-3)
    expected_loss = (3 * math.log1p(math.exp(-1)) + 1 + math.log1p(math.exp(-3))) / 4
    identity_model.train()

    # Execute
    result = evaluate(identity_model, data, batch_size=3)

    # Assert
    assert result.num_examples == 4
    assert result.accuracy == 0.75
    assert result.loss == pytest.approx(expected_loss, rel=1e-6)
    assert identity_model.training  # mode restored


def test_predict_proba_is_the_softmax(identity_model: nn.Module) -> None:
    probs = predict_proba(identity_model, np.array([[1.0, 0.0], [0.0, 0.0]]))

    e = math.e
    np.testing.assert_allclose(probs, [[e / (e + 1), 1 / (e + 1)], [0.5, 0.5]], rtol=1e-6)
    assert probs.dtype == np.float64


def test_empty_data_is_refused(identity_model: nn.Module) -> None:
    empty = ArrayDataset(x=np.zeros((0, 2)), y=np.zeros(0, np.int64), num_classes=2, name="e")

    with pytest.raises(DataError, match="cannot evaluate on data set 'e': it has no examples"):
        evaluate(identity_model, empty)
    with pytest.raises(DataError, match="cannot train on data set 'e': it has no examples"):
        train_local(identity_model, empty, epochs=1, learning_rate=0.1, batch_size=1, seed=0)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 0}, "local-epochs = 0 is out of range; expected an integer >= 1"),
        ({"learning_rate": 0.0}, "learning-rate = 0.0 is out of range; expected a number > 0"),
        ({"batch_size": 0}, "batch-size = 0 is out of range; expected an integer >= 1"),
        ({"proximal_mu": -1.0}, "proximal-mu = -1.0 is out of range; expected a number >= 0"),
    ],
)
def test_bad_hyper_parameters_name_the_key(
    kwargs: dict[str, float], message: str, identity_model: nn.Module
) -> None:
    data = ArrayDataset(x=np.zeros((2, 2)), y=np.array([0, 1]), num_classes=2, name="d")
    args: dict[str, float] = {"epochs": 1, "learning_rate": 0.1, "batch_size": 1, "seed": 0}
    args.update(kwargs)

    with pytest.raises(ConfigError) as err:
        train_local(identity_model, data, **args)  # type: ignore[arg-type]

    assert str(err.value) == message
