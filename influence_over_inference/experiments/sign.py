"""The sign, checked by retraining: remove the most harmful (or most helpful) images and retrain.

For misclassified test images, remove the 100 most harmful training images, retrain, and the test
loss should fall; remove the 100 most helpful and it should rise.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..engine.io import write_json_atomic
from .loo_network import DEFAULT_SOLVER_SETTINGS, _solver_scores
from .retraining import (
    RetrainConfig,
    data_order,
    losses_and_predictions,
    retrain,
    subset_split,
    train_subset_model,
)
from .store import CACHE_DIR, ResultCache, load_config_result, settings_key

# 4. The sign, by retraining: remove the most harmful (helpful) images of misclassified test images


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


def removal_lists(scores: torch.Tensor, n_remove: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per test image (row of ``scores``), the ``n_remove`` most harmful training indices (most
    negative scores first) and the ``n_remove`` most helpful (most positive first): (K, n_remove) each."""
    harmful = torch.argsort(scores, dim=1)[:, :n_remove]  # most negative first
    helpful = torch.argsort(scores, dim=1, descending=True)[:, :n_remove]
    return harmful, helpful


def run_sign(data, config: SignConfig | None = None, cache_dir: str | os.PathLike = CACHE_DIR,
             progress: bool = True) -> dict:
    """Experiment 4: remove each misclassified test image's ``n_remove`` most harmful (helpful) images, retrain."""
    from tqdm.auto import tqdm

    from ..engine.hashing import file_sha256
    from ..study.data import normalize_uint8
    from ..study.training import TrainConfig

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
    harmful, helpful = removal_lists(scores, config.n_remove)
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
