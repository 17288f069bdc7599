"""Leave-one-out checks of influence: the convex last layer, the whole network, and the sign.

Koh & Liang (ICML 2017, §2-§5.1) check influence functions against leave-one-out retraining:
remove one training image, retrain, measure the change in a test image's loss, and compare with the
prediction ``score = (1/n) g_test^T (H + lambda I)^{-1} g_train`` (this project's sign: positive =
removing the image raises the test loss = helpful).

- :func:`run_loo_convex`: the last layer (fc3, 84->10 plus bias, 850 parameters) on the trained
  network's frozen features is multinomial logistic regression with L2 ``weight_decay/2 ||W||^2``
  (the training weight decay). It is refit to the exact optimum first (Newton, float64), influence
  uses the exact Hessian, and each leave-one-out refit is solved to a gradient norm below ``tol``
  (Newton's equations with the full optimum's Hessian, iterated: the chord method, which converges
  to the exact optimum of the leave-one-out objective).
- :func:`run_loo_network`: Koh & Liang's protocol for the whole network (:mod:`.retraining`): a
  model trained on a documented class-balanced subset, every removal retrained from the trained
  parameters with the same seed and data order, minus a control run. The engine's solvers (CG,
  LiSSA, fast) predict; the actual changes are shared.
- :func:`run_sign`: remove the 100 most harmful (or most helpful) training images of a
  misclassified test image, retrain, and see its test loss fall (or rise).

"Removing" image ``j`` means setting its weight in the training objective to zero while every other
image keeps weight ``1/n`` (the ``epsilon = -1/n`` perturbation that influence predicts).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .retraining import (
    RetrainConfig,
    data_order,
    losses_and_predictions,
    retrain,
    subset_split,
    test_losses,
    train_subset_model,
)
from .validation import (
    CACHE_DIR,
    ResultCache,
    load_config_result,
    load_result,
    pearson,
    settings_key,
    spearman,
    write_json_atomic,
)

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# 1. Leave-one-out, convex case: the last layer as multinomial logistic regression
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def last_layer_inputs(model: nn.Module, images: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
    """fc3's inputs with a column of ones for the bias: uint8 (N, 32, 32, 3) -> float64 (N, 85)."""
    from .data import normalize_uint8

    model = model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        out.append(model.features(normalize_uint8(images[start : start + batch_size])).double())
    feats = torch.cat(out)  # (N, 84)
    return torch.cat([feats, torch.ones(len(feats), 1, dtype=torch.float64)], dim=1)  # (N, 85)


def logreg_loss(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor, weight_decay: float, weights=None) -> torch.Tensor:
    """Objective ``sum_i w_i CE(W x_i, y_i) + weight_decay/2 ||W||^2`` (w_i = 1/n by default)."""
    ce = nn.functional.cross_entropy(X @ W.T, y, reduction="none")  # (N,)
    w = torch.full_like(ce, 1.0 / len(y)) if weights is None else weights
    return (w * ce).sum() + 0.5 * weight_decay * (W * W).sum()


def logreg_grad(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor, weight_decay: float, weights=None) -> torch.Tensor:
    """Gradient of :func:`logreg_loss` w.r.t. ``W`` (C, D), in closed form: ``(P - Y)^T diag(w) X + wd W``."""
    P = torch.softmax(X @ W.T, dim=1)  # (N, C)
    P[torch.arange(len(y)), y] -= 1.0
    w = torch.full((len(y),), 1.0 / len(y), dtype=X.dtype) if weights is None else weights
    return (P * w[:, None]).T @ X + weight_decay * W  # (C, D)


def logreg_hessian(W: torch.Tensor, X: torch.Tensor, weight_decay: float, chunk: int = 10_000) -> torch.Tensor:
    """Exact Hessian of :func:`logreg_loss` (uniform weights) w.r.t. ``W.flatten()``: (C*D, C*D).

    ``(1/n) sum_i (diag(p_i) - p_i p_i^T) kron x_i x_i^T + weight_decay I``, streamed in chunks.
    """
    n, d = X.shape
    c = W.shape[0]
    H = torch.zeros(c * d, c * d, dtype=X.dtype)
    for start in range(0, n, chunk):
        x = X[start : start + chunk]
        p = torch.softmax(x @ W.T, dim=1)  # (B, C)
        z = (p[:, :, None] * x[:, None, :]).reshape(len(x), c * d)  # rows p_i kron x_i
        H -= z.T @ z
        for k in range(c):
            H[k * d : (k + 1) * d, k * d : (k + 1) * d] += (x * p[:, k : k + 1]).T @ x
    H /= n
    H += weight_decay * torch.eye(c * d, dtype=X.dtype)
    return H


