"""Influence scores (Koh & Liang, ICML 2017): which training images help, and which harm, a prediction.

THE SIGN CONVENTION (the one place it is written down). For a test image t and a training
image j, with n training images, C the curvature (Hessian or GGN) of the mean training loss,
``weight_decay`` the training L2 coefficient and ``lambda`` the damping::

    score[t, j] = (1/n) * grad L(t)^T (C + weight_decay I + lambda I)^{-1} grad L(j)
                = (1/n) * s_test(t)^T grad_z(j)

the first-order prediction of how much the loss on t would *rise* if j were removed from the
training set and the model retrained (Koh & Liang's I_up,loss is ``-n`` times this).
Positive = helpful (removing j would raise the test loss); negative = harmful (removing j would
lower it). ``self_influence[j] = score[j, j]`` with t = j: large for atypical or mislabelled
images (Koh & Liang, Section 5.4).

nimarb's ``pytorch-influence-functions`` calls the opposite lists "harmful" and "helpful"; with
this convention :func:`top_k` returns ``helpful`` = largest scores, ``harmful`` = smallest.

Scores are computed by streaming training gradients (chunks of :func:`.gradients.iter_grad_z`)
against all ``s_test`` vectors at once: memory stays at one chunk of gradients plus (K, P).
:class:`InfluenceEngine` ties a model, its training split and a solver together and caches the
fitted curvature and the scores under ``data/influence/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .gradients import (
    DEFAULT_CHUNK,
    as_tensors,
    check_inputs,
    count_selected,
    data_length,
    grad_z,
    iter_grad_z,
)
from .solvers import InverseHVP

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def _n_classes(model: nn.Module, x: torch.Tensor) -> int | None:
    return getattr(model, "config", {}).get("n_classes") if hasattr(model, "config") else None


def s_test(
    model: nn.Module,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    solver: InverseHVP,
    layers: Sequence[str] | str | None = None,
) -> torch.Tensor:
    """``(C + weight_decay I + lambda I)^{-1} grad L(test)`` for each test example: (K, P).

    ``solver`` must already be fitted on the training set (same ``layers``).
    """
    check_inputs(test_x, test_y, _n_classes(model, test_x), what="test data")
    if solver.model is None:
        raise ValueError("fit the solver first: solver.fit(model, train_x, train_y, weight_decay)")
    layers = solver.layers if layers is None else layers
    p = next(model.parameters())
    g = grad_z(model, test_x.to(p.device, p.dtype), test_y.to(p.device), layers=layers)  # (K, P)
    return solver.inverse_hvp(g)


def influence(
    model: nn.Module,
    test_x: torch.Tensor | None,
    test_y: torch.Tensor | None,
    train,
    solver: InverseHVP,
    chunk_size: int = DEFAULT_CHUNK,
    progress: bool = False,
    stest: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores (n_test, n_train) with the module's sign convention (positive = helpful).

    ``train`` is the training split (or ``(x, y)``) the solver was fitted on; its gradients are
    streamed in chunks of ``chunk_size`` and never held all at once. ``stest`` may pass
    precomputed :func:`s_test` vectors (K, P) (any solver's, or nimarb's); then ``test_x`` and
    ``test_y`` may be None.
    """
    if stest is not None:
        stest = stest[None] if stest.ndim == 1 else stest
        if stest.shape[1] != count_selected(model, getattr(solver, "layers", None)):
            raise ValueError(f"stest must have shape (K, {count_selected(model, getattr(solver, 'layers', None))}), got {tuple(stest.shape)}")
    else:
        stest = s_test(model, test_x, test_y, solver)
    n = data_length(train)
    p = next(model.parameters())
    scores = torch.empty(len(stest), n, dtype=stest.dtype)
    for start, g in iter_grad_z(model, train, chunk_size, p.device, getattr(solver, "layers", None), p.dtype, progress, "scoring training images"):
        scores[:, start : start + len(g)] = (stest @ g.T).cpu()  # (K, B)
    return scores / n


def self_influence(
    model: nn.Module,
    train,
    solver: InverseHVP,
    chunk_size: int = DEFAULT_CHUNK,
    progress: bool = False,
) -> torch.Tensor:
    """``(1/n) grad L(j)^T (C + wd I + lambda I)^{-1} grad L(j)`` for every training example: (n,).

    Uses ``solver.quadratic_form`` (closed form and cheap for the fast solver; one inverse-HVP
    per training example otherwise).
    """
    n = data_length(train)
    p = next(model.parameters())
    out = torch.empty(n, dtype=p.dtype)
    basis = solver.basis()
    if basis is not None:  # the fast solver: only products with its (r, P) basis and squared norms
        for start, g in iter_grad_z(model, train, chunk_size, p.device, solver.layers, p.dtype, progress, "self-influence"):
            out[start : start + len(g)] = solver.quadratic_form_from_products(g @ basis.T, (g * g).sum(1)).cpu()
        return out / n
    for start, g in iter_grad_z(model, train, chunk_size, p.device, solver.layers, p.dtype, progress, "self-influence"):
        out[start : start + len(g)] = solver.quadratic_form(g).cpu()
    return out / n


