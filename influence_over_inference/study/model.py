"""The nimarb CNN: the PyTorch CIFAR-10 tutorial's LeNet, as used by pytorch-influence-functions.

conv 3->6 5x5, ReLU, maxpool 2, conv 6->16 5x5, ReLU, maxpool 2, fc 400->120->84->10 with ReLU:
62,006 parameters. ``width`` scales the channel and hidden sizes for tiny test models of the
same shape (width=1 is the real model).
"""

from __future__ import annotations

import torch
from torch import nn

N_PARAMETERS = 62_006


class Net(nn.Module):
    def __init__(self, n_classes: int = 10, channels: tuple[int, int] = (6, 16), hidden: tuple[int, int] = (120, 84)):
        super().__init__()
        c1, c2 = channels
        h1, h2 = hidden
        self.conv1 = nn.Conv2d(3, c1, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.fc1 = nn.Linear(c2 * 5 * 5, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, n_classes)
        self.config = {"n_classes": n_classes, "channels": list(channels), "hidden": list(hidden)}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate activations (B, hidden[1]) that fc3 reads."""
        x = self.pool(torch.relu(self.conv1(x)))  # (B, c1, 14, 14)
        x = self.pool(torch.relu(self.conv2(x)))  # (B, c2, 5, 5)
        x = torch.flatten(x, 1)  # (B, c2*25)
        x = torch.relu(self.fc1(x))  # (B, h1)
        return torch.relu(self.fc2(x))  # (B, h2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32) -> (B, n_classes)
        return self.fc3(self.features(x))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(config: dict | None = None) -> Net:
    """A ``Net`` from the ``config`` a checkpoint recorded (None: the real 62,006-parameter model)."""
    config = config or {}
    return Net(
        n_classes=int(config.get("n_classes", 10)),
        channels=tuple(config.get("channels", (6, 16))),
        hidden=tuple(config.get("hidden", (120, 84))),
    )