def fit_logreg(X, y, weight_decay: float, W0: torch.Tensor, tol: float = 1e-12, max_iter: int = 100) -> tuple[torch.Tensor, dict]:
    """Newton's method with backtracking to the optimum of :func:`logreg_loss`; stops at ``max|grad| <= tol``."""
    W = W0.clone().double()
    for it in range(max_iter):
        g = logreg_grad(W, X, y, weight_decay)
        gnorm = float(g.abs().max())
        if gnorm <= tol:
            return W, {"iterations": it, "grad_max": gnorm}
        H = logreg_hessian(W, X, weight_decay)
        step = torch.linalg.solve(H, g.flatten()).reshape(W.shape)
        f0 = float(logreg_loss(W, X, y, weight_decay))
        t = 1.0
        while t > 1e-10:
            W_new = W - t * step
            if float(logreg_loss(W_new, X, y, weight_decay)) <= f0 - 1e-4 * t * float(g.flatten() @ step.flatten()):
                break
            t *= 0.5
        if t <= 1e-10:  # no decrease representable in float64: at the optimum up to rounding
            return W, {"iterations": it, "grad_max": gnorm}
        W = W_new
    g = logreg_grad(W, X, y, weight_decay)
    return W, {"iterations": max_iter, "grad_max": float(g.abs().max())}


def refit_without(X, y, weight_decay: float, W_full: torch.Tensor, H_chol: torch.Tensor, remove, tol: float = 1e-12,
                  max_iter: int = 50) -> tuple[torch.Tensor, dict]:
    """The exact optimum with the images ``remove`` given weight zero (the others keep ``1/n``).

    Iterates ``W <- W - H_full^{-1} grad F_{-j}(W)`` from the full optimum (the chord method: Newton's
    equations with the full optimum's Hessian, ``H_chol`` its Cholesky factor) until the gradient of
    the leave-out objective is below ``tol`` (max abs). It converges linearly with a contraction
    factor of order ``1/n``, so a few iterations reach float64 rounding.
    """
    n = len(y)
    w = torch.full((n,), 1.0 / n, dtype=X.dtype)
    w[torch.as_tensor(remove)] = 0.0
    W = W_full.clone()
    gnorm = float("inf")
    for it in range(max_iter):
        g = logreg_grad(W, X, y, weight_decay, weights=w)
        gnorm = float(g.abs().max())
        if gnorm <= tol:
            return W, {"iterations": it, "grad_max": gnorm}
        W = W - torch.cholesky_solve(g.reshape(-1, 1), H_chol).reshape(W.shape)
    return W, {"iterations": max_iter, "grad_max": gnorm}


def logreg_test_losses(W, X_test, y_test) -> torch.Tensor:
    """Per-image cross-entropy of the logistic regression ``W`` on test inputs."""
    return nn.functional.cross_entropy(X_test @ W.T, y_test, reduction="none")


def logreg_influence(W, X, y, X_test, y_test, H: torch.Tensor) -> torch.Tensor:
    """Exact influence scores (n_test, n_train): ``(1/n) g_test^T H^{-1} g_train`` (positive = helpful)."""
    n = len(y)
    c, d = W.shape
    P_test = torch.softmax(X_test @ W.T, dim=1)
    P_test[torch.arange(len(y_test)), y_test] -= 1.0
    G_test = (P_test[:, :, None] * X_test[:, None, :]).reshape(len(y_test), c * d)  # (K, C*D)
    S = torch.linalg.solve(H, G_test.T).T.reshape(len(y_test), c, d)  # s_test, (K, C, D)
    R = torch.softmax(X @ W.T, dim=1)
    R[torch.arange(n), y] -= 1.0  # (N, C): g_j = r_j kron x_j
    return torch.einsum("kcd,nc,nd->kn", S, R, X) / n


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
    from .checkpoints import file_sha256, load_checkpoint

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


