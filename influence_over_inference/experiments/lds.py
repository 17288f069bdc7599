"""The linear datamodeling score's ground truth: models retrained on random halves of the training set.

LDS (Park et al., "TRAK: Attributing Model Behavior at Scale", ICML 2023; used by kronfluence and
dattri) judges data attribution against retraining: train many models, each on a seeded random
subset of ``alpha * n`` training images, record each model's output on some test images, and ask
how well the summed attribution scores of each subset's images rank the subsets' outputs
(:mod:`.lds_score`). This module makes the subsets and the models: each subset model is trained
with the project's default recipe (:class:`~..study.training.TrainConfig`, seeded per subset),
cached under ``data/lds/`` by the data source, the recipe and the subset's seed, written
atomically, so an interrupted run loses at most the model in progress. For every model the logits
on all 10,000 test images are kept with it; margins (correct logit minus the logsumexp of the
others, TRAK's output) and losses (dattri's) come from them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..engine.io import atomic_torch_save
from ..study.training import TrainConfig
from .store import settings_key

log = logging.getLogger(__name__)

LDS_DIR = Path("data/lds")


@dataclass
class LDSConfig:
    n_subsets: int = 50  # random subsets, each with its own retrained model (TRAK and dattri use 50-100)
    alpha: float = 0.5  # fraction of the training set in each subset
    subset_seed: int = 0  # subset k is drawn with seed subset_seed + k (and its model trained with that seed)
    n_test: int = 500  # test images scored: n_test // 10 per class, seeded (class-balanced)
    test_seed: int = 0  # seeds the choice of test images
    n_test_subset: int = 50  # a seeded subset of the test images for the slow methods (CG, LiSSA, nimarb)
    n_boot: int = 1000  # bootstrap resamples (over test images) for the 95% intervals
    recipe: TrainConfig = field(default_factory=TrainConfig)  # the project's default training recipe

    def __post_init__(self):
        if isinstance(self.recipe, dict):
            self.recipe = TrainConfig(**self.recipe)
        if self.n_subsets < 2:
            raise ValueError(f"n_subsets must be >= 2 (a rank correlation across subsets), got {self.n_subsets}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.n_test < 10 or self.n_test % 10:
            raise ValueError(f"n_test must be a positive multiple of 10 (class-balanced), got {self.n_test}")
        if not 2 <= self.n_test_subset <= self.n_test:
            raise ValueError(f"n_test_subset must be in [2, n_test], got {self.n_test_subset}")
        if self.n_boot < 1:
            raise ValueError(f"n_boot must be >= 1, got {self.n_boot}")


def subset_mask(n: int, alpha: float, seed: int) -> np.ndarray:
    """Boolean (n,): a seeded random subset of ``round(alpha * n)`` of ``n`` training images."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.randperm(n, generator=gen)[: round(alpha * n)]
    mask = np.zeros(n, dtype=bool)
    mask[keep.numpy()] = True
    return mask


def subset_masks(n: int, config: LDSConfig) -> np.ndarray:
    """Boolean (n_subsets, n): subset ``k`` drawn with seed ``config.subset_seed + k``."""
    return np.stack([subset_mask(n, config.alpha, config.subset_seed + k) for k in range(config.n_subsets)])


def balanced_test_indices(labels: torch.Tensor, n: int, seed: int) -> np.ndarray:
    """``n // n_classes`` seeded random test images of each class, sorted (class-balanced)."""
    gen = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels).tolist()
    per_class = n // len(classes)
    keep = []
    for c in classes:
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < per_class:
            raise ValueError(f"class {c} has {len(idx)} test images, fewer than {per_class}")
        keep.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    return torch.sort(torch.cat(keep)).values.numpy()


def nested_subset(indices: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Positions (sorted) of a seeded random ``n`` of ``indices``: the slow methods' test images."""
    gen = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(len(indices), generator=gen)[:n]).values.numpy()


