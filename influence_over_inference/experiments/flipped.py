"""Finding flipped labels by self-influence (Koh & Liang, ICML 2017, Section 5.4).

Flip a fixed fraction of the training labels to another class (a local ``torch.Generator``, never
the global RNG; never the true class), train on the corrupted set, and rank the training images by
self-influence ``(1/n) g_j^T (GGN + weight_decay I + lambda I)^{-1} g_j`` (the engine's fast
solver at its own defaults, ``FastSettings()``, unless ``solver_settings`` overrides them), by
training loss, and at random. Checking images in each ranking's order, how many of the flipped
labels are found after checking 10% and 20% of the data, and the ROC-AUC of each score?
kronfluence's CIFAR-10 example (ResNet-9) finds 97% at 20% checked.

Self-influence variants, from the same pass over the training gradients (``variants``), each a
published score or a stated diagnostic, to see why self-influence wins or loses against the loss:

- ``gradient_norm``: ``(1/n) ||g_j||^2``, self-influence with the identity for the curvature
  (TracIn's self-influence at one checkpoint, Pruthi et al., NeurIPS 2020, up to the learning rate);
- ``self_influence_relatif``: ``g_j^T H^{-1} g_j / ||H^{-1} g_j||``, the relative influence of
  an image on itself (RelatIF, Barshan et al., AISTATS 2020), which discounts images whose
  influence comes from directions of small curvature that the inverse amplifies;
- ``curvature_ratio``: ``g_j^T H^{-1} g_j / ||g_j||^2``, a diagnostic, not a detector from the
  literature: self-influence with the gradient's size divided out, so only its direction counts
  (how much of it lies where the curvature is small). Where self-influence tracks
  ``gradient_norm`` and this ratio finds nothing, the curvature adds nothing to the gradient's
  size, and the loss, which the gradient's size follows, is the better detector.

Self-influence divided by the loss is not tried: it mixes a quantity of the parameter space with
one of the output and has no derivation we know of.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..engine.io import atomic_torch_save, save_npz_atomic, write_json_atomic
from .metrics import found_at, fraction_found, roc_auc
from .store import CACHE_DIR, load_config_result, settings_key


def flip_labels(labels: torch.Tensor, fraction: float, n_classes: int, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip exactly ``round(fraction * n)`` labels, each to a different class drawn uniformly.

    Returns ``(new labels, flipped)`` with ``flipped`` a boolean mask (N,). Which images flip and
    to what come from ``generator`` only, so the same seed gives the same corruption.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if n_classes < 2:
        raise ValueError(f"flipping needs n_classes >= 2, got {n_classes}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(f"labels must lie in 0..{n_classes - 1}")
    n = len(labels)
    k = int(round(fraction * n))
    chosen = torch.randperm(n, generator=generator)[:k]
    offset = torch.randint(1, n_classes, (k,), generator=generator)  # 1..C-1: never the true class
    new = labels.clone()
    new[chosen] = (labels[chosen] + offset) % n_classes
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[chosen] = True
    return new, flipped


@dataclass
class FlippedConfig:
    fraction: float = 0.1  # fraction of training labels flipped
    seed: int = 0  # seeds which labels flip, and to what (and the random ranking, with seed + 1)
    n_per_class: int | None = None  # class-balanced subset (first n of each class); None: all 50,000
    epochs: int = 12  # epochs of our TrainConfig recipe on the corrupted set (otherwise its defaults)
    solver: str = "fast"  # the engine solver for self-influence
    solver_settings: dict = field(default_factory=dict)  # overrides of the solver's defaults ({}: FastSettings() as it is)
    last_layer: bool = True  # also rank by the exact last-layer self-influence (cheap; see last_layer_self_influence)
    variants: bool = True  # also rank by gradient_norm, self_influence_relatif, curvature_ratio (module docstring)

    def __post_init__(self):
        from ..engine.solvers.registry import make_solver

        make_solver(self.solver, **self.solver_settings)  # unknown solver or settings: ValueError now, not after training
        if not 0 < self.fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {self.fraction}")
        if self.n_per_class is not None and self.n_per_class < 1:
            raise ValueError(f"n_per_class must be >= 1 or None, got {self.n_per_class}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")


@torch.no_grad()
def per_sample_losses(model, split, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy (N,) of every image of ``split`` under its (possibly flipped) label, and the predicted classes (N,)."""
    from ..study.data import normalize_uint8

    model = model.eval()
    losses, preds = [], []
    for start in range(0, len(split), batch_size):
        out = model(normalize_uint8(split.images[start : start + batch_size]))
        losses.append(torch.nn.functional.cross_entropy(out, split.labels[start : start + batch_size], reduction="none"))
        preds.append(out.argmax(1))
    return torch.cat(losses), torch.cat(preds)


