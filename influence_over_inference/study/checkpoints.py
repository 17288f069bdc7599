"""Saving and loading model checkpoints safely.

A checkpoint is a plain dict readable with ``torch.load(..., weights_only=True)``: the model's
``state_dict``, the architecture ``config``, and metadata (training settings, data source, test
accuracy). Saving writes a temporary file and renames it, so an interrupted save never leaves a
corrupt checkpoint, and refuses to replace an existing file unless ``overwrite=True``.
A plain ``state_dict`` of the nimarb CNN (as the PyTorch tutorial saves it) loads too.
"""

from __future__ import annotations

import os
import re
import struct
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..engine.io import atomic_torch_save
from .model import Net, build_model

FORMAT = "influence-over-inference/checkpoint"


VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded; the message names the file and the problem."""


def save_checkpoint(model: Net, path: str | os.PathLike, metadata: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` and ``metadata`` to ``path`` atomically; never replace a file unless asked."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(
            f"{path} already exists; pass overwrite=True (command line: --overwrite) to replace it, "
            "or choose another path"
        )
    blob = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": type(model).__name__,
        "config": getattr(model, "config", {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": metadata or {},
    }
    atomic_torch_save(blob, path)
    return path


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Net, dict]:
    """Load a checkpoint written by :func:`save_checkpoint` (or a plain nimarb ``state_dict``).

    Returns ``(model in eval mode, metadata)``. Raises :class:`CheckpointError` naming the file
    for a missing, truncated or foreign file, and for weights of another architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train one with `python -m influence_over_inference train`")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): an interrupted copy? Copy or train it again")
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic != b"PK" and magic[:1] != b"\x80":  # neither torch.save's zip nor a legacy pickle
        raise CheckpointError(f"{path} is not a PyTorch file (text or another format); give the .pt file torch.save wrote")
    if magic == b"PK" and not zipfile.is_zipfile(path):  # a zip's directory is at its end: cut off
        raise CheckpointError(f"{path} {TRUNCATED}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path} {_why_unreadable(error)}") from None
    if isinstance(blob, dict) and blob.get("format") == FORMAT:
        if blob.get("architecture") != "Net":
            raise CheckpointError(f"{path} holds a {blob.get('architecture')!r} model; this project loads 'Net'")
        state, config, metadata = blob["state_dict"], blob.get("config", {}), blob.get("metadata", {})
    elif isinstance(blob, dict) and blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
        state, config, metadata = blob, _infer_config(blob), {"note": "plain state_dict"}
    else:
        raise CheckpointError(f"{path} is a PyTorch file but not a model checkpoint (found {type(blob).__name__})")
    model = build_model(config)
    _check_state(model, state, path)
    model.load_state_dict(state)
    return model.to(device).eval(), metadata


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
TRUNCATED = "is truncated (the file ends early): an interrupted copy or save? Copy or train it again"


def _why_unreadable(error: Exception) -> str:
    """What a ``torch.load(weights_only=True)`` failure means, in one readable line."""
    text = " ".join(_ANSI.sub("", str(error)).split())
    if "Weights only load failed" in text or "weights_only" in text:
        return ("holds pickled Python objects (e.g. a whole model saved with torch.save(model)), which are not "
                "loaded because unpickling can run code; save model.state_dict() instead and load that")
    if isinstance(error, (EOFError, IndexError, struct.error)) or "EOF" in text or "central directory" in text or "truncat" in text.lower():
        return TRUNCATED  # a legacy (pickle) file cut off: its reader runs out of bytes
    if "invalid load key" in text or "not a zip file" in text.lower() or isinstance(error, UnicodeDecodeError):
        return "is not a PyTorch file (text or another format); give the .pt file torch.save wrote"
    return f"is not a readable PyTorch checkpoint ({type(error).__name__}: {text[:300] or 'no detail'})"


def _infer_config(state: dict) -> dict:
    try:
        return {
            "n_classes": state["fc3.weight"].shape[0],
            "channels": [state["conv1.weight"].shape[0], state["conv2.weight"].shape[0]],
            "hidden": [state["fc1.weight"].shape[0], state["fc2.weight"].shape[0]],
        }
    except (KeyError, IndexError, AttributeError):
        return {}


def _check_state(model: nn.Module, state: dict, path: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k}: expected {expected[k]}, found {found[k]}" for k in expected if k in found and expected[k] != found[k]]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unexpected:
            parts.append(f"unexpected {unexpected}")
        if wrong:
            parts.append("shape mismatch " + "; ".join(wrong))
        raise CheckpointError(f"{path} does not hold the nimarb CNN (Net): " + ", ".join(parts))