def margins_and_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """TRAK's margin (correct logit - logsumexp of the others) and the cross-entropy, float64 (..., N)."""
    logits = logits.double()
    correct = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, labels.unsqueeze(-1), float("-inf"))
    loss = torch.logsumexp(logits, -1) - correct
    return (correct - torch.logsumexp(others, -1)).numpy(), loss.numpy()


def model_key(data_source: str, config: LDSConfig) -> str:
    """The cache key shared by one run's subset models: data source, alpha and the recipe's weights-settings."""
    recipe = asdict(config.recipe)
    for k in ("device", "threads", "seed"):  # the seed is the subset's; device and threads don't name the weights
        recipe.pop(k)
    return settings_key({"data_source": data_source, "alpha": config.alpha, "recipe": recipe})


REPLICATE_SEED_STEP = 1_000_000  # replicate r of subset k trains with seed subset_seed + k + r * this step


def model_path(cache_dir: str | os.PathLike, key: str, seed: int, replicate: int = 0) -> Path:
    """Subset model of subset seed ``seed``; ``replicate`` r > 0: the same subset trained with another seed."""
    return Path(cache_dir) / f"subset-{key}-seed{seed}{f'-rep{replicate}' if replicate else ''}.pt"


def train_subset(data, config: LDSConfig, k: int, cache_dir: str | os.PathLike = LDS_DIR, progress: bool = True,
                 train_fn=None, replicate: int = 0) -> dict:
    """Subset ``k``'s model and its test logits (cached): ``{"state_dict", "test_logits", "seconds", ...}``.

    Trained on ``subset_mask(n, alpha, subset_seed + k)`` with the recipe, seeded by that same seed;
    ``replicate`` r > 0 trains on the same subset with the seed ``subset_seed + k + r *
    REPLICATE_SEED_STEP`` (another initialisation and batch order: :mod:`.lds_ceiling`).
    ``train_fn`` (tests) replaces :func:`~..study.training.train`.
    """
    from ..study.training import train
    from .retraining import subset_split

    if replicate < 0:
        raise ValueError(f"replicate must be >= 0, got {replicate}")
    seed = config.subset_seed + k
    path = model_path(cache_dir, model_key(data.source, config), seed, replicate)
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=True)
    mask = subset_mask(len(data.train), config.alpha, seed)
    recipe = TrainConfig(**{**asdict(config.recipe), "seed": seed + replicate * REPLICATE_SEED_STEP})
    start = time.perf_counter()
    result = (train_fn or train)(subset_split(data.train, torch.from_numpy(np.flatnonzero(mask))), recipe,
                                 progress=progress)
    model = result.model.eval()
    with torch.no_grad():
        x, y = data.test.tensors()
        logits = torch.cat([model(x[i : i + 2000]) for i in range(0, len(y), 2000)])  # (10000, 10)
    blob = {"state_dict": {k_: v.detach().cpu() for k_, v in model.state_dict().items()},
            "test_logits": logits.float(), "seed": seed, "train_seed": recipe.seed, "n_train": int(mask.sum()),
            "seconds": time.perf_counter() - start,
            "test_accuracy": float((logits.argmax(1) == y).float().mean())}
    atomic_torch_save(blob, path)
    log.info("subset %d (seed %d, replicate %d): test accuracy %.4f, %.0f s", k, seed, replicate,
             blob["test_accuracy"], blob["seconds"])
    return blob


def retrain_subsets(data, config: LDSConfig, cache_dir: str | os.PathLike = LDS_DIR, progress: bool = True,
                    worker: int = 0, workers: int = 1, train_fn=None, replicate: int = 0) -> list[int]:
    """Train (or find cached) the models of subsets ``worker, worker + workers, ...``; returns those done.

    Resumable: models already on disk are skipped, so a killed run restarts with the model it was
    training. Parallel workers (same config, same cache) share the work without overlap.
    ``replicate``: as for :func:`train_subset`.
    """
    from tqdm.auto import tqdm

    mine = list(range(worker, config.n_subsets, workers))
    desc = f"LDS subsets{f' (replicate {replicate})' if replicate else ''} (worker {worker}/{workers})"
    for k in tqdm(mine, desc=desc, disable=not progress):
        train_subset(data, config, k, cache_dir, progress=progress, train_fn=train_fn, replicate=replicate)
    return mine


