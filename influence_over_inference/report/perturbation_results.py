"""The perturbation results, read for the notebook and the slides, and said in plain words.

Two files: ``results/perturbation.json`` / ``.npz`` (``validate perturbation``: the retraining
check and the training-set attack on the 5,000-image subset model, with one before/after
example) and ``results/perturbation_map.npz`` (written by the notebook: the dog's most helpful
training image and its perturbation-influence map on the full model). They are read by
:func:`.slide_inputs.load_perturbation` and :func:`.slide_inputs.load_perturbation_map`; a missing
file is a :class:`~.slide_inputs.Missing` that names the command which makes it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..engine.io import save_npz_atomic
from .slide_inputs import Missing


def map_path(results_json: str | os.PathLike) -> Path:
    """Where the notebook keeps the dog's map: ``perturbation_map.npz`` beside its influence summary."""
    return Path(results_json).with_name("perturbation_map.npz")


def save_map(path: str | os.PathLike, test_index: int, train_index: int, pmap, train_image, test_label: int,
             train_label: int, data_source: str) -> Path:
    """The notebook's map of one (test, training) pair, for the slides: npz, written atomically."""
    m = np.asarray(pmap.numpy() if hasattr(pmap, "numpy") else pmap, dtype=np.float32)  # (3, H, W)
    img = np.asarray(train_image.numpy() if hasattr(train_image, "numpy") else train_image)
    save_npz_atomic(path, test_index=np.int64(test_index), train_index=np.int64(train_index), map=m,
                    train_image=img.astype(np.uint8), test_label=np.int64(test_label),
                    train_label=np.int64(train_label), data_source=np.array(data_source))
    return Path(path)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def attack_sentences(result) -> list[str]:
    """The check and the attack in a few sentences, every number read from ``result``."""
    if isinstance(result, Missing):
        return [result.message().replace("\n", " ")]
    s = result["settings"]
    out = [f"Finite differences on a tiny float64 model: the map matches the exact derivative to a relative "
           f"error of {result['fd_rel_err']:.1e}.",
           f"Retraining check ({s['n_train']:,}-image model, retrained from its weights with a control run "
           f"subtracted): over {result['n_pairs']} (training image, step) pairs, Pearson between predicted and "
           f"actual change in the test loss {result['retrain_pearson']:.2f} for the map's linear prediction, "
           f"{result['retrain_pearson_score_difference']:.2f} for the score difference."]
    eps = result.get("epsilon_levels", round(255 * result["epsilon"]))
    names = {"typical": "typical test images (the first correctly classified of each class)",
             "low_margin": "correctly classified test images with the smallest margins"}
    for name, g in result.get("groups", {}).items():
        out.append(f"Attack on {g['n']} {names.get(name, name)}: moving each one's {result['k_images']} most helpful "
                   f"training images by at most {eps}/255 per pixel flipped {_pct(g['attack_flip_rate'])} of the "
                   f"predictions (random signs of the same size: {_pct(g['random_flip_rate'])}); mean test-loss "
                   f"change {g['attack_loss_change']:+.3f} (random {g['random_loss_change']:+.3f})."
                   + (f" Iterated ({s.get('iterative_steps')} steps, the map recomputed after each): flipped "
                      f"{_pct(g['iterative_flip_rate'])}, change {g['iterative_loss_change']:+.3f}."
                      if "iterative_flip_rate" in g else ""))
    return out


def example_title(result, classes) -> str:
    """The before/after example's test image, its class and what the retrained model said."""
    ex = result["example"]
    return (f"test #{ex['test_index']}\n{classes[ex['label']]}\nattacked: {classes[ex['attack_pred']]}\n"
            f"random: {classes[ex['random_pred']]}")
