"""Validation results reshaped for figures: leave-one-out pairs and flipped-label curves."""

from __future__ import annotations

import numpy as np

from .slide_inputs import Missing
from .slide_text import _get

# Validation


def loo_pairs(validation, kind: str, solver: str | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label, predicted, actual) per test image for ``kind`` "convex" or "network" (predictions
    of ``solver``, default CG when present, for "network"), from the npz that the validation
    summary names (keys ``loo_convex_predicted_<k>``, ``loo_convex_actual_<k>``,
    ``loo_network_predicted_<solver>_<k>``, ``loo_network_actual_<k>``) or from inline lists
    ``loo_<kind>_predicted`` / ``loo_<kind>_actual`` (rows per test image; for "network" also a
    mapping solver -> rows)."""
    if isinstance(validation, Missing) or not isinstance(validation, dict):
        return []
    if kind == "network":
        kind = network_prefix(validation)[len("loo_"):]
    tests = validation.get(f"loo_{kind}_test_indices")
    arrays = validation.get("_arrays", {})
    rows = []
    if kind == "convex":
        k = 0
        while f"loo_convex_predicted_{k}" in arrays and f"loo_convex_actual_{k}" in arrays:
            rows.append((arrays[f"loo_convex_predicted_{k}"], arrays[f"loo_convex_actual_{k}"]))
            k += 1
    else:
        head = f"loo_{kind}_predicted_"
        solvers = sorted({key[len(head):].rsplit("_", 1)[0] for key in arrays if key.startswith(head)})
        if solvers:
            solver = solver or ("cg" if "cg" in solvers else solvers[0])
            k = 0
            while f"{head}{solver}_{k}" in arrays and f"loo_{kind}_actual_{k}" in arrays:
                rows.append((arrays[f"{head}{solver}_{k}"], arrays[f"loo_{kind}_actual_{k}"]))
                k += 1
    if not rows:
        pred, act = validation.get(f"loo_{kind}_predicted"), validation.get(f"loo_{kind}_actual")
        if pred is None or act is None:
            return []
        if isinstance(pred, dict):
            solver = solver or ("cg" if "cg" in pred else next(iter(pred)))
            pred = pred[solver]
        pred, act = np.atleast_2d(np.asarray(pred, float)), np.atleast_2d(np.asarray(act, float))
        rows = list(zip(pred, act, strict=False))
    tests = tests or list(range(len(rows)))
    return [(f"test image #{t}", np.asarray(p, float), np.asarray(a, float))
            for t, (p, a) in zip(tests, rows, strict=False)]


def network_prefix(validation) -> str:
    """The key prefix of the whole-network leave-one-out to show: ``loo_network`` when present,
    else the first variant the validation summary holds (``loo_network_<variant>_pearson``)."""
    if isinstance(validation, dict) and "loo_network_pearson" not in validation:
        variants = sorted(k[: -len("_pearson")] for k in validation
                          if k.startswith("loo_network_") and k.endswith("_pearson"))
        if variants:
            return variants[0]
    return "loo_network"


def _n_of(val, experiment: str) -> int | None:
    """Training images an experiment used: ``n_train`` is one number or experiment -> number."""
    n = _get(val, "n_train")
    if isinstance(n, dict):
        n = n.get(experiment)
    return int(n) if n else None


def _curve_label(name: str) -> str:
    """``self_influence_last_layer`` -> ``self-influence, last layer``; ``training_loss`` ->
    ``training loss``."""
    if name.startswith("self_influence"):
        rest = name[len("self_influence"):].strip("_").replace("_", " ")
        return "self-influence" + (f", {rest}" if rest else "")
    return name.replace("_", " ")


def flip_curves(val) -> dict:
    """Fraction-found curves, name -> (fraction checked, fraction found), from the npz keys
    ``flipped_<name>_checked`` / ``flipped_<name>_found`` (names like ``self_influence``,
    ``training_loss``, ``random``), or inline ``flipped_curves`` (name -> [checked, found])."""
    if isinstance(val, Missing) or not isinstance(val, dict):
        return {}
    curves = val.get("flipped_curves")
    if isinstance(curves, dict) and curves:
        return {k: (np.asarray(v[0], float), np.asarray(v[1], float)) for k, v in curves.items()}
    arrays = val.get("_arrays", {})
    out = {}
    for key in arrays:
        if key.startswith("flipped_") and key.endswith("_found"):
            name = key[len("flipped_"):-len("_found")]
            if f"flipped_{name}_checked" in arrays:
                out[_curve_label(name)] = (
                    np.asarray(arrays[f"flipped_{name}_checked"], float), np.asarray(arrays[key], float))
    order = {"self-influence": 0, "training loss": 1, "random": 2}
    return dict(sorted(out.items(), key=lambda kv: (order.get(kv[0], 9), kv[0])))
