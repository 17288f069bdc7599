"""The users' helpers: save, load and test the nimarb CNN, and what the notebook needs.

Thin, documented wrappers over the ``influence_over_inference`` package so a notebook reads like
the PyTorch CIFAR-10 tutorial it grew from.
"""

from __future__ import annotations

from influence_over_inference.study.checkpoints import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from influence_over_inference.study.data import CLASSES, balanced_subset, load_cifar10
from influence_over_inference.study.model import Net, count_parameters
from influence_over_inference.study.training import (
    TrainConfig,
    evaluate,
    resolve_device,
    train,
    train_or_load,
)

__all__ = [
    "CLASSES", "CheckpointError", "Net", "TrainConfig", "balanced_subset", "count_parameters", "load_cifar10",
    "load_model", "resolve_device", "save_model", "test_model", "train", "train_or_load",
]


def save_model(model: Net, path="data/cifar_net.pt", metadata: dict | None = None, overwrite: bool = False):
    """Save ``model`` to ``path`` atomically. An existing file is kept unless ``overwrite=True``."""
    return save_checkpoint(model, path, metadata, overwrite=overwrite)


def load_model(path="data/cifar_net.pt", device="cpu") -> Net:
    """Load a model saved by :func:`save_model` (or a plain state_dict of ``Net``), in eval mode.

    Uses ``torch.load(..., weights_only=True)``. A missing, truncated or foreign file, or weights
    of another architecture, raise :class:`CheckpointError` naming the file.
    """
    model, _ = load_checkpoint(path, device=device)
    return model


def test_model(model: Net, test_set, device=None, verbose: bool = True) -> dict:
    """Overall and per-class test accuracy, printed as the PyTorch CIFAR-10 tutorial prints them.

    ``test_set`` is a split from :func:`load_cifar10` (``data.test``). Runs on the model's device
    (or on ``device``, then the model is put back where it was). Returns a dict with
    ``accuracy`` (0-1), ``per_class`` (class -> 0-1), ``loss`` and ``predictions`` (on the CPU).
    """
    result = evaluate(model, test_set, device=device)
    if verbose:
        print(f"Accuracy of the network on the {result['n']} test images: {100 * result['accuracy']:.1f} %")
        for name, acc in result["per_class"].items():
            print(f"Accuracy for class: {name:10s} is {100 * acc:.1f} %")
    return result
