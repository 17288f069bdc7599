"""Metrics for comparing predictions with reality: Pearson, Spearman, ROC-AUC, fraction found."""

from __future__ import annotations

import math

import numpy as np

# Metrics


def pearson(x, y) -> float:
    """Pearson correlation of two 1-d arrays (nan if either is constant)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"pearson needs two 1-d arrays of equal length >= 2, got {x.shape} and {y.shape}")
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(xc @ xc) * float(yc @ yc))
    return float(xc @ yc / denom) if denom > 0 else float("nan")


def rankdata(x) -> np.ndarray:
    """Ranks 1..n of a 1-d array, ties given their average rank (as scipy.stats.rankdata)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    start = 0
    while start < len(x):
        stop = start + 1
        while stop < len(x) and sorted_x[stop] == sorted_x[start]:
            stop += 1
        ranks[order[start:stop]] = 0.5 * (start + stop - 1) + 1.0
        start = stop
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation: Pearson of the (tie-averaged) ranks."""
    return pearson(rankdata(x), rankdata(y))


def roc_auc(scores, positives) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positives`` (higher = more positive).

    The probability that a random positive scores above a random negative, ties counting one half
    (the Mann-Whitney U statistic divided by n_pos * n_neg).
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    if scores.shape != positives.shape:
        raise ValueError(f"scores {scores.shape} and positives {positives.shape} differ in shape")
    n_pos = int(positives.sum())
    n_neg = len(positives) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc needs at least one positive and one negative")
    ranks = rankdata(scores)
    u = ranks[positives].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def fraction_found(scores, positives) -> tuple[np.ndarray, np.ndarray]:
    """Check items in order of decreasing score: fraction checked (0..1) vs fraction of positives found.

    Returns two arrays of length ``n + 1`` starting at (0, 0). Ties are broken by index (stable).
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    if scores.shape != positives.shape:
        raise ValueError(f"scores {scores.shape} and positives {positives.shape} differ in shape")
    if not positives.any():
        raise ValueError("fraction_found needs at least one positive")
    order = np.argsort(-scores, kind="stable")
    found = np.concatenate([[0], np.cumsum(positives[order])]) / positives.sum()
    checked = np.arange(len(scores) + 1) / len(scores)
    return checked, found


def found_at(checked: np.ndarray, found: np.ndarray, fraction: float) -> float:
    """Fraction found after checking ``fraction`` of the data (the first ``floor(fraction * n)`` items)."""
    n = len(checked) - 1
    return float(found[int(math.floor(fraction * n + 1e-9))])
