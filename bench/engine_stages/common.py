"""What every benchmark stage shares: the repository root, the model and data, test images, streamed scoring."""

from __future__ import annotations

import hashlib
import json
import logging
import resource
from dataclasses import asdict
from pathlib import Path

import torch

from influence_over_inference.engine.hashing import file_sha256
from influence_over_inference.engine.io import write_text_atomic
from influence_over_inference.study.checkpoints import load_checkpoint
from influence_over_inference.study.data import load_cifar10

from .config import BenchConfig

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parents[2]  # the repository


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux


def _load(cfg: BenchConfig):
    data = load_cifar10(root=str(ROOT / "data"))
    model, meta = load_checkpoint(ROOT / cfg.checkpoint)
    wd = float(meta.get("recipe", {}).get("weight_decay", 0.0))
    train = random_subset(data.train, cfg.n_train, cfg.seed)  # all 50,000 unless --quick
    return data, model.eval(), wd, train


def random_subset(split, n: int | None, seed: int):
    """A seeded random subset of ``n`` images (all if None), in index order. Not ``split.subset(n)``:
    that takes the first n, and the folder source is ordered by class (the first 5,000 are airplanes)."""
    from influence_over_inference.study.data import CIFAR10Split

    if n is None or n >= len(split):
        return split
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return CIFAR10Split(split.images[idx], split.labels[idx], [split.names[i] for i in idx.tolist()])


def _test(data, cfg, n):
    return data.test.tensors(torch.arange(n))


def _scores_for(model, s_vectors, train, solver_like):
    """Our streamed scores (K, n) for given s_test vectors (project sign, 1/n included)."""
    from influence_over_inference.engine.scores import influence

    x0 = torch.zeros(len(s_vectors), 3, 32, 32)
    y0 = torch.zeros(len(s_vectors), dtype=torch.long)
    return influence(model, x0, y0, train, solver_like, stest=s_vectors)


def _lissa_like(model, train, wd):
    """A fitted (matrix-free, instant) solver, for the streaming scorer's bookkeeping."""
    from influence_over_inference.engine.solvers.registry import make_solver

    return make_solver("lissa").fit(model, train, weight_decay=wd)


def _key(cfg: BenchConfig, quick: bool) -> str:
    ck = ROOT / cfg.checkpoint
    blob = json.dumps({"ck": file_sha256(ck), "cfg": asdict(cfg), "quick": quick}, sort_keys=True, default=str)
    return ("quick-" if quick else "") + hashlib.sha256(blob.encode()).hexdigest()[:12]


def _cache_dir(cfg, quick) -> Path:
    d = ROOT / "data" / "bench" / _key(cfg, quick)
    d.mkdir(parents=True, exist_ok=True)
    return d


def _write_json(obj, path: Path):
    write_text_atomic(json.dumps(obj, indent=2, default=float) + "\n", path)
