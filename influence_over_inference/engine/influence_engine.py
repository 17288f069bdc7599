""":class:`InfluenceEngine`: a model, its training data and a solver, with results cached on disk.

The scores themselves (and their sign convention) are in :mod:`.scores`; this module adds the
caching of the fitted curvature, the scores and self-influence, keyed by the checkpoint's bytes,
the data's identity and every setting, written atomically. Under ``torch.distributed`` the same
calls run on every rank (:mod:`.distributed`): rank 0 decides whether a cache entry exists, reads
and writes it, and receives the results; other ranks take part in the work and get None.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .distributed import broadcast_object, is_distributed, is_main
from .gradients import DEFAULT_CHUNK
from .params import check_inputs, data_length
from .scores import TopK, _n_classes, influence, s_test, self_influence, top_k
from .solvers.base import InverseHVP

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: entries store their own key



class InfluenceEngine:
    """A model, its training split and a solver, with results cached under ``cache_dir``.

    ``engine = InfluenceEngine(model, data.train, make_solver("fast"), weight_decay=5e-4,
    checkpoint="data/cifar_net.pt", data_source=data.source)``; then ``engine.scores(x, y)``
    (n_test, n_train), ``engine.top_k(x, y, k)``, ``engine.self_influence()``. Cache keys hash
    the checkpoint file (``file_sha256``), the data source, the training-set size, the layers
    and the solver's settings; entries are written atomically (temp file + rename), so an
    interrupted computation never leaves a corrupt one. No ``checkpoint``: no caching.
    """

    def __init__(
        self,
        model: nn.Module,
        train,
        solver: InverseHVP,
        weight_decay: float = 0.0,
        layers: Sequence[str] | str | None = None,
        cache_dir: str | os.PathLike | None = "data/influence",
        checkpoint: str | os.PathLike | None = None,
        data_source: str | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        progress: bool = True,
    ):
        self.model = model.eval()
        self.train = train
        self.solver = solver
        self.weight_decay = weight_decay
        self.layers = layers
        self.chunk_size = chunk_size
        self.progress = progress
        self.cache_dir = Path(cache_dir) if (cache_dir and checkpoint) else None
        self._key_parts = None
        self.scores_from_cache = False  # whether the last scores() call read them from the cache (not computed)
        if self.cache_dir is not None:
            from .hashing import file_sha256

            self._key_parts = {
                "version": CACHE_VERSION,
                "checkpoint": file_sha256(checkpoint),
                "data_source": data_source or getattr(train, "source", "unknown"),
                "n_train": data_length(train),
                "weight_decay": weight_decay,
                "layers": layers if layers is None or isinstance(layers, str) else list(layers),
                "solver": solver.describe(),
            }
        self._fitted = False

    # -- cache helpers --------------------------------------------------------------------
    def cache_key(self, kind: str, extra: dict | None = None) -> str:
        """The full key of one cache entry: a hash of its kind, checkpoint, data, settings and ``extra``."""
        blob = json.dumps({"kind": kind, **self._key_parts, **(extra or {})}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def cache_path(self, kind: str, extra: dict | None = None) -> Path | None:
        """``<cache_dir>/<kind>-<solver>-<hash of checkpoint, data, settings, extra>.pt`` (None: no cache)."""
        if self.cache_dir is None:
            return None
        key = self.cache_key(kind, extra)[:16]
        return self.cache_dir / f"{kind}-{self.solver.name}-{self._key_parts['checkpoint'][:8]}-{key}.pt"

    def _load(self, kind: str, extra: dict | None = None, everywhere: bool = False):
        """The entry's value if it exists, is readable and stores this entry's own key; else None.

        Under torch.distributed rank 0 reads it and every rank learns whether it exists: with
        ``everywhere`` every rank gets its contents, otherwise the other ranks get ``{}`` (found) or
        None, so that all take the same branch."""
        entry = self._read(kind, extra) if is_main() else None
        if not is_distributed():
            return entry
        if everywhere:
            return broadcast_object(entry)
        found = broadcast_object(entry is not None)
        return entry if is_main() else ({} if found else None)

    def _read(self, kind: str, extra: dict | None = None):
        path = self.cache_path(kind, extra)
        if path is None or not path.is_file():
            return None
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(blob, dict) or blob.get("key") != self.cache_key(kind, extra):
                raise ValueError("it was stored under another key")
            return blob["value"]
        except Exception as error:  # a foreign, misplaced or damaged file: recompute
            log.warning("ignoring cache entry %s (%s)", path.name, str(error).splitlines()[0] if str(error) else type(error).__name__)
            return None

    def _save(self, obj, kind: str, extra: dict | None = None) -> None:
        path = self.cache_path(kind, extra)
        if path is None or not is_main():
            return
        from .io import atomic_torch_save

        atomic_torch_save({"key": self.cache_key(kind, extra), "value": obj}, path)

    # -- the work -------------------------------------------------------------------------
    def fit(self) -> InfluenceEngine:
        """Fit the solver's curvature once (from the cache when present)."""
        if self._fitted:
            return self
        state = self._load("curvature", everywhere=True)  # every rank loads a cached fit, or every rank fits
        self.solver.fit(self.model, self.train, weight_decay=self.weight_decay, layers=self.layers, state=state or None,
                        progress=self.progress)
        if state is None:
            cached = self.solver.state_dict()
            if cached:
                self._save(cached, "curvature")
        self._fitted = True
        return self

    def _test_key(self, test_x: torch.Tensor, test_y: torch.Tensor) -> dict:
        h = hashlib.sha256(test_x.detach().cpu().contiguous().numpy().tobytes())
        h.update(test_y.detach().cpu().contiguous().numpy().tobytes())
        return {"test": h.hexdigest()[:16]}

    def s_test(self, test_x: torch.Tensor, test_y: torch.Tensor) -> torch.Tensor:
        """(K, P) inverse-HVPs of the test gradients."""
        self.fit()
        return s_test(self.model, test_x, test_y, self.solver)

    def scores(self, test_x: torch.Tensor, test_y: torch.Tensor) -> torch.Tensor | None:
        """Scores (n_test, n_train), positive = helpful (see the module docstring); cached.

        Under torch.distributed: on rank 0; None on the other ranks."""
        check_inputs(test_x, test_y, _n_classes(self.model, test_x), what="test data")
        test_key = self._test_key(test_x, test_y)
        cached = self._load("scores", test_key)
        if cached is not None and (not cached or tuple(cached["scores"].shape) == (len(test_x), data_length(self.train))):
            self.scores_from_cache = True  # a caller timing this call timed a file read, and can say so
            return cached.get("scores")
        self.scores_from_cache = False
        self.fit()
        out = influence(self.model, test_x, test_y, self.train, self.solver, self.chunk_size, self.progress)
        if out is not None:
            self._save({"scores": out}, "scores", test_key)
        return out

    def top_k(self, test_x: torch.Tensor, test_y: torch.Tensor, k: int = 10) -> TopK | None:
        """The ``k`` most helpful and harmful training indices (and scores) per test image (None off rank 0)."""
        scores = self.scores(test_x, test_y)
        return None if scores is None else top_k(scores, k)

    def perturbation(self, test_x: torch.Tensor, test_y: torch.Tensor, train_indices) -> torch.Tensor:
        """Perturbation-influence maps (n_test, len(train_indices), *input shape) of the named training images.

        ``<map[t, j], delta>`` predicts the rise of test image t's loss if training image j's
        normalised input became ``x_j + delta`` (sign: see :mod:`.perturbation`). Not cached.
        """
        from .params import as_tensors
        from .perturbation import perturbation_influence

        x, y = as_tensors(self.train, torch.as_tensor(train_indices, dtype=torch.long).reshape(-1))
        return perturbation_influence(self.model, self.s_test(test_x, test_y), x, y, data_length(self.train),
                                      self.layers)

    def self_influence(self) -> torch.Tensor | None:
        """Self-influence (n_train,) of every training image; cached (None off rank 0 under torch.distributed)."""
        cached = self._load("self_influence")
        if cached is not None and (not cached or tuple(cached["self_influence"].shape) == (data_length(self.train),)):
            return cached.get("self_influence")
        self.fit()
        out = self_influence(self.model, self.train, self.solver, self.chunk_size, self.progress)
        if out is not None:
            self._save({"self_influence": out}, "self_influence")
        return out
