"""Leave-one-out on the convex last layer: exact influence against exact refits.

The last layer (fc3, 84->10 plus bias, 850 parameters) on the trained network's frozen features is
multinomial logistic regression with L2 ``weight_decay/2 ||W||^2``; it is refit to the exact
optimum first (Newton, float64), influence uses the exact Hessian, and each leave-one-out refit is
solved to a gradient norm below ``tol`` (see :mod:`.logreg`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..engine.io import write_json_atomic
from .logreg import (
    fit_logreg,
    last_layer_inputs,
    logreg_hessian,
    logreg_influence,
    logreg_test_losses,
    refit_without,
)
from .metrics import pearson, spearman
from .store import CACHE_DIR, ResultCache, load_result, settings_key

log = logging.getLogger(__name__)

@dataclass
class ConvexLOOConfig:
    test_indices: tuple[int, ...] = (0, 1, 2, 3, 4)  # test images (indices into the test split)
    top_k: int = 50  # training images removed per test image: the largest |predicted influence|
    weight_decay: float | None = None  # L2 on fc3 (None: the checkpoint's training weight decay)
    tol: float = 1e-13  # stop each fit when max |gradient| of the objective is below this
    max_iter: int = 50  # Newton / chord iterations per fit at most

    def __post_init__(self):
        if len(self.test_indices) < 1 or any(i < 0 for i in self.test_indices):
            raise ValueError(f"test_indices must be non-negative and not empty, got {self.test_indices}")
        if self.top_k < 2:
            raise ValueError(f"top_k must be >= 2 (a correlation needs two points), got {self.top_k}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.tol > 0:
            raise ValueError(f"tol must be > 0, got {self.tol}")


def loo_convex(X, y, X_test, y_test, weight_decay: float, W0, config: ConvexLOOConfig, cache: ResultCache | None = None,
               progress: bool = True) -> dict:
    """Leave-one-out on multinomial logistic regression: predicted vs actual change of each test loss.

    ``X`` (N, D) and ``X_test`` (K, D) float64 inputs (bias column included), ``W0`` (C, D) a start.
    Returns per test image the removed indices, predicted and actual changes, and their Pearson.
    """
    from tqdm.auto import tqdm

    W, fit_info = fit_logreg(X, y, weight_decay, W0, tol=config.tol, max_iter=config.max_iter)
    log.info("full fit: %s", fit_info)
    H = logreg_hessian(W, X, weight_decay)
    H_chol = torch.linalg.cholesky(H)
    scores = logreg_influence(W, X, y, X_test, y_test, H)  # (K, N)
    base = logreg_test_losses(W, X_test, y_test)  # (K,)
    out = {"full_fit": fit_info, "test": []}
    worst_grad = 0.0
    for k in range(len(y_test)):
        top = torch.argsort(scores[k].abs(), descending=True)[: config.top_k]
        predicted, actual = [], []
        for j in tqdm(top.tolist(), desc=f"convex LOO, test image {k + 1}/{len(y_test)}", leave=False, disable=not progress):
            key = f"{k}:{j}"
            if cache is not None and key in cache:
                entry = cache[key]
            else:
                W_j, info = refit_without(X, y, weight_decay, W, H_chol, [j], tol=config.tol, max_iter=config.max_iter)
                entry = {"actual": float(logreg_test_losses(W_j, X_test[k : k + 1], y_test[k : k + 1])[0] - base[k]),
                         "grad_max": info["grad_max"], "iterations": info["iterations"]}
                if cache is not None:
                    cache.put(key, entry, flush=False)
            worst_grad = max(worst_grad, entry["grad_max"])
            predicted.append(float(scores[k, j]))
            actual.append(entry["actual"])
        if cache is not None:
            cache.flush()
        out["test"].append({"removed": top.tolist(), "predicted": predicted, "actual": actual,
                            "pearson": pearson(predicted, actual), "spearman": spearman(predicted, actual),
                            "test_loss": float(base[k])})
    out["worst_refit_grad_max"] = worst_grad
    return out


def run_loo_convex(checkpoint: str | os.PathLike, data, config: ConvexLOOConfig | None = None,
                   cache_dir: str | os.PathLike = CACHE_DIR, progress: bool = True) -> dict:
    """Experiment 1 on a trained checkpoint: the last layer on frozen features, exact Hessian."""
    from ..engine.hashing import file_sha256
    from ..study.checkpoints import load_checkpoint

    config = config or ConvexLOOConfig()
    start = time.perf_counter()
    model, meta = load_checkpoint(checkpoint)
    wd = config.weight_decay
    if wd is None:
        wd = float(meta.get("recipe", {}).get("weight_decay", 0.0))
    if wd <= 0:
        raise ValueError("the convex LOO needs weight_decay > 0 (a strictly convex objective); pass weight_decay")
    if max(config.test_indices) >= len(data.test):
        raise ValueError(f"test index {max(config.test_indices)} out of range (test split has {len(data.test)})")
    settings = {"experiment": "loo-convex", "checkpoint": file_sha256(checkpoint), "data_source": data.source,
                "n_train": len(data.train), **asdict(config), "weight_decay": wd}
    cache = ResultCache(Path(cache_dir) / f"loo-convex-{settings['checkpoint']}-{settings_key(settings)}.json", settings)
    done = load_result(cache.path.with_name(cache.path.stem + "-result.json"), settings)
    if done is not None:
        return done
    X = last_layer_inputs(model, data.train.images)
    y = data.train.labels
    idx = torch.tensor(config.test_indices)
    X_test = last_layer_inputs(model, data.test.images[idx])
    y_test = data.test.labels[idx]
    W0 = torch.cat([model.fc3.weight, model.fc3.bias[:, None]], dim=1).detach().double()
    result = loo_convex(X, y, X_test, y_test, wd, W0, config, cache=cache, progress=progress)
    result.update(settings=settings, test_indices=list(config.test_indices),
                  minutes=(time.perf_counter() - start) / 60)
    write_json_atomic(result, cache.path.with_name(cache.path.stem + "-result.json"))
    return result