@dataclass
class TopK:
    """The ``k`` most helpful and most harmful training images for each test image."""

    helpful: torch.Tensor  # (n_test, k) training indices, most helpful first (largest scores)
    helpful_scores: torch.Tensor  # (n_test, k)
    harmful: torch.Tensor  # (n_test, k) training indices, most harmful first (most negative scores)
    harmful_scores: torch.Tensor  # (n_test, k)


def top_k(scores: torch.Tensor, k: int = 10) -> TopK:
    """Top-k helpful (largest) and harmful (smallest) training indices per row of ``scores`` (n_test, n_train)."""
    if scores.ndim == 1:
        scores = scores[None]
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be between 1 and the number of training images ({scores.shape[1]}), got {k}")
    hs, hi = scores.topk(k, dim=1, largest=True)
    ls, li = scores.topk(k, dim=1, largest=False)
    return TopK(hi, hs, li, ls)


# ----------------------------------------------------------------------------- engine + cache

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
        if self.cache_dir is not None:
            from .checkpoints import file_sha256

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
    def cache_path(self, kind: str, extra: dict | None = None) -> Path | None:
        """``<cache_dir>/<kind>-<solver>-<hash of checkpoint, data, settings, extra>.pt`` (None: no cache)."""
        if self.cache_dir is None:
            return None
        blob = json.dumps({**self._key_parts, **(extra or {})}, sort_keys=True, default=str)
        key = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return self.cache_dir / f"{kind}-{self.solver.name}-{self._key_parts['checkpoint'][:8]}-{key}.pt"

    def _load(self, path: Path | None):
        if path is None or not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a foreign or damaged file: recompute
            log.warning("ignoring unreadable cache entry %s (%s)", path, error)
            return None

    def _save(self, obj, path: Path | None) -> None:
        if path is None:
            return
        from .data import atomic_torch_save

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(obj, path)

    # -- the work -------------------------------------------------------------------------
    def fit(self) -> InfluenceEngine:
        """Fit the solver's curvature once (from the cache when present)."""
        if self._fitted:
            return self
        path = self.cache_path("curvature")
        state = self._load(path)
        self.solver.fit(self.model, self.train, weight_decay=self.weight_decay, layers=self.layers, state=state or None,
                        progress=self.progress)
        if state is None:
            cached = self.solver.state_dict()
            if cached:
                self._save(cached, path)
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

    def scores(self, test_x: torch.Tensor, test_y: torch.Tensor) -> torch.Tensor:
        """Scores (n_test, n_train), positive = helpful (see the module docstring); cached."""
        check_inputs(test_x, test_y, _n_classes(self.model, test_x), what="test data")
        path = self.cache_path("scores", self._test_key(test_x, test_y))
        cached = self._load(path)
        if cached is not None:
            return cached["scores"]
        self.fit()
        out = influence(self.model, test_x, test_y, self.train, self.solver, self.chunk_size, self.progress)
        self._save({"scores": out}, path)
        return out

    def top_k(self, test_x: torch.Tensor, test_y: torch.Tensor, k: int = 10) -> TopK:
        """The ``k`` most helpful and harmful training indices (and scores) per test image."""
        return top_k(self.scores(test_x, test_y), k)

    def self_influence(self) -> torch.Tensor:
        """Self-influence (n_train,) of every training image; cached."""
        path = self.cache_path("self_influence")
        cached = self._load(path)
        if cached is not None:
            return cached["self_influence"]
        self.fit()
        out = self_influence(self.model, self.train, self.solver, self.chunk_size, self.progress)
        self._save({"self_influence": out}, path)
        return out


