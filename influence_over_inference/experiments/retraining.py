"""Retraining from the trained parameters, with the same seed and data order, for leave-one-out checks.

Koh & Liang (ICML 2017, §5.1) validate influence on a network by removing a training image and
retraining from the trained parameters with the same data order, minus a control run that retrains
the same way without removing anything (so continued training does not count as influence).
:func:`retrain` does that with per-image weights (0 = removed; every run sees the same minibatches),
and :func:`train_subset_model` trains the documented class-balanced subset model those checks use.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .store import CACHE_DIR, settings_key

log = logging.getLogger(__name__)

@dataclass
class RetrainConfig:
    steps: int = 300  # SGD steps of retraining, starting from the trained parameters (~2 epochs of 5,000)
    batch_size: int = 32  # images per step (the same minibatches, in the same order, in every run)
    lr: float = 0.0005  # constant learning rate: small, so the control stays near the trained model and the
    # response to a removal stays linear (measured on 200 test images: mean |control - trained| test-loss
    # change 0.10 at 0.0005, 0.32 at 0.002, several nats at 0.01)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # L2 in the optimiser (the training weight decay)
    seed: int = 0  # seeds the data order, shared by the control and every removal

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if not self.lr > 0 or not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0, 0 <= momentum < 1, weight_decay >= 0; got {self.lr}, {self.momentum}, "
                             f"{self.weight_decay}")

    @property
    def horizon(self) -> float:
        """``lr * steps / (1 - momentum)``: the gradient-flow time retraining covers. A direction of
        curvature ``h`` reaches its new optimum when ``h * horizon >> 1``, so retraining behaves like
        influence with damping of about ``1 / horizon``."""
        return self.lr * self.steps / (1 - self.momentum)


def data_order(n: int, steps: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Minibatch indices (steps, batch_size): consecutive random permutations of ``range(n)``."""
    need = steps * batch_size
    perms = [torch.randperm(n, generator=generator) for _ in range(math.ceil(need / n))]
    return torch.cat(perms)[:need].reshape(steps, batch_size)


def retrain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, config: RetrainConfig,
            order: torch.Tensor | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """A copy of ``model`` trained on from its parameters with per-image ``weights`` (N,) (0 = removed).

    Step ``t`` uses the images ``order[t]`` (default: :func:`data_order` seeded by ``config.seed``)
    and minimises ``sum_b weights[b] * CE_b / batch_size`` by SGD with momentum and weight decay, so a
    run with all weights 1 (the control) and a run with some weights 0 see the same minibatches.
    ``x`` are normalised images (N, 3, 32, 32), ``y`` labels (N,).
    """
    import copy

    if weights.shape != y.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must match labels {tuple(y.shape)}")
    if order is None:
        order = data_order(len(y), config.steps, config.batch_size, torch.Generator().manual_seed(config.seed))
    net = copy.deepcopy(model).to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    for idx in order:
        xb, yb, wb = x[idx].to(device), y[idx].to(device), weights[idx].to(device)
        loss = (wb * nn.functional.cross_entropy(net(xb), yb, reduction="none")).sum() / len(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.cpu().eval()


@torch.no_grad()
def test_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image cross-entropy (float64) of ``model`` on normalised images ``x`` with labels ``y``."""
    return nn.functional.cross_entropy(model.eval()(x).double(), y, reduction="none")


def balanced_subset(labels: torch.Tensor, n_per_class: int) -> torch.Tensor:
    """Indices of the first ``n_per_class`` images of each class, in dataset order."""
    keep = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < n_per_class:
            raise ValueError(f"class {c} has only {len(idx)} images, fewer than n_per_class={n_per_class}")
        keep.append(idx[:n_per_class])
    return torch.sort(torch.cat(keep)).values


def subset_split(split, indices: torch.Tensor):
    """A :class:`CIFAR10Split` of the given indices of ``split`` (images, labels and names)."""
    from ..study.data import CIFAR10Split

    return CIFAR10Split(split.images[indices], split.labels[indices], [split.names[i] for i in indices.tolist()])


def train_subset_model(data, n_per_class: int, train_config, cache_dir: str | os.PathLike = CACHE_DIR,
                       progress: bool = True):
    """The model trained on the class-balanced subset (cached checkpoint): ``(model, path, indices)``."""
    from ..study.checkpoints import load_checkpoint, save_checkpoint
    from ..study.training import evaluate, train

    indices = balanced_subset(data.train.labels, n_per_class)
    settings = {"data_source": data.source, "n_per_class": n_per_class, "recipe": asdict(train_config)}
    settings["recipe"].pop("threads", None)
    settings["recipe"].pop("device", None)
    path = Path(cache_dir) / f"subset-model-{n_per_class * 10}-{settings_key(settings)}.pt"
    if path.exists():
        model, meta = load_checkpoint(path)
        return model, path, indices
    start = time.perf_counter()
    result = train(subset_split(data.train, indices), train_config, progress=progress)
    ev = evaluate(result.model, data.test)
    meta = {**settings, "test_accuracy": ev["accuracy"], "minutes": (time.perf_counter() - start) / 60,
            "history": [asdict(h) for h in result.history]}
    save_checkpoint(result.model, path, meta, overwrite=True)
    log.info("subset model: test accuracy %.4f, %.1f min", ev["accuracy"], meta["minutes"])
    return result.model, path, indices


@torch.no_grad()
def losses_and_predictions(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-image cross-entropy (float64) and predicted classes of ``model`` on normalised images."""
    out = model.eval()(x).double()
    return nn.functional.cross_entropy(out, y, reduction="none").numpy(), out.argmax(1).numpy()