def load_outputs(data, config: LDSConfig, test_indices: np.ndarray, cache_dir: str | os.PathLike = LDS_DIR,
                 replicate: int = 0) -> dict:
    """Margins and losses (n_done, n_test) of the subset models already trained, with their subset indices.

    Missing models are skipped (the LDS then uses the subsets done so far, and says how many).
    ``replicate``: as for :func:`train_subset`.
    """
    key = model_key(data.source, config)
    done, logits, seconds, acc = [], [], [], []
    for k in range(config.n_subsets):
        path = model_path(cache_dir, key, config.subset_seed + k, replicate)
        if not path.exists():
            continue
        blob = torch.load(path, map_location="cpu", weights_only=True)
        done.append(k)
        logits.append(blob["test_logits"][torch.as_tensor(test_indices)])
        seconds.append(blob["seconds"])
        acc.append(blob["test_accuracy"])
    labels = data.test.labels[torch.as_tensor(test_indices)]
    if not done:
        return {"subsets": np.array([], dtype=int), "margins": np.zeros((0, len(test_indices))),
                "losses": np.zeros((0, len(test_indices))), "seconds": np.array([]), "test_accuracy": np.array([])}
    margins, losses = margins_and_losses(torch.stack(logits), labels.expand(len(done), -1))
    return {"subsets": np.array(done), "margins": margins, "losses": losses, "seconds": np.array(seconds),
            "test_accuracy": np.array(acc)}


def stored_outputs(arrays_path: str | os.PathLike, test_indices: np.ndarray, n_subsets: int) -> dict | None:
    """The subset models' margins and losses as an earlier run kept them (``results/lds.npz``), or None.

    Adding a method to the LDS needs only these outputs, not the models: they are used when the
    file holds all ``n_subsets`` subsets for exactly these test images (the caller checks that the
    file's run had the same config). Per-model accuracy and time are not in the file (nan).
    """
    path = Path(arrays_path)
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as blob:
        if not {"test_indices", "subsets", "margins", "losses"} <= set(blob.files):
            return None
        if not np.array_equal(blob["test_indices"], test_indices) or not np.array_equal(
                blob["subsets"], np.arange(n_subsets)):
            return None
        nan = np.full(n_subsets, np.nan)
        return {"subsets": blob["subsets"], "margins": blob["margins"].astype(np.float64),
                "losses": blob["losses"].astype(np.float64), "seconds": nan, "test_accuracy": nan}


def previous_run(out: str | os.PathLike, arrays: str | os.PathLike, config: LDSConfig, data_source: str,
                 test_indices: np.ndarray) -> tuple[dict, dict] | None:
    """The result and per-test arrays of an earlier run with the same config, data and test images, or None.

    Their subset outputs stand in for the models (which need not be kept: ``stored_outputs``) and
    their methods are kept, so scoring one more method recomputes nothing else.
    """
    out, arrays = Path(out), Path(arrays)
    if not out.exists() or not arrays.exists():
        return None
    try:
        result = json.loads(out.read_text())
    except (OSError, ValueError):
        return None
    if (result.get("config") != json.loads(json.dumps(asdict(config))) or result.get("data_source") != data_source
            or result.get("n_subsets") != config.n_subsets):
        return None
    outputs = stored_outputs(arrays, test_indices, config.n_subsets)
    if outputs is None:
        return None
    with np.load(arrays, allow_pickle=False) as blob:
        per_test = {k: blob[k] for k in blob.files if k.endswith(("_margin", "_loss")) and not k.startswith("ceiling_")}
        ceiling = {k: blob[k] for k in blob.files if k.startswith("ceiling_")}  # .lds_ceiling's, kept as they are
    return result, {"outputs": outputs, "per_test": per_test, "ceiling": ceiling}