# ----------------------------------------------------------------------------------------------
# 2. Leave-one-out, whole network (Koh & Liang's protocol) on a class-balanced subset
# ----------------------------------------------------------------------------------------------

# Settings sized for a 2-core CPU (measured: one GGN-vector product over 1,000 images ~1 s).
DEFAULT_SOLVER_SETTINGS = {
    "cg": {"curvature": "ggn", "tol": 1e-4, "max_iter": 100, "n_samples": 1000},  # curvature on a fixed subsample
    "lissa": {"curvature": "ggn", "scale": 100.0, "depth": 2000, "batch_size": 32},  # scale > largest eigenvalue (~20)
    "fast": {"rank": 500, "n_samples": 500},
}


@dataclass
class NetworkLOOConfig:
    n_per_class: int = 500  # training subset: the first 500 images of each class (5,000, as Koh & Liang's 5,500)
    train_epochs: int = 30  # epochs of our TrainConfig recipe for the subset model (otherwise the defaults)
    test_indices: tuple[int, ...] = (0, 1000, 2000)  # test images (in the folder copy: the first airplane, car, bird)
    top_k: int = 50  # training images removed per test image: the largest |score| of select_by
    solvers: tuple[str, ...] = ("cg", "lissa", "fast")  # solvers whose predictions are compared
    select_by: str = "cg"  # the solver whose ranking chooses the removed images
    damping: float | None = None  # lambda of every solver; None: 1 / retrain.horizon (see RetrainConfig.horizon)
    solver_settings: dict = field(default_factory=lambda: {k: dict(v) for k, v in DEFAULT_SOLVER_SETTINGS.items()})
    retrain: RetrainConfig = field(default_factory=RetrainConfig)  # the retraining protocol

    def __post_init__(self):
        if isinstance(self.retrain, dict):
            self.retrain = RetrainConfig(**self.retrain)
        if self.n_per_class < 1 or self.train_epochs < 1:
            raise ValueError("n_per_class and train_epochs must be >= 1")
        if len(self.test_indices) < 1 or any(i < 0 for i in self.test_indices):
            raise ValueError(f"test_indices must be non-negative and not empty, got {self.test_indices}")
        if self.top_k < 2:
            raise ValueError(f"top_k must be >= 2, got {self.top_k}")
        if self.select_by not in self.solvers:
            raise ValueError(f"select_by={self.select_by!r} must be one of solvers={self.solvers}")
        if self.damping is None:
            self.damping = round(1.0 / self.retrain.horizon, 4)
        if not self.damping >= 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}")


def _solver_scores(model, train_split, test_x, test_y, name: str, settings: dict, damping: float, weight_decay: float,
                   checkpoint, data_source: str, progress: bool, cache_dir: str | os.PathLike = CACHE_DIR
                   ) -> tuple[torch.Tensor, float]:
    """Influence scores (K, N) of one engine solver (cached by the engine) and the seconds they took."""
    from .influence import InfluenceEngine
    from .solvers import LiSSADivergenceError, make_solver

    start = time.perf_counter()
    settings = dict(settings)
    # seconds of the run that computed these scores (the engine caches scores, not timings)
    timing_path = Path(cache_dir) / "influence" / "solver-seconds.json"
    key = settings_key({"name": name, "settings": settings, "damping": damping, "checkpoint": str(checkpoint),
                        "test": hashlib.sha256(test_x.numpy().tobytes() + test_y.numpy().tobytes()).hexdigest()})
    timings = json.loads(timing_path.read_text()) if timing_path.exists() else {}

    def seconds() -> float:
        took = time.perf_counter() - start
        if took > 5.0 or key not in timings:
            write_json_atomic({**timings, key: took}, timing_path)
            return took
        return timings[key]

    for attempt in range(4):
        solver = make_solver(name, damping=damping, **settings)
        engine = InfluenceEngine(model, train_split, solver, weight_decay=weight_decay, cache_dir=Path(cache_dir) / "influence",
                                 checkpoint=checkpoint, data_source=data_source, progress=progress)
        try:
            if name == "fast":  # closed form: all test images in one pass over the training gradients
                scores = engine.scores(test_x, test_y).double()
                return scores, seconds()
            # iterative solvers one test image at a time: batched curvature products are slower than a loop here
            scores = torch.cat([engine.scores(test_x[k : k + 1], test_y[k : k + 1]).double() for k in range(len(test_y))])
            return scores, seconds()
        except LiSSADivergenceError as error:
            if attempt == 3:
                raise
            log.warning("LiSSA diverged at scale %s (%s); doubling the scale", settings.get("scale"), error)
            settings["scale"] = 2 * float(settings.get("scale", 100.0))
    raise AssertionError("unreachable")


