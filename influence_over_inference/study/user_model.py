"""A user's own model: built by a factory named ``package.module:factory``, weights from a checkpoint.

The factory is any importable callable that returns an ``nn.Module`` when called with no
arguments (a class, or a function). The checkpoint is read with ``torch.load(...,
weights_only=True)`` (no code in it ever runs) and may be a plain ``state_dict``, a dict holding
one under ``"state_dict"`` or ``"model"`` (as many training scripts save), or this project's
format (whose metadata, e.g. the training weight decay, is returned too).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .checkpoints import FORMAT, CheckpointError


def resolve_factory(spec: str) -> Callable[[], nn.Module]:
    """The callable named by ``"package.module:attribute"`` (the current folder is importable)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model must look like package.module:factory (e.g. mymodels:ResNetSmall), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import {module_name!r} for --model {spec}: {error}") from error
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{module_name} has no attribute {attr!r} (--model {spec})")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"--model {spec} names a {type(target).__name__}, not a class or function")
    return target


def state_dict_of(blob, path: Path) -> tuple[dict, dict]:
    """``(state_dict, metadata)`` from whatever a checkpoint file held."""
    if isinstance(blob, dict) and blob.get("format") == FORMAT:
        return blob["state_dict"], blob.get("metadata", {})
    if isinstance(blob, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = blob.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner, {k: v for k, v in blob.items() if k != key and isinstance(v, (int, float, str))}
        if blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
            return blob, {}
    raise CheckpointError(f"{path.name} holds no state_dict (found {type(blob).__name__}"
                          + (f" with keys {sorted(map(str, blob))[:8]}" if isinstance(blob, dict) else "") + ")")


def load_user_model(spec: str, checkpoint: str | os.PathLike | None, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Build the model ``spec`` names, load ``checkpoint`` into it (strictly), put it in eval mode on ``device``.

    Returns ``(model, metadata)``; metadata is empty unless the checkpoint records some.
    """
    model = resolve_factory(spec)()
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    metadata = {}
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise CheckpointError(f"no checkpoint at {path}")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise CheckpointError(f"{path.name} is not a checkpoint torch.load(weights_only=True) can read: "
                                  f"{type(error).__name__}: {first}") from error
        state, metadata = state_dict_of(blob, path)
        missing, unexpected = _mismatch(model, state)
        if missing or unexpected:
            raise CheckpointError(f"{path.name} does not fit --model {spec}: missing {missing[:6] or 'none'}, "
                                  f"unexpected {unexpected[:6] or 'none'}")
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise CheckpointError(f"{path.name} does not fit --model {spec}: {str(error).splitlines()[-1].strip()}") from error
    return model.to(device).eval(), metadata


def _mismatch(model: nn.Module, state: dict) -> tuple[list[str], list[str]]:
    own = set(model.state_dict())
    return sorted(own - set(state)), sorted(set(state) - own)