def last_layer_self_influence(model, split, weight_decay: float, chunk: int = 10_000) -> np.ndarray:
    """Exact self-influence in the last layer only: ``(1/n) g_j^T (H_fc3 + weight_decay I)^{-1} g_j``.

    ``H_fc3`` is the exact Hessian of the mean loss w.r.t. fc3's weight and bias (850 parameters) on
    the frozen features, at the trained weights; float64. A cheap, exact companion to the engine's
    whole-network self-influence.
    """
    from .logreg import last_layer_inputs, logreg_hessian

    X = last_layer_inputs(model, split.images)  # (N, 85)
    W = torch.cat([model.fc3.weight, model.fc3.bias[:, None]], dim=1).detach().double()
    H_inv = torch.cholesky_inverse(torch.linalg.cholesky(logreg_hessian(W, X, weight_decay)))
    y = split.labels
    out = torch.empty(len(y), dtype=torch.float64)
    for start in range(0, len(y), chunk):
        x = X[start : start + chunk]
        r = torch.softmax(x @ W.T, dim=1)
        r[torch.arange(len(x)), y[start : start + chunk]] -= 1.0
        g = (r[:, :, None] * x[:, None, :]).reshape(len(x), -1)  # (B, 850): g_j = r_j kron x_j
        out[start : start + chunk] = ((g @ H_inv) * g).sum(1)
    return (out / len(y)).numpy()


def self_influence_variants(model, split, solver, n: int, chunk_size: int = 500, progress: bool = True
                            ) -> dict[str, np.ndarray]:
    """Self-influence and its variants (module docstring) of every image of ``split``, one gradient pass.

    ``solver`` must be fitted. ``self_influence`` equals :func:`..engine.scores.self_influence`
    (``(1/n) g^T H^{-1} g``, ``n = len(split)``); ``H^{-1} g`` is the solver's inverse-HVP, so this
    works for every solver.
    """
    from ..engine.gradients import iter_grad_z
    from ..engine.params import data_length

    p = next(model.parameters())
    out = {k: np.empty(data_length(split)) for k in ("self_influence", "gradient_norm", "self_influence_relatif",
                                              "curvature_ratio")}
    for start, g in iter_grad_z(model, split, chunk_size, p.device, solver.layers, p.dtype, progress,
                                "self-influence variants"):
        h = solver.inverse_hvp(g)  # (B, P)
        quad = (h * g).sum(1)
        sq = (g * g).sum(1)
        end = start + len(g)
        out["self_influence"][start:end] = (quad / n).double().cpu().numpy()
        out["gradient_norm"][start:end] = (sq / n).double().cpu().numpy()
        out["self_influence_relatif"][start:end] = (quad / h.norm(dim=1).clamp_min(1e-30)).double().cpu().numpy()
        out["curvature_ratio"][start:end] = (quad / sq.clamp_min(1e-30)).double().cpu().numpy()
    return out


def rank_agreement(rankings: dict[str, np.ndarray]) -> dict[str, float]:
    """Spearman of each ranking with self-influence over all training images: which scores rank alike."""
    from .metrics import spearman

    base = rankings["self_influence"]
    return {name: spearman(score, base) for name, score in rankings.items() if name not in ("self_influence", "random")}


def detection_metrics(rankings: dict[str, np.ndarray], flipped: np.ndarray) -> dict:
    """Per ranking: fraction found at 10% and 20% checked, ROC-AUC, and the curve."""
    out = {}
    for name, score in rankings.items():
        checked, found = fraction_found(score, flipped)
        out[name] = {"found_at_10": found_at(checked, found, 0.10), "found_at_20": found_at(checked, found, 0.20),
                     "auc": roc_auc(score, flipped), "checked": checked, "found": found}
    return out


