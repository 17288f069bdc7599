"""Formatting helpers shared by the slide pages: numbers, correlations, footers, "not computed"."""

from __future__ import annotations

import numpy as np

from . import plots
from .slide_inputs import Missing, describe_source

NOT_COMPUTED = "not computed"


# Solver settings worth a mention on a slide, in this order (the rest stay in the results file).
SOLVER_KEYS = ("curvature", "damping", "rank", "n_samples", "n_fits", "scale", "depth", "r", "batch_size",
               "tol", "max_iter")


def _get(result, key, default=None):
    """``result[key]``, or None when the result or the key is missing."""
    if isinstance(result, Missing) or not isinstance(result, dict):
        return default
    return result.get(key, default)


def _fmt(value, spec: str = ".2f", missing: str = NOT_COMPUTED) -> str:
    """Format a number, a list of numbers or a mapping of them; None -> "not computed"."""
    if value is None:
        return missing
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_fmt(v, spec)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v, spec) for v in value)
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not np.isfinite(v):
        return missing
    return format(v, spec)


def _corr(value) -> str:
    """Correlations: one number, a list, or solver -> list (see plots.format_correlation)."""
    if value is None:
        return NOT_COMPUTED
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_corr(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_corr(v) for v in value)
    return plots.format_correlation(float(value))


def _pct(value, decimals: int = 0) -> str:
    if value is None:
        return NOT_COMPUTED
    if isinstance(value, (list, tuple)):
        return ", ".join(_pct(v, decimals) for v in value)
    return f"{100 * float(value):.{decimals}f}%"


def _footer(*parts) -> str:
    return "   \u00b7   ".join(p for p in parts if p)


def _source(result) -> str | None:
    if isinstance(result, Missing) or not isinstance(result, dict):
        return None
    return describe_source(result.get("data_source")) if "data_source" in result else None


def _n_train(inputs) -> int | None:
    for result in (inputs.train, inputs.influence):
        n = _get(result, "n_train", None)
        if n:
            return int(n)
    return len(inputs.data.train) if inputs.data is not None else None


def _count(n: int | None) -> str:
    return f"{n:,}" if n else "?"
