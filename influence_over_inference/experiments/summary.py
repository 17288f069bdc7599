"""The validation summary the notebook and the slides read.

``results/validation.json`` (+ ``results/validation_arrays.npz``) from the experiments' results.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..engine.io import save_npz_atomic, write_json_atomic
from .store import ARRAYS_PATH, SUMMARY_PATH

# 5. The summary the notebook and the slides read, and the command line

CURVE_POINTS = 1001  # fraction-found curves are stored at this many evenly spaced fractions checked


def _summarize_loo_network(summary: dict, arrays: dict, key: str, r: dict) -> None:
    """The network leave-one-out's keys (``key``: ``loo_network``, or a variant's name) and plot arrays."""
    solvers = list(r["test"][0]["pearson"])
    summary[f"{key}_pearson"] = {s: [t["pearson"][s] for t in r["test"]] for s in solvers}
    summary[f"{key}_spearman"] = {s: [t["spearman"][s] for t in r["test"]] for s in solvers}
    summary[f"{key}_test_indices"] = r["test_indices"]
    summary[f"{key}_timings"] = r["timings"]
    summary["minutes"][key] = r["minutes"]
    summary["n_train"][key] = r["settings"]["n_train"]
    summary["settings"][key] = r["settings"]
    summary["data_source"] = r["settings"]["data_source"]
    for old in [k for k in arrays if k.startswith(f"{key}_actual_") or k.startswith(f"{key}_predicted_")]:
        del arrays[old]
    for k, t in enumerate(r["test"]):
        arrays[f"{key}_actual_{k}"] = np.asarray(t["actual"])
        for s in solvers:
            arrays[f"{key}_predicted_{s}_{k}"] = np.asarray(t["predicted"][s])


def summarize(results: dict, summary_path: str | os.PathLike = SUMMARY_PATH,
              arrays_path: str | os.PathLike = ARRAYS_PATH) -> dict:
    """Merge experiment results (``{"loo_convex": ..., "loo_network": ..., "flipped": ..., "sign": ...}``,
    any subset) into ``results/validation.json`` and the plot arrays into ``results/validation_arrays.npz``."""
    summary_path, arrays_path = Path(summary_path), Path(arrays_path)
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    arrays = dict(np.load(arrays_path)) if arrays_path.exists() else {}
    summary.setdefault("minutes", {})
    summary.setdefault("n_train", {})
    summary.setdefault("settings", {})
    r = results.get("loo_convex")
    if r is not None:
        summary["loo_convex_pearson"] = [t["pearson"] for t in r["test"]]
        summary["loo_convex_spearman"] = [t["spearman"] for t in r["test"]]
        summary["loo_convex_test_indices"] = r["test_indices"]
        summary["minutes"]["loo_convex"] = r["minutes"]
        summary["n_train"]["loo_convex"] = r["settings"]["n_train"]
        summary["settings"]["loo_convex"] = r["settings"]
        summary["data_source"] = r["settings"]["data_source"]
        arrays = {k: v for k, v in arrays.items() if not k.startswith("loo_convex_")}
        for k, t in enumerate(r["test"]):
            arrays[f"loo_convex_predicted_{k}"] = np.asarray(t["predicted"])
            arrays[f"loo_convex_actual_{k}"] = np.asarray(t["actual"])
    for key in [k for k in results if k.startswith("loo_network")]:
        _summarize_loo_network(summary, arrays, key, results[key])
    for key, prefix in (("flipped", ""), ("flipped_memorising", "memorising_")):
        r = results.get(key)
        if r is None:
            continue
        m = r["metrics"]
        summary[f"{prefix}flipped_found_at_10"] = m["self_influence"]["found_at_10"]
        summary[f"{prefix}flipped_found_at_20"] = m["self_influence"]["found_at_20"]
        summary[f"{prefix}flipped_auc"] = m["self_influence"]["auc"]
        summary[f"{prefix}loss_found_at_10"] = m["training_loss"]["found_at_10"]
        summary[f"{prefix}loss_found_at_20"] = m["training_loss"]["found_at_20"]
        summary[f"{prefix}loss_auc"] = m["training_loss"]["auc"]
        summary[f"{prefix}random_found_at_20"] = m["random"]["found_at_20"]
        summary[f"{prefix}random_auc"] = m["random"]["auc"]
        if "self_influence_last_layer" in m:
            summary[f"{prefix}last_layer_found_at_10"] = m["self_influence_last_layer"]["found_at_10"]
            summary[f"{prefix}last_layer_found_at_20"] = m["self_influence_last_layer"]["found_at_20"]
            summary[f"{prefix}last_layer_auc"] = m["self_influence_last_layer"]["auc"]
        variants = {name: {k: m[name][k] for k in ("found_at_10", "found_at_20", "auc")} for name in m
                    if name not in ("self_influence", "training_loss", "random", "self_influence_last_layer")}
        if variants:  # self-influence variants (experiments/flipped.py's docstring)
            summary[f"{prefix}flipped_variants"] = variants
        summary[f"{prefix}flipped_details"] = {k: r[k] for k in ("n_flipped", "test_accuracy", "train_accuracy",
                                                                 "flipped_memorised", "timings")}
        if "spearman_with_self_influence" in r:  # which rankings order the images as self-influence does
            summary[f"{prefix}flipped_spearman_with_self_influence"] = r["spearman_with_self_influence"]
        summary["minutes"][key] = r["minutes"]
        summary["n_train"][key] = r["settings"]["n_train"]
        summary["settings"][key] = r["settings"]
        summary["data_source"] = r["settings"]["data_source"]
        grid = np.linspace(0, 1, CURVE_POINTS)
        for name, (checked, found) in r["curves"].items():
            arrays[f"{prefix}flipped_{name}_checked"] = grid
            arrays[f"{prefix}flipped_{name}_found"] = np.interp(grid, checked, found)
    r = results.get("sign")
    if r is not None:
        summary["sign_harmful_removed_delta"] = r["harmful_removed_delta_mean"]
        summary["sign_helpful_removed_delta"] = r["helpful_removed_delta_mean"]
        summary["sign_harmful_removed_deltas"] = [p["harmful_removed_delta"] for p in r["per_image"]]
        summary["sign_helpful_removed_deltas"] = [p["helpful_removed_delta"] for p in r["per_image"]]
        summary["sign_test_indices"] = [p["test_index"] for p in r["per_image"]]
        for key in ("harmful_removed_fell", "helpful_removed_rose", "n_test", "flipped_to_correct",
                    "helpful_removed_correct", "control_correct"):
            summary[f"sign_{key}"] = r[key]
        summary["minutes"]["sign"] = r["minutes"]
        summary["n_train"]["sign"] = r["settings"]["n_train"]
        summary["settings"]["sign"] = r["settings"]
    summary["arrays"] = str(arrays_path)
    write_json_atomic(summary, summary_path)
    save_npz_atomic(arrays_path, **arrays)
    return summary
