"""Atomic writes: a file is either its old content or its complete new content, never half-written.

Each write goes to a temporary file in the same folder (unique per process and call) and is
moved into place with ``os.replace``; the temporary is removed on failure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# Result caches: JSON, written atomically, keyed by the settings that produced them


def write_json_atomic(obj, path: str | os.PathLike) -> Path:
    """Write ``obj`` as JSON to a temporary file beside ``path``, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def save_npz_atomic(path: str | os.PathLike, **arrays) -> Path:
    """``np.savez`` to a temporary file beside ``path``, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