def pick_images(split, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised test images and labels for ``indices`` of a split, with a clear error when out of range."""
    n = data_length(split)
    idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    if len(idx) == 0:
        raise ValueError("no test indices given")
    bad = idx[(idx < 0) | (idx >= n)]
    if len(bad):
        raise ValueError(f"test index {int(bad[0])} is out of range: the test set has {n} images (0..{n - 1})")
    return as_tensors(split, idx)


# ----------------------------------------------------------------------------- command line

def register(subparsers) -> None:
    """``python -m influence_over_inference influence``: top-k helpful/harmful training images."""
    from dataclasses import fields

    from .solvers import SOLVERS

    p = subparsers.add_parser("influence", help="score every training image for some test images; print the top-k helpful and harmful")
    p.add_argument("--test-index", type=int, nargs="+", default=[0], help="test-set indices to explain (default: 0)")
    p.add_argument("--k", type=int, default=10, help="how many helpful and harmful training images to list (default: 10)")
    p.add_argument("--solver", default="fast", choices=sorted(SOLVERS), help="inverse-HVP solver (default: fast)")
    p.add_argument("--checkpoint", default="data/cifar_net.pt", help="trained model (default: data/cifar_net.pt)")
    p.add_argument("--data", default="auto", help="CIFAR-10 source, as for `train` (default: auto)")
    p.add_argument("--data-root", default="data", help="where torchvision data and caches live (default: data)")
    p.add_argument("--n-train", type=int, default=None, help="score only the first N training images (default: all)")
    p.add_argument("--cache-dir", default="data/influence", help="cache of fitted curvature and scores (default: data/influence)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--out", default="data/influence/report", help="writes <out>.json (top-k) and <out>.npz (all scores) (default: data/influence/report; the notebook owns results/influence.json)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    seen = set()
    for cls in SOLVERS.values():
        defaults = cls.settings_class()
        for f in fields(cls.settings_class):
            if f.name in seen:
                continue
            seen.add(f.name)
            kind = {"int": int, "float": float, "str": str, "int | None": int}.get(str(f.type), str)
            p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                           help=f"solver setting (default: the solver's own, e.g. {cls.name}: {getattr(defaults, f.name)})")
    p.set_defaults(func=cmd_influence)


def cmd_influence(args) -> int:
    import numpy as np

    from .checkpoints import load_checkpoint
    from .data import CLASSES, load_cifar10
    from .solvers import SOLVERS, make_solver

    if args.threads:
        torch.set_num_threads(args.threads)
    cls = SOLVERS[args.solver]
    from dataclasses import fields

    settings = {f.name: getattr(args, f.name) for f in fields(cls.settings_class) if getattr(args, f.name, None) is not None}
    solver = make_solver(args.solver, **settings)
    data = load_cifar10(args.data, root=args.data_root)
    model, meta = load_checkpoint(args.checkpoint)
    weight_decay = float(meta.get("recipe", {}).get("weight_decay", 0.0))
    train = data.train.subset(args.n_train)
    x, y = pick_images(data.test, args.test_index)
    if args.k > len(train):
        raise ValueError(f"--k {args.k} is larger than the number of training images ({len(train)})")
    engine = InfluenceEngine(model, train, solver, weight_decay=weight_decay, cache_dir=None if args.no_cache else args.cache_dir,
                             checkpoint=args.checkpoint, data_source=data.source, progress=True)
    import time

    start = time.perf_counter()
    scores = engine.scores(x, y)  # (K, n_train)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        pred = model(x).argmax(1)
    best = top_k(scores, args.k)
    report = {"checkpoint": args.checkpoint, "data_source": data.source, "n_train": len(train), "weight_decay": weight_decay,
              "solver": solver.describe(), "seconds": seconds,
              "sign": "score = predicted rise of the test loss if the training image were removed; positive = helpful",
              "tests": []}
    for row, t in enumerate(args.test_index):
        entry = {"test_index": t, "test_name": data.test.names[t], "label": CLASSES[int(y[row])], "predicted": CLASSES[int(pred[row])]}
        for kind, idx, val in (("helpful", best.helpful, best.helpful_scores), ("harmful", best.harmful, best.harmful_scores)):
            entry[kind] = [{"index": int(i), "class": CLASSES[int(train.labels[i])], "name": train.names[int(i)], "score": float(s)}
                           for i, s in zip(idx[row], val[row], strict=True)]
        report["tests"].append(entry)
        print(f"\ntest image {t} ({entry['test_name']}): label {entry['label']}, predicted {entry['predicted']}")  # noqa: T201 (CLI output)
        for kind in ("helpful", "harmful"):
            print(f"  most {kind}:")  # noqa: T201
            print(f"    {'rank':>4} {'index':>6} {'class':<11} {'score':>11}  file")  # noqa: T201
            for r, e in enumerate(entry[kind], 1):
                print(f"    {r:>4} {e['index']:>6} {e['class']:<11} {e['score']:>11.3e}  {e['name']}")  # noqa: T201
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".json.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out.with_suffix(".json"))
    tmp_npz = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(tmp_npz, scores=scores.float().numpy(), test_index=np.asarray(args.test_index), labels=y.numpy())
    os.replace(tmp_npz, out.with_suffix(".npz"))
    print(f"\nscores of {len(args.test_index)} test x {len(train)} training images in {seconds:.1f} s "  # noqa: T201
          f"({solver.name}); wrote {out.with_suffix('.json')} and {out.with_suffix('.npz')}")
    return 0