def run_flipped(data, config: FlippedConfig | None = None, cache_dir: str | os.PathLike = CACHE_DIR,
                progress: bool = True) -> dict:
    """Experiment 3: train on labels with ``fraction`` flipped, then rank by self-influence, loss and at random."""
    from ..engine.hashing import file_sha256
    from ..engine.influence_engine import InfluenceEngine
    from ..engine.solvers.registry import make_solver
    from ..study.checkpoints import load_checkpoint, save_checkpoint
    from ..study.data import CIFAR10Split
    from ..study.training import TrainConfig, evaluate, train
    from .retraining import balanced_subset, subset_split

    config = config or FlippedConfig()
    solver_described = make_solver(config.solver, **config.solver_settings).describe()  # the defaults resolved
    key = settings_key({**asdict(config), "solver_described": solver_described})
    result_path = Path(cache_dir) / f"flipped-result-{key}.json"
    curves_path = Path(cache_dir) / f"flipped-curves-{key}.npz"
    done = load_config_result(result_path, {**asdict(config), "solver_described": solver_described}, data.source)
    if done is not None and curves_path.exists():
        arrays = np.load(curves_path)
        done["curves"] = {name: (arrays[f"{name}_checked"], arrays[f"{name}_found"]) for name in done["metrics"]}
        if "spearman_with_self_influence" not in done and "score_self_influence" in arrays.files:  # an older entry
            done["spearman_with_self_influence"] = rank_agreement(
                {k.removeprefix("score_"): arrays[k] for k in arrays.files if k.startswith("score_")})
        return done
    start = time.perf_counter()
    split = data.train
    if config.n_per_class is not None:
        split = subset_split(split, balanced_subset(split.labels, config.n_per_class))
    gen = torch.Generator().manual_seed(config.seed)
    labels, flipped = flip_labels(split.labels, config.fraction, len(data.classes), gen)
    corrupted = CIFAR10Split(split.images, labels, split.names)
    train_config = TrainConfig(epochs=config.epochs, threads=torch.get_num_threads())
    model_settings = {"data_source": data.source, "n_per_class": config.n_per_class, "fraction": config.fraction,
                      "seed": config.seed, "epochs": config.epochs}
    path = Path(cache_dir) / f"flipped-model-{settings_key(model_settings)}.pt"
    if path.exists():
        model, meta = load_checkpoint(path)
    else:
        result = train(corrupted, train_config, progress=progress)
        model = result.model
        meta = {**model_settings, "test_accuracy": evaluate(model, data.test)["accuracy"],
                "train_minutes": (time.perf_counter() - start) / 60, "history": [asdict(h) for h in result.history]}
        save_checkpoint(model, path, meta, overwrite=True)
    train_minutes = meta.get("train_minutes", (time.perf_counter() - start) / 60)  # of the run that trained it
    t = time.perf_counter()
    solver = make_solver(config.solver, **config.solver_settings)
    engine = InfluenceEngine(model, corrupted, solver, weight_decay=train_config.weight_decay,
                             cache_dir=Path(cache_dir) / "influence", checkpoint=path,
                             data_source=f"{data.source} flipped {model_settings}", progress=progress)
    if config.variants:
        variants_path = engine.cache_path("self_influence_variants")
        if variants_path is not None and variants_path.exists():
            variants = {k: v.numpy() for k, v in torch.load(variants_path, weights_only=True).items()}
        else:
            engine.fit()
            variants = self_influence_variants(model, corrupted, solver, len(labels), progress=progress)
            if variants_path is not None:
                atomic_torch_save({k: torch.from_numpy(v) for k, v in variants.items()}, variants_path)
        self_inf = variants.pop("self_influence")
    else:
        variants, self_inf = {}, engine.self_influence().double().numpy()
    self_minutes = (time.perf_counter() - t) / 60
    # the minutes of the run that computed the self-influence (the engine's cache keeps no timings)
    timing_path = path.with_name(path.stem + "-self-influence-minutes.json")
    timed = {"solver_described": solver_described, "variants": config.variants}
    if self_minutes > 0.2 or not timing_path.exists():
        write_json_atomic({"self_influence_minutes": self_minutes, **timed}, timing_path)
    else:
        cached = json.loads(timing_path.read_text())
        if all(cached.get(k) == v for k, v in timed.items()):
            self_minutes = cached["self_influence_minutes"]
    t_rest = time.perf_counter()
    loss, pred = per_sample_losses(model, corrupted)
    loss = loss.double().numpy()
    fits = (pred == labels).numpy()
    rand = torch.rand(len(labels), generator=torch.Generator().manual_seed(config.seed + 1), dtype=torch.float64).numpy()
    flipped_np = flipped.numpy()
    rankings = {"self_influence": self_inf, "training_loss": loss, "random": rand}
    if config.last_layer:
        rankings["self_influence_last_layer"] = last_layer_self_influence(model, corrupted, train_config.weight_decay)
    rankings.update(variants)
    metrics = detection_metrics(rankings, flipped_np)
    curves = {name: (m.pop("checked"), m.pop("found")) for name, m in metrics.items()}
    result = {"settings": {**asdict(config), "solver_described": solver_described, "n_train": len(labels),
                           "data_source": data.source,
                           "weight_decay": train_config.weight_decay, "checkpoint": file_sha256(path)},
              "n_flipped": int(flipped.sum()), "test_accuracy": meta.get("test_accuracy"),
              "train_accuracy": float(fits.mean()),  # on the labels trained on (flipped ones included)
              "flipped_memorised": float(fits[flipped_np].mean()),  # flipped images predicted as their wrong label
              "metrics": metrics, "spearman_with_self_influence": rank_agreement(rankings),
              # train + self-influence as first computed, plus this run's ranking and metrics
              "minutes": train_minutes + self_minutes + (time.perf_counter() - t_rest) / 60,
              "timings": {"train_minutes": train_minutes, "self_influence_minutes": self_minutes}}
    write_json_atomic(result, result_path)
    save_npz_atomic(curves_path,
             **{f"{name}_{part}": arr for name, (c, f) in curves.items() for part, arr in (("checked", c), ("found", f))},
             flipped=flipped_np, **{f"score_{name}": score for name, score in rankings.items()})
    result["curves"] = curves
    return result
