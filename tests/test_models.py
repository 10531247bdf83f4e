"""Tests of fedforget.models: shapes, parameter counts, seeded initialisation."""

from __future__ import annotations

import pytest
import torch

from fedforget.errors import ConfigError
from fedforget.models import MODELS, build_model, model_options

DIGITS = (1, 8, 8)
FASHION = (1, 28, 28)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["logreg", "mlp", "cnn"])
@pytest.mark.parametrize("shape", [DIGITS, FASHION])
def test_forward_shape_on_images(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(name, input_shape=shape, num_classes=10, seed=0)

    out = model(torch.zeros((5, *shape)))

    assert out.shape == (5, 10)


@pytest.mark.parametrize("name", ["logreg", "mlp"])
def test_forward_shape_on_vectors(name: str) -> None:
    model = build_model(name, input_shape=(20,), num_classes=4, seed=0)

    assert model(torch.zeros(3, 20)).shape == (3, 4)


@pytest.mark.parametrize(
    ("name", "shape", "options", "expected"),
    [
        # 64 inputs x 10 classes + 10 biases
        ("logreg", DIGITS, {}, 64 * 10 + 10),
        # (64 x 64 + 64) + (64 x 10 + 10)
        ("mlp", DIGITS, {}, 64 * 64 + 64 + 64 * 10 + 10),
        # (64 x 8 + 8) + (8 x 10 + 10)
        ("mlp", DIGITS, {"hidden_size": 8}, 64 * 8 + 8 + 8 * 10 + 10),
        # conv1 1*16*9 + 16, conv2 16*32*9 + 32, linear over 32 * 2 * 2 features
        ("cnn", DIGITS, {}, 160 + 4640 + 32 * 2 * 2 * 10 + 10),
        # 28 -> 14 -> 7 after two poolings
        ("cnn", FASHION, {}, 160 + 4640 + 32 * 7 * 7 * 10 + 10),
    ],
)
def test_parameter_counts(
    name: str, shape: tuple[int, ...], options: dict[str, int], expected: int
) -> None:
    model = build_model(name, input_shape=shape, num_classes=10, seed=0, **options)

    assert count(model) == expected


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_have_no_buffers(name: str) -> None:
    # Federated averaging exchanges parameters only: no BatchNorm running statistics.
    model = build_model(name, input_shape=DIGITS, num_classes=10, seed=0)

    assert list(model.buffers()) == []


@pytest.mark.parametrize("name", sorted(MODELS))
def test_initialisation_is_seeded(name: str) -> None:
    a = build_model(name, input_shape=DIGITS, num_classes=10, seed=3).state_dict()
    b = build_model(name, input_shape=DIGITS, num_classes=10, seed=3).state_dict()
    c = build_model(name, input_shape=DIGITS, num_classes=10, seed=4).state_dict()

    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_build_model_leaves_global_rng_alone() -> None:
    # Prepare
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)

    # Execute
    build_model("cnn", input_shape=DIGITS, num_classes=10, seed=9)
    after = torch.rand(4)

    # Assert
    assert torch.equal(after, expected)


def test_unknown_model_lists_names() -> None:
    with pytest.raises(ConfigError) as err:
        build_model("resnet18", input_shape=DIGITS, num_classes=10, seed=0)
    assert str(err.value) == "unknown model 'resnet18'; expected one of 'cnn', 'logreg', 'mlp'"


def test_cnn_refuses_vectors() -> None:
    with pytest.raises(ConfigError) as err:
        build_model("cnn", input_shape=(20,), num_classes=4, seed=0)
    assert str(err.value) == (
        "model = 'cnn' needs images of shape (C, H, W), but the data set gives inputs of "
        "shape (20,); expected an image data set, or model 'logreg' or 'mlp' for vectors"
    )


def test_unknown_option_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        build_model("logreg", input_shape=DIGITS, num_classes=10, seed=0, hidden_size=8)
    assert str(err.value) == "model 'logreg' has no option 'hidden_size'; allowed options: (none)"
    assert model_options("mlp") == ("hidden_size",)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden_size": 0}, "hidden-size = 0 is out of range; expected an integer >= 1"),
        ({"num_classes": 1}, "num_classes = 1 is out of range; expected >= 2"),
        ({"seed": -1}, "seed = -1 is out of range; expected an integer in 0..2**64-1"),
    ],
)
def test_bad_values_are_refused(kwargs: dict[str, int], message: str) -> None:
    args: dict[str, int] = {"num_classes": 10, "seed": 0}
    args.update(kwargs)

    with pytest.raises(ConfigError) as err:
        build_model("mlp", input_shape=DIGITS, **args)

    assert str(err.value) == message
