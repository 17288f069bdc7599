"""Tiny float64 models and data for the engine's tests: logistic regression, a 2-layer MLP and a
LeNet-shaped conv net (conv-relu-pool twice, then fc-relu-fc) on 8x8 images, plus a full-batch
trainer that converges (L-BFGS) so influence can be checked against retraining."""

from __future__ import annotations

import torch
from torch import nn

DTYPE = torch.float64


def logistic(d: int = 5, c: int = 3) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(d, c)).to(DTYPE)


def mlp(d: int = 6, h: int = 8, c: int = 3) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c)).to(DTYPE)


def layer_norm_net() -> nn.Module:
    """An MLP with a LayerNorm: parameters the hooks route cannot take (vmap / Jacobian routes instead)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)


def dead_relu_net(d: int = 6, h: int = 5, c: int = 3, dead: int | None = None) -> nn.Module:
    """``d -> h -> ReLU -> c`` with hidden units that never fire (the first ``dead``; all by default): their
    incoming and outgoing weights have exactly zero curvature."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, h), nn.ReLU(), nn.Linear(h, c)).to(DTYPE)
    with torch.no_grad():
        model[1].weight[:dead] = 0.0
        model[1].bias[:dead] = -1.0
    return model.eval()


class UserSplit:
    """A user's own data object: ``tensors(indices)`` indexes as given (no dtype conversion of its own)."""

    def __init__(self, x, y, source=None):
        self.x, self.y = x, y
        if source is not None:
            self.source = source

    def __len__(self):
        return len(self.x)

    def tensors(self, indices=None):
        return (self.x, self.y) if indices is None else (self.x[indices], self.y[indices])


class TinyConv(nn.Module):
    """LeNet's shape at toy size: (B, 3, 8, 8) -> conv 3x3 -> relu -> pool -> conv 3x3 -> relu -> fc -> relu -> fc."""

    def __init__(self, c1: int = 3, c2: int = 4, hidden: int = 10, n_classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3)  # (B, c1, 6, 6)
        self.pool = nn.MaxPool2d(2, 2)  # (B, c1, 3, 3)
        self.conv2 = nn.Conv2d(c1, c2, 2)  # (B, c2, 2, 2)
        self.fc1 = nn.Linear(c2 * 4, hidden)
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = torch.relu(self.conv2(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def conv(**kw) -> nn.Module:
    return TinyConv(**kw).to(DTYPE)


def blobs(n: int, shape: tuple, c: int, seed: int = 0, noise: float = 1.0, flip: float = 0.0):
    """Class-dependent means (the same for every seed) plus Gaussian noise; ``flip``: label noise."""
    means = torch.randn(c, *shape, generator=torch.Generator().manual_seed(1234), dtype=DTYPE)
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=gen)
    x = means[y] + noise * torch.randn(n, *shape, generator=gen, dtype=DTYPE)
    if flip:
        wrong = torch.rand(n, generator=gen) < flip
        y = torch.where(wrong, torch.randint(0, c, (n,), generator=gen), y)
    return x, y


def objective(model: nn.Module, x, y, weight_decay: float, weights=None):
    """Mean cross-entropy (optionally per-example weighted) + weight_decay/2 * ||theta||^2."""
    losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    loss = losses.mean() if weights is None else (weights * losses).sum() / len(x)
    return loss + 0.5 * weight_decay * sum((p * p).sum() for p in model.parameters())


def fit(model: nn.Module, x, y, weight_decay: float, steps: int = 200, weights=None, tol: float = 1e-12) -> nn.Module:
    """Full-batch L-BFGS to (near) convergence; returns the model in eval mode."""
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=steps, tolerance_grad=tol, tolerance_change=1e-14,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective(model, x, y, weight_decay, weights)
        loss.backward()
        return loss

    opt.step(closure)
    return model.eval()


def trained_conv(n: int = 300, seed: int = 0, weight_decay: float = 1e-3, **kw):
    """A TinyConv trained to convergence on noisy blobs: (model, x, y)."""
    torch.manual_seed(seed)
    model = conv(**kw)
    x, y = blobs(n, (3, 8, 8), model.fc2.out_features, seed=seed, noise=2.0, flip=0.1)
    fit(model, x, y, weight_decay, steps=500)
    return model, x, y
