"""Where the experiments keep their results: resumable caches under ``data/validation/`` and result files.

Every cached result stores the settings it was made with and is reused only when they match.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from ..engine.io import write_json_atomic
from ..study.data import same_source

log = logging.getLogger(__name__)

CACHE_DIR = Path("data/validation")


SUMMARY_PATH = Path("results/validation.json")


ARRAYS_PATH = Path("results/validation_arrays.npz")


class ResultCache:
    """A JSON file of ``entries`` (key -> value) with the ``settings`` that produced them.

    A file made with other settings is ignored (and replaced on the next write), so a changed
    experiment never reads stale results; an interrupted run resumes from the entries written.
    """

    def __init__(self, path: str | os.PathLike, settings: dict):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings))  # normalise tuples -> lists
        self.entries: dict = {}
        if self.path.exists():
            try:
                blob = json.loads(self.path.read_text())
                if blob.get("settings") == self.settings:
                    self.entries = blob.get("entries", {})
                    log.info("resuming from %s (%d entries)", self.path, len(self.entries))
                else:
                    log.warning("%s was made with other settings; starting afresh", self.path)
            except (OSError, ValueError) as error:
                log.warning("ignoring unreadable cache %s (%s)", self.path, error)

    def __contains__(self, key) -> bool:
        return str(key) in self.entries

    def __getitem__(self, key):
        return self.entries[str(key)]

    def put(self, key, value, flush: bool = True) -> None:
        self.entries[str(key)] = value
        if flush:
            self.flush()

    def flush(self) -> None:
        write_json_atomic({"settings": self.settings, "entries": self.entries}, self.path)

    def absorb(self, paths) -> None:
        """Add the entries of other caches made with the same settings (e.g. a parallel worker's)."""
        for path in paths:
            try:
                blob = json.loads(Path(path).read_text())
            except (OSError, ValueError):
                continue
            if blob.get("settings") == self.settings:
                for key, value in blob.get("entries", {}).items():
                    self.entries.setdefault(key, value)


def _read_result(path: Path, matches) -> dict | None:
    """The JSON result at ``path`` if it exists, parses and ``matches(result["settings"])``; else None."""
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not matches(result.get("settings", {})):
        return None
    log.info("loaded finished result %s", path)
    return result


def load_result(path: Path, settings: dict) -> dict | None:
    """A finished experiment's result file if it was made with ``settings`` (else None): reruns are instant,
    and keep the minutes of the run that computed them."""
    wanted = json.loads(json.dumps(settings))
    return _read_result(path, lambda found: found == wanted)


def load_config_result(path: Path, config: dict, data_source: str) -> dict | None:
    """As :func:`load_result` for results whose ``settings`` hold the config's fields plus extras."""
    wanted = json.loads(json.dumps(config))
    return _read_result(
        path, lambda found: {k: found.get(k) for k in wanted} == wanted and same_source(found.get("data_source"), data_source)
    )


def settings_key(settings: dict, length: int = 10) -> str:
    """A short hash of a settings dict: names cache files after what made them."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
