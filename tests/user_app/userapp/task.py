"""userapp: a Flower / PyTorch app (model, data, training and evaluation)."""

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    """A small multi-layer perceptron for 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)


def load_data(partition_id: int, num_partitions: int, batch_size: int):
    """This partition's train and validation loaders (an IID split of the first 80%)."""
    x, y = _digits()
    order = np.random.default_rng(42).permutation(int(0.8 * len(x)))
    part = order[partition_id::num_partitions]
    cut = int(0.8 * len(part))
    train = TensorDataset(torch.from_numpy(x[part[:cut]]), torch.from_numpy(y[part[:cut]]))
    val = TensorDataset(torch.from_numpy(x[part[cut:]]), torch.from_numpy(y[part[cut:]]))
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(val, batch_size=64)


def load_centralized_dataset():
    """The server's test set (the last 20%)."""
    x, y = _digits()
    start = int(0.8 * len(x))
    test = TensorDataset(torch.from_numpy(x[start:]), torch.from_numpy(y[start:]))
    return DataLoader(test, batch_size=128)


def train(net: nn.Module, trainloader: DataLoader, epochs: int, lr: float, device) -> float:
    """Train the model on the training set."""
    net.to(device)
    criterion = nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for images, labels in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(images.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / (epochs * len(trainloader))


def test(net: nn.Module, testloader: DataLoader, device) -> tuple[float, float]:
    """Validate the model on the test set."""
    net.to(device)
    criterion = nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for images, labels in testloader:
            outputs = net(images.to(device))
            loss += criterion(outputs, labels.to(device)).item()
            correct += (torch.max(outputs.data, 1)[1] == labels.to(device)).sum().item()
    return loss / len(testloader), correct / len(testloader.dataset)
