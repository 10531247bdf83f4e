"""Small models for federated experiments, in a registry by name.

None of them has batch normalisation or other running statistics: the state of a model is
its parameters alone, which is what federated averaging and the history store handle.
A new model is one ``nn.Module`` factory and one ``MODELS.register`` line.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from fedforget.errors import ConfigError
from fedforget.registry import Registry


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: flatten, then one linear layer."""

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(x, 1))


class MLP(nn.Module):
    """Flatten, ``Linear`` - ``ReLU`` - ``Linear``."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(math.prod(input_shape), hidden_size)
        self.output = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(torch.relu(self.hidden(torch.flatten(x, 1))))


class SmallCNN(nn.Module):
    """Two 3×3 convolutions (16 and 32 channels) with ReLU and 2×2 max-pooling, then linear.

    Padding keeps the size through each convolution and each pooling halves it (rounding
    down), so an ``H×W`` input gives ``32 · ⌊⌊H/2⌋/2⌋ · ⌊⌊W/2⌋/2⌋`` features: 128 on 8×8
    digits, 1,568 on 28×28 Fashion-MNIST.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.conv1 = nn.Conv2d(channels, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.output = nn.Linear(32 * (height // 4) * (width // 4), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.output(torch.flatten(x, 1))


def _logreg(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return LogisticRegression(input_shape, num_classes)


def _mlp(input_shape: tuple[int, ...], num_classes: int, hidden_size: int = 64) -> nn.Module:
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
        raise ConfigError(
            f"hidden-size = {hidden_size!r} is out of range; expected an integer >= 1"
        )
    return MLP(input_shape, num_classes, hidden_size)


def _cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(input_shape) != 3:
        raise ConfigError(
            f"model = 'cnn' needs images of shape (C, H, W), but the data set gives inputs of "
            f"shape {input_shape}; expected an image data set, or model 'logreg' or 'mlp' "
            "for vectors"
        )
    if min(input_shape[1:]) < 4:
        raise ConfigError(
            f"model = 'cnn' needs images of at least 4x4 pixels (two 2x2 poolings); got "
            f"shape {input_shape}"
        )
    return SmallCNN(input_shape, num_classes)


ModelFactory = Callable[..., nn.Module]

MODELS: Registry[ModelFactory] = Registry("model")
MODELS.register("logreg", _logreg)
MODELS.register("mlp", _mlp)
MODELS.register("cnn", _cnn)


def model_options(name: str) -> tuple[str, ...]:
    """The options (beyond input shape and classes) that model ``name`` accepts."""
    factory = _factory(name)
    params = inspect.signature(factory).parameters
    return tuple(p for p in params if p not in {"input_shape", "num_classes"})


def build_model(
    name: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    seed: int,
    **options: Any,
) -> nn.Module:
    """Build model ``name`` with parameters initialised from ``seed``.

    PyTorch's default initialisation is drawn from the CPU generator seeded with ``seed``
    inside :func:`torch.random.fork_rng`, so the same arguments give the same weights and
    the caller's global random state is left as it was.

    Parameters
    ----------
    name : str
        A key of :data:`MODELS`.
    input_shape : sequence of int
        Shape of one example (``ArrayDataset.input_shape``).
    num_classes : int
        Number of outputs, ``>= 2``.
    seed : int
        Initialisation seed, ``>= 0``.
    **options
        Options of that model (see :func:`model_options`), e.g. ``hidden_size`` for ``mlp``.

    Raises
    ------
    ConfigError
        Unknown name or option, a value out of range, or a model that does not fit the input.
    """
    factory = _factory(name)
    allowed = model_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"model {name!r} has no option {unknown[0]!r}; allowed options: "
            f"{', '.join(allowed) if allowed else '(none)'}"
        )
    shape = tuple(int(d) for d in input_shape)
    if not shape or min(shape) < 1:
        raise ConfigError(f"input shape {shape}: expected one or more positive sizes")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes = {num_classes!r} is out of range; expected >= 2")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ConfigError(f"seed = {seed!r} is out of range; expected an integer in 0..2**64-1")
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return factory(shape, num_classes, **options)


def _factory(name: str) -> ModelFactory:
    return MODELS.get(name)
