"""Fingerprints: of files (checkpoints) and of settings (cache keys)."""

from __future__ import annotations

import hashlib
import os


def file_sha256(path: str | os.PathLike, length: int = 16) -> str:
    """Hash of a file's bytes (first ``length`` hex digits): names caches derived from a checkpoint."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]
