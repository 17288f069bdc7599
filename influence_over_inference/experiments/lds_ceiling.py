"""The LDS's noise ceiling: how much of a retrained model's output any attribution method can predict.

A subset model's output on a test image is one training run: the same subset trained again with
another seed (initialisation and batch order) gives another output. Attribution scores are a
function of the subset only, so that part of the output is out of their reach. Train every subset
a second time (a *replicate*, :func:`.lds.train_subset` with ``replicate=1``) and, per test image,
take the Spearman correlation across the subsets between the two runs' outputs: the test-retest
reliability ``r``. If an output is a function of the subset plus independent noise, the best any
method can reach against one run is ``sqrt(r)`` (Pearson; Spearman approximately), and against
the mean of the two runs ``sqrt(2r / (1 + r))`` (Spearman-Brown), the noise halved
(:func:`retest_reliability`). Each method
already scored (cached under ``data/lds/scores``) is also scored against the replicate alone (the
LDS measured on new ground truth) and against the mean of both runs; the noise model predicts the
latter from the former by the factor ``sqrt(2 / (1 + r))``, which the run checks. Against the mean
of both runs, ours are set against the other methods again, paired over test images
(``paired_mean2``, as :func:`.lds_run.paired_comparisons`): the same question on less noisy ground truth.

Everything is per test image, with a 95% bootstrap interval over test images as for the LDS
(:mod:`.lds_score`). Written into ``results/lds.json`` under ``noise_ceiling`` and, per test image,
into ``results/lds.npz`` (``ceiling_replicate_margins``, ``ceiling_retest_on_margins``, ...; a later
``validate lds`` keeps them, and drops the ceiling of each method it rescores: rerun this then).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from ..engine.io import save_npz_atomic, write_json_atomic
from .lds import (
    LDS_DIR,
    REPLICATE_SEED_STEP,
    LDSConfig,
    balanced_test_indices,
    load_outputs,
    previous_run,
    subset_masks,
)
from .lds_run import ARRAYS_PATH, RESULT_PATH, paired_comparisons, scores_key, scores_path
from .lds_score import bootstrap_ci, lds_summary, rowwise_spearman
from .metrics import spearman

log = logging.getLogger(__name__)


def retest_reliability(first: np.ndarray, second: np.ndarray, n_boot: int = 1000) -> tuple[dict, np.ndarray]:
    """Two runs' outputs (S, T) on the same subsets -> the summary and the per-test Spearman (T,) across subsets.

    Summary: ``retest`` (the mean of r over test images) with its interval, ``ceiling_one``
    (``sqrt(retest)``, the most an attribution can reach against one run) and ``ceiling_mean2``
    (``sqrt(2 retest / (1 + retest))``, against the mean of two runs), their intervals the same
    functions of ``retest_ci``. The ceilings are taken of the mean, not averaged per test image: the
    per-image r of 50 subsets is noisy (standard error ~0.14), and both functions are concave, so
    by Jensen's inequality these are upper bounds of the per-image ceilings' mean, which bounds the
    LDS (a mean over test images).
    """
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if first.shape != second.shape or first.ndim != 2:
        raise ValueError(f"need two (S, T) output arrays of one shape, got {first.shape} and {second.shape}")
    r = rowwise_spearman(first.T, second.T)  # (T,)
    mean, ci = float(np.nanmean(r)), bootstrap_ci(r, n_boot)

    def one(x):
        return float(np.sqrt(np.clip(x, 0.0, 1.0)))

    def two(x):
        x = np.clip(x, 0.0, 1.0)
        return float(np.sqrt(2 * x / (1 + x)))

    summary = {"retest": mean, "retest_ci": ci, "ceiling_one": one(mean), "ceiling_one_ci": (one(ci[0]), one(ci[1])),
               "ceiling_mean2": two(mean), "ceiling_mean2_ci": (two(ci[0]), two(ci[1])),
               "n_test": int(np.isfinite(r).sum())}
    return summary, r


def method_against_replicates(scores: np.ndarray, masks: np.ndarray, first: dict, second: dict, pos: np.ndarray,
                              retest: np.ndarray, n_boot: int = 1000) -> tuple[dict, dict]:
    """One method's LDS (margin) against the original runs, the replicates, and their mean, on test positions ``pos``.

    ``first``/``second``: ``{"margins", "losses"}`` (S, T) of the two runs. Returns the summary and
    the per-test LDS arrays. ``predicted_mean2`` is what the noise model of the module docstring
    predicts for the mean of two runs from the LDS against each run alone; ``spearman_with_retest``
    ranks the test images by their LDS and by their test-retest reliability.
    """
    out, per_test = {}, {}
    targets = {"original": first["margins"], "replicate": second["margins"],
               "mean2": (first["margins"] + second["margins"]) / 2}
    for name, margins in targets.items():
        summary, per_m, _ = lds_summary(scores, masks, margins[:, pos], first["losses"][:, pos], n_boot=n_boot)
        out[f"lds_margin_{name}"], out[f"lds_margin_{name}_ci"] = summary["lds_margin"], summary["lds_margin_ci"]
        per_test[name] = per_m
    factor = np.sqrt(2 / (1 + np.clip(retest[pos], 0.0, 1.0)))
    predicted = factor * (per_test["original"] + per_test["replicate"]) / 2
    out["predicted_mean2"] = float(np.nanmean(predicted))
    both = np.isfinite(per_test["original"]) & np.isfinite(retest[pos])
    # do the test images with the less noisy outputs get the higher LDS? (Spearman across test images)
    out["spearman_with_retest"] = spearman(per_test["original"][both], retest[pos][both]) if both.sum() > 2 else float("nan")
    out["n_test"] = int(len(pos))
    return out, per_test


def run_ceiling(data, config: LDSConfig | None = None, cache_dir: str | os.PathLike = LDS_DIR,
                out: str | os.PathLike = RESULT_PATH, arrays: str | os.PathLike = ARRAYS_PATH) -> dict:
    """Add ``noise_ceiling`` to an LDS result (``validate lds`` first) from the replicate models on disk.

    The original runs' outputs come from the subset models on disk or, where they are gone, from
    ``arrays``; the replicates must all be trained (``validate lds --noise-ceiling`` trains them).
    The methods scored are those of the result whose scores are cached for its checkpoint.
    """
    config = config or LDSConfig()
    start = time.perf_counter()
    test_idx = balanced_test_indices(data.test.labels, config.n_test, config.test_seed)
    previous = previous_run(out, arrays, config, data.source, test_idx)
    if previous is None:
        raise FileNotFoundError(f"no LDS result for this config and data in {out} and {arrays}; run `validate lds` first")
    result, extra = previous
    first = load_outputs(data, config, test_idx, cache_dir)
    if len(first["subsets"]) < config.n_subsets:
        first = extra["outputs"]
    second = load_outputs(data, config, test_idx, cache_dir, replicate=1)
    if len(second["subsets"]) < config.n_subsets:
        raise RuntimeError(f"{len(second['subsets'])} of {config.n_subsets} replicate models in {cache_dir}; "
                           "train them first (validate lds --noise-ceiling)")
    summary, retest = retest_reliability(first["margins"], second["margins"], config.n_boot)  # the loss, a monotone
    # function of the margin (softplus(-margin)), has the same ranks and so the same figures
    summary["replicate_test_accuracy_mean"] = float(second["test_accuracy"].mean())
    summary["replicate_minutes_mean"] = float(second["seconds"].mean() / 60)
    with np.load(arrays, allow_pickle=False) as blob:
        kept = {k: blob[k] for k in blob.files}
    sub_pos = kept["subset_positions"]
    masks = subset_masks(len(data.train), config)
    key = scores_key(result["checkpoint_sha256"], data.source, test_idx)
    methods, skipped = {}, {}
    for name, m in result["methods"].items():
        path = scores_path(Path(cache_dir) / "scores", name, key, sub_pos)
        if not m.get("computed") or m.get("checkpoint_sha256") != result["checkpoint_sha256"] or not path.exists():
            skipped[name] = "no cached scores for this checkpoint and these settings"
            continue
        with np.load(path, allow_pickle=False) as blob:
            scores = blob["scores"]
        pos = np.arange(len(test_idx)) if len(scores) == len(test_idx) else sub_pos
        methods[name], per_test = method_against_replicates(scores, masks, first, second, pos, retest, config.n_boot)
        kept[f"ceiling_{name}_vs_replicate"] = per_test["replicate"].astype(np.float32)
        kept[f"ceiling_{name}_vs_mean2"] = per_test["mean2"].astype(np.float32)
        log.info("%s: LDS margin %.4f (original) %.4f (replicate) %.4f (mean of two; predicted %.4f)", name,
                 methods[name]["lds_margin_original"], methods[name]["lds_margin_replicate"],
                 methods[name]["lds_margin_mean2"], methods[name]["predicted_mean2"])
    per_test = {f"{name}_margin": kept[f"ceiling_{name}_vs_mean2"] for name in methods}
    scored = {"default_solver": result.get("default_solver", "fast"), "methods": {n: result["methods"][n] for n in methods}}
    summary["paired_mean2"] = paired_comparisons(scored, {**per_test, "subset_positions": sub_pos}, config.n_boot)
    summary.update({"methods": methods, "skipped": skipped, "minutes": (time.perf_counter() - start) / 60,
                    "replicate_seed": f"subset_seed + k + {REPLICATE_SEED_STEP:,} (lds.REPLICATE_SEED_STEP)"})
    result["noise_ceiling"] = summary
    kept.update(ceiling_replicate_margins=second["margins"].astype(np.float32),
                ceiling_replicate_losses=second["losses"].astype(np.float32),
                ceiling_retest_on_margins=retest.astype(np.float32))
    save_npz_atomic(arrays, **kept)
    write_json_atomic(result, out)
    return result
