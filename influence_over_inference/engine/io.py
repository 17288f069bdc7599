"""Atomic writes: a file is either its old content or its complete new content, never half-written.

:func:`atomic_write` is the one helper: it writes through a temporary file in the target's folder,
named uniquely per process and call (``.<name>.tmp-<pid>-<random>``), moves it into place with
``os.replace`` and removes it on failure. Temporaries left behind by killed processes (their
process id no longer runs) are removed the next time anything is written beside them.
:func:`check_writable` tells, before a long computation, whether an output can be written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}(?P<suffix>\.[A-Za-z0-9]+)?$")


class OutputNotWritableError(OSError):
    """An output location cannot be written; the message is one line naming it and the reason."""


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but is not ours, or we cannot tell: leave its files alone
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries of :func:`atomic_write` in ``folder`` whose writer no longer runs."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TMP.match(p.name)
        if m and not _pid_alive(int(m["pid"])):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    if removed:
        log.info("removed %d stale temporary file(s) of killed runs in %s", len(removed), Path(folder).name)
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a unique temporary beside ``path``, then move it onto ``path``.

    The temporary keeps ``path``'s suffix (``np.savez`` and friends look at it). On any error the
    temporary is removed and ``path`` keeps its old content. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _probe_folder(folder: Path, what: str, shown: Path) -> None:
    """Create ``folder`` if needed and write and remove a probe file in it, or raise one line."""
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise OutputNotWritableError(f"cannot write {what} {shown}: {blocker} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise OutputNotWritableError(f"cannot write {what} {shown}: {error.strerror or error}") from None


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Raise :class:`OutputNotWritableError` unless a file can be written at ``path`` (a file path).

    Creates missing parent folders, writes and removes a probe file there; takes milliseconds, so
    commands call it before any long computation.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputNotWritableError(f"cannot write {what} {path}: it is a folder; give a file name")
    _probe_folder(path.parent, what, path)
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputNotWritableError(f"cannot write {what} {path}: the file is read-only")
    return path


def check_writable_dir(folder: str | os.PathLike, what: str = "folder") -> Path:
    """Like :func:`check_writable` for a folder that files will be written into."""
    folder = Path(folder)
    _probe_folder(folder, what, folder)
    return folder


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_write`: never a half-written file."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_json_atomic(obj, path: str | os.PathLike) -> Path:
    """Write ``obj`` as JSON (indent 1) through :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))


def save_npz_atomic(path: str | os.PathLike, **arrays) -> Path:
    """``np.savez`` through :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` through :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))
