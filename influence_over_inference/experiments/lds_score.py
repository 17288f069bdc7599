"""The linear datamodeling score (LDS; Park et al., "TRAK", ICML 2023): attribution judged by retraining.

For a test image t, each training subset S_k (a boolean mask) gets a predicted output, the sum of
the attribution scores of the training images it contains, and an actual output, that of the
model retrained on S_k (:mod:`.lds`). LDS(t) is the Spearman correlation across the subsets of
predicted and actual; the method's LDS is the mean over test images, with a 95% bootstrap
interval over test images.

Sign: all scores here follow the project's convention (:mod:`..engine.scores`): positive =
helpful, the predicted rise of the test loss when the image is removed. A subset's predicted loss
is then ``const - sum_{j in S} score_j`` and its predicted margin ``const + sum_{j in S} score_j``,
so the LDS on the margin correlates the summed scores with the margin and the LDS on the loss
correlates them with minus the loss.
"""

from __future__ import annotations

import numpy as np


def subset_predictions(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Summed scores of each subset's images: (T, N) scores and (S, N) masks -> (T, S), float64."""
    scores = np.asarray(scores)
    masks = np.asarray(masks)
    if scores.ndim != 2 or masks.ndim != 2 or scores.shape[1] != masks.shape[1]:
        raise ValueError(f"scores (T, N) and masks (S, N) must share N; got {scores.shape} and {masks.shape}")
    return scores.astype(np.float64) @ masks.astype(np.float64).T


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks along the last axis, ties given their average rank (as scipy.stats.rankdata)."""
    from scipy.stats import rankdata

    return rankdata(x, axis=-1)


def rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of ``a`` with the same row of ``b``: (T, S), (T, S) -> (T,).

    A row that is constant in either gives nan (no ranking to compare).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] < 2:
        raise ValueError(f"need two (T, S) arrays of equal shape with S >= 2, got {a.shape} and {b.shape}")
    ra, rb = _ranks(a), _ranks(b)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    denom = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(1) / np.where(denom > 0, denom, 1.0), np.nan)


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling its entries with replacement).

    nan entries are left out before resampling.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_difference(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, tuple[float, float], int]:
    """Mean of ``a - b`` over the test images both score (finite), with a paired percentile bootstrap interval.

    ``a`` and ``b`` are two methods' per-test LDS on the same test images; resampling the images
    jointly keeps what the two share (an image every method ranks badly), so the interval of the
    difference is narrower than the two methods' intervals side by side. Returns
    ``(difference, (low, high), images used)``.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two per-test vectors of one length, got {a.shape} and {b.shape}")
    d = (a - b)[np.isfinite(a) & np.isfinite(b)]
    if len(d) == 0:
        return float("nan"), (float("nan"), float("nan")), 0
    return float(d.mean()), bootstrap_ci(d, n_boot, seed, level), int(len(d))


def lds_per_test(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray, output: str = "margin") -> np.ndarray:
    """LDS of each test image: (T, N) scores, (S, N) masks, (S, T) actual outputs -> (T,) Spearman.

    ``output`` is ``"margin"`` (higher = better for the test image) or ``"loss"`` (lower = better);
    scores follow the project's sign (positive = helpful; see the module docstring).
    """
    if output not in ("margin", "loss"):
        raise ValueError(f"output must be 'margin' or 'loss', got {output!r}")
    pred = subset_predictions(scores, masks)  # (T, S)
    actual = np.asarray(outputs, dtype=np.float64).T  # (T, S)
    if actual.shape != pred.shape:
        raise ValueError(f"outputs must be (S, T) = {pred.shape[::-1]}, got {np.asarray(outputs).shape}")
    return rowwise_spearman(pred, actual if output == "margin" else -actual)


def lds_summary(scores: np.ndarray, masks: np.ndarray, margins: np.ndarray, losses: np.ndarray,
                subset_positions: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0
                ) -> tuple[dict, np.ndarray, np.ndarray]:
    """LDS on the margin and the loss with 95% bootstrap intervals, and the per-test values.

    ``scores`` (T, N) for the T test images of ``margins``/``losses`` (S, T). ``subset_positions``:
    positions (into T) of the test subset every method was scored on; adds ``lds_margin_subset``
    (and its interval) over those.
    """
    per_margin = lds_per_test(scores, masks, margins, "margin")
    per_loss = lds_per_test(scores, masks, losses, "loss")
    out = {
        "n_test": int(np.isfinite(per_margin).sum()),
        "lds_margin": float(np.nanmean(per_margin)),
        "lds_margin_ci": list(bootstrap_ci(per_margin, n_boot, seed)),
        "lds_loss": float(np.nanmean(per_loss)),
        "lds_loss_ci": list(bootstrap_ci(per_loss, n_boot, seed)),
    }
    if subset_positions is not None:
        out["lds_margin_subset"] = float(np.nanmean(per_margin[subset_positions]))
        out["lds_margin_subset_ci"] = list(bootstrap_ci(per_margin[subset_positions], n_boot, seed))
        out["lds_loss_subset"] = float(np.nanmean(per_loss[subset_positions]))
        out["lds_loss_subset_ci"] = list(bootstrap_ci(per_loss[subset_positions], n_boot, seed))
    return out, per_margin, per_loss