def loo_retrain_actuals(model, x, y, x_test, y_test, removals: list[int], config: RetrainConfig, cache: ResultCache,
                        progress: bool = True, partners=()) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Test losses of the control run (K,) and of one retraining per removed index (K,) each, cached per run.

    ``partners``: cache files of parallel workers (same settings), read before each run so no run is repeated.
    """
    from tqdm.auto import tqdm

    order = data_order(len(y), config.steps, config.batch_size, torch.Generator().manual_seed(config.seed))
    cache.absorb(partners)
    for key in [k for k, v in cache.entries.items() if len(v) != len(y_test)]:  # made for other test images
        del cache.entries[key]
    if "control" not in cache:
        control = retrain(model, x, y, torch.ones(len(y)), config, order)
        cache.put("control", test_losses(control, x_test, y_test).tolist())
    out = {}
    for j in tqdm(removals, desc="leave-one-out retraining", disable=not progress):
        cache.absorb(partners)
        if j not in cache or len(cache[j]) != len(y_test):
            w = torch.ones(len(y))
            w[j] = 0.0
            cache.put(j, test_losses(retrain(model, x, y, w, config, order), x_test, y_test).tolist())
        out[j] = np.asarray(cache[j])
    cache.flush()
    return np.asarray(cache["control"]), out


def run_loo_network(data, config: NetworkLOOConfig | None = None, cache_dir: str | os.PathLike = CACHE_DIR,
                    progress: bool = True, worker: int = 0, workers: int = 1) -> dict | None:
    """Experiment 2: remove each top-``k`` training image, retrain from the trained parameters, minus control.

    ``workers > 1``: start one process per worker (``worker`` 0 .. workers-1, after worker 0 has the
    scores); each retrains from its own place in the list into its own cache file and skips the runs
    the others finished. Worker 0 waits for nothing, finishes whatever is left and writes the result;
    the others return None.
    """
    from .checkpoints import file_sha256
    from .data import normalize_uint8
    from .training import TrainConfig

    config = config or NetworkLOOConfig()
    result_path = Path(cache_dir) / f"loo-network-result-{settings_key(asdict(config))}.json"
    done = load_config_result(result_path, asdict(config), data.source)
    if done is not None:
        return done
    start = time.perf_counter()
    train_config = TrainConfig(epochs=config.train_epochs, threads=torch.get_num_threads())
    model, ckpt, indices = train_subset_model(data, config.n_per_class, train_config, cache_dir, progress)
    split = subset_split(data.train, indices)
    wd = train_config.weight_decay
    idx = torch.tensor(config.test_indices)
    if int(idx.max()) >= len(data.test):
        raise ValueError(f"test index {int(idx.max())} out of range (test split has {len(data.test)})")
    x_test, y_test = normalize_uint8(data.test.images[idx]), data.test.labels[idx]
    timings = {"train_subset_model_minutes": (time.perf_counter() - start) / 60}
    scores = {}

    def score(name: str) -> None:
        scores[name], seconds = _solver_scores(model, split, x_test, y_test, name, config.solver_settings.get(name, {}),
                                               config.damping, wd, ckpt, data.source, progress, cache_dir)
        timings[f"{name}_seconds"] = seconds
        log.info("%s scores: %.1f s", name, seconds)

    score(config.select_by)  # the ranking that chooses the removals first; the other solvers after retraining
    chosen = [torch.argsort(scores[config.select_by][k].abs(), descending=True)[: config.top_k].tolist()
              for k in range(len(idx))]
    removals = list(dict.fromkeys(j for c in chosen for j in c))  # test image 0's first, no repeats
    settings = {"experiment": "loo-network", "checkpoint": file_sha256(ckpt), "data_source": data.source,
                "subset_indices_sha": settings_key({"i": indices.tolist()}), "retrain": asdict(config.retrain),
                "test_indices": list(config.test_indices)}
    base_path = Path(cache_dir) / f"loo-network-runs-{settings_key(settings)}.json"
    paths = [base_path] + [base_path.with_name(f"{base_path.stem}-worker{w}.json") for w in range(1, workers)]
    cache = ResultCache(paths[worker], settings)
    retrain_start = time.perf_counter()
    x, y = normalize_uint8(split.images), split.labels
    mine = removals[worker * len(removals) // workers :] + removals[: worker * len(removals) // workers]
    control, losses = loo_retrain_actuals(model, x, y, x_test, y_test, mine, config.retrain, cache, progress,
                                          partners=[p for p in paths if p != paths[worker]])
    if worker != 0:
        return None
    timings["retrain_minutes"] = (time.perf_counter() - retrain_start) / 60
    for name in config.solvers:
        if name not in scores:
            score(name)
    base = test_losses(model, x_test, y_test).numpy()
    result = {"settings": {**asdict(config), "n_train": len(y), "data_source": data.source, "weight_decay": wd,
                           "retrain_horizon": config.retrain.horizon, "subset_model": str(ckpt)},
              "test_indices": list(config.test_indices), "base_test_loss": base.tolist(),
              "control_test_loss": control.tolist(), "test": []}
    for k in range(len(idx)):
        actual = np.array([losses[j][k] - control[k] for j in chosen[k]])
        entry = {"removed": chosen[k], "actual": actual.tolist(), "label": int(y_test[k]), "predicted": {},
                 "pearson": {}, "spearman": {}}
        for name in config.solvers:
            pred = scores[name][k, chosen[k]].numpy()
            entry["predicted"][name] = pred.tolist()
            entry["pearson"][name] = pearson(pred, actual)
            entry["spearman"][name] = spearman(pred, actual)
        result["test"].append(entry)
    timings["minutes"] = (time.perf_counter() - start) / 60
    result["timings"] = timings
    result["minutes"] = timings["minutes"]
    write_json_atomic(result, result_path)
    return result


# ----------------------------------------------------------------------------------------------
# 4. The sign, by retraining: remove the most harmful (helpful) images of misclassified test images
# ----------------------------------------------------------------------------------------------


@dataclass
class SignConfig:
    n_test: int = 10  # misclassified test images: the first n_test the subset model gets wrong
    n_remove: int = 100  # training images removed per test image and direction
    solver: str = "fast"  # the ranking under test (the engine's default for many test images)
    damping: float | None = None  # lambda of the solver; None: 1 / retrain.horizon, as the network leave-one-out
    solver_settings: dict = field(default_factory=lambda: dict(DEFAULT_SOLVER_SETTINGS["fast"]))
    n_per_class: int = 500  # the same class-balanced subset model as the network leave-one-out
    train_epochs: int = 30  # epochs of the subset model
    # 100 removals move the model further than one: a larger step (horizon 6) shows the effect clearly
    retrain: RetrainConfig = field(default_factory=lambda: RetrainConfig(lr=0.002))

    def __post_init__(self):
        if isinstance(self.retrain, dict):
            self.retrain = RetrainConfig(**self.retrain)
        if self.n_test < 1 or self.n_remove < 1:
            raise ValueError(f"n_test and n_remove must be >= 1, got {self.n_test} and {self.n_remove}")
        if self.damping is None:
            self.damping = round(1.0 / self.retrain.horizon, 4)


def run_sign(data, config: SignConfig | None = None, cache_dir: str | os.PathLike = CACHE_DIR,
             progress: bool = True) -> dict:
    """Experiment 4: remove each misclassified test image's ``n_remove`` most harmful (helpful) images, retrain."""
    from tqdm.auto import tqdm

    from .checkpoints import file_sha256
    from .data import normalize_uint8
    from .training import TrainConfig

    config = config or SignConfig()
    result_path = Path(cache_dir) / f"sign-result-{settings_key(asdict(config))}.json"
    done = load_config_result(result_path, asdict(config), data.source)
    if done is not None:
        return done
    start = time.perf_counter()
    train_config = TrainConfig(epochs=config.train_epochs, threads=torch.get_num_threads())
    model, ckpt, indices = train_subset_model(data, config.n_per_class, train_config, cache_dir, progress)
    split = subset_split(data.train, indices)
    x_all, y_all = normalize_uint8(data.test.images), data.test.labels
    _, pred_all = losses_and_predictions(model, x_all, y_all)
    wrong = np.nonzero(pred_all != y_all.numpy())[0][: config.n_test]
    idx = torch.as_tensor(wrong)
    x_test, y_test = x_all[idx], y_all[idx]
    scores, seconds = _solver_scores(model, split, x_test, y_test, config.solver, config.solver_settings,
                                     config.damping, train_config.weight_decay, ckpt, data.source, progress,
                                     cache_dir)
    harmful = torch.argsort(scores, dim=1)[:, : config.n_remove]  # most negative first
    helpful = torch.argsort(scores, dim=1, descending=True)[:, : config.n_remove]
    settings = {"experiment": "sign", "checkpoint": file_sha256(ckpt), "data_source": data.source,
                "test": wrong.tolist(), "harmful": harmful.tolist(), "helpful": helpful.tolist(),
                "retrain": asdict(config.retrain)}
    cache = ResultCache(Path(cache_dir) / f"sign-runs-{settings_key(settings)}.json", settings)
    x, y = normalize_uint8(split.images), split.labels
    order = data_order(len(y), config.retrain.steps, config.retrain.batch_size,
                       torch.Generator().manual_seed(config.retrain.seed))
    runs = [("control", None)] + [(f"{kind}:{k}", rows[k]) for k in range(len(idx))
                                  for kind, rows in (("harmful", harmful), ("helpful", helpful))]
    for key, removed in tqdm(runs, desc="sign retraining", disable=not progress):
        if key not in cache:
            w = torch.ones(len(y))
            if removed is not None:
                w[removed] = 0.0
            losses, preds = losses_and_predictions(retrain(model, x, y, w, config.retrain, order), x_test, y_test)
            cache.put(key, {"loss": losses.tolist(), "pred": preds.tolist()})
    base_loss, _ = losses_and_predictions(model, x_test, y_test)
    control = cache["control"]
    per_image = []
    for k in range(len(idx)):
        h, p = cache[f"harmful:{k}"], cache[f"helpful:{k}"]
        label = int(y_test[k])
        per_image.append({
            "test_index": int(wrong[k]), "label": label, "base_loss": float(base_loss[k]),
            "control_loss": control["loss"][k], "control_correct": control["pred"][k] == label,
            "harmful_removed_delta": h["loss"][k] - control["loss"][k],
            "helpful_removed_delta": p["loss"][k] - control["loss"][k],
            "harmful_removed_correct": h["pred"][k] == label, "helpful_removed_correct": p["pred"][k] == label,
            "predicted_harmful_sum": float(scores[k, harmful[k]].sum()),  # first-order prediction of the delta
            "predicted_helpful_sum": float(scores[k, helpful[k]].sum()),
        })
    harm = np.array([r["harmful_removed_delta"] for r in per_image])
    help_ = np.array([r["helpful_removed_delta"] for r in per_image])
    result = {
        "settings": {**asdict(config), "n_train": len(y), "data_source": data.source, "subset_model": str(ckpt),
                     "retrain_horizon": config.retrain.horizon},
        "per_image": per_image,
        "harmful_removed_delta_mean": float(harm.mean()), "helpful_removed_delta_mean": float(help_.mean()),
        "harmful_removed_fell": int((harm < 0).sum()), "helpful_removed_rose": int((help_ > 0).sum()),
        "n_test": len(per_image),
        "flipped_to_correct": int(sum(r["harmful_removed_correct"] and not r["control_correct"] for r in per_image)),
        "helpful_removed_correct": int(sum(r["helpful_removed_correct"] for r in per_image)),
        "control_correct": int(sum(r["control_correct"] for r in per_image)),
        "solver_seconds": seconds, "minutes": (time.perf_counter() - start) / 60,
    }
    write_json_atomic(result, result_path)
    return result

