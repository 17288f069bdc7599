"""How far the rankings can be trusted: the LDS against retraining and the seed stability of the default solver.

Two result files answer it, and this module reads them, draws them and says what they mean:

- ``results/lds.json`` (``python -m influence_over_inference validate lds``): the linear
  datamodeling score (LDS; Park et al., "TRAK", ICML 2023). Many models are retrained on random
  halves of the training set; for each test image, the Spearman correlation across the subsets
  between the summed scores of each subset's training images and that subset model's margin on
  the test image; averaged over test images, with a 95% bootstrap interval. Keys read:
  ``n_subsets``, ``n_test``, ``alpha``, ``default_solver`` and ``methods.<name>.lds_margin``,
  ``lds_margin_ci`` ([low, high]), ``lds_loss``, ``lds_loss_ci``, ``n_models``.
- ``bench/results/engine.json`` (the benchmark): ``seed_spearman_default`` (two fits of the
  default solver that differ only in the seed of their curvature sample: Spearman over all
  training images, mean over test images), ``seed_top10_overlap_default`` (the share of their
  top-10 lists in common, 0-1, or a count out of 10) and ``pearson_default_vs_exact_small``
  (against exact influence on a small conv net).

A missing file, or one without these keys, gives a figure and a sentence that say "not computed
yet" and name the command that makes it. Figures follow :mod:`.plots`: they take data, return a
:class:`~matplotlib.figure.Figure`, and never show or save themselves.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .slide_inputs import COMMANDS, Missing, read_json

log = logging.getLogger(__name__)

LDS_COMMAND = "python -m influence_over_inference validate lds"
STABILITY_COMMAND = COMMANDS["engine"]

# The goals of issue 9 that the figures mark: seed-to-seed Spearman, shared top-10, Pearson with exact.
STABILITY_GOALS = {"seed_spearman_default": 0.95, "seed_top10_overlap_default": 0.9, "pearson_default_vs_exact_small": 0.95}
STABILITY_LABELS = {
    "seed_spearman_default": "Spearman, two seeds\n(all training images)",
    "seed_top10_overlap_default": "top-10 shared,\ntwo seeds",
    "pearson_default_vs_exact_small": "Pearson with exact\n(small conv net)",
}


def load_lds(path: str | os.PathLike = "results/lds.json"):
    """``results/lds.json`` (see the module docstring), or :class:`Missing` when it is absent,
    unreadable, or holds no method with a numeric ``lds_margin``."""
    lds = read_json(Path(path), "LDS against retraining", LDS_COMMAND, missing="not computed yet")
    if isinstance(lds, Missing):
        return lds
    methods = lds.get("methods") if isinstance(lds, dict) else None
    if not isinstance(methods, dict) or not any(isinstance(m, dict) and _number(m.get("lds_margin")) is not None
                                                for m in methods.values()):
        return Missing("LDS against retraining", path, LDS_COMMAND, reason="holds no method's lds_margin yet")
    return lds


def load_stability(path: str | os.PathLike = "bench/results/engine.json"):
    """The stability keys of the benchmark summary (module docstring), or :class:`Missing` when
    the file is absent or has no ``seed_spearman_default`` yet."""
    engine = read_json(Path(path), "seed stability of the default solver", STABILITY_COMMAND, missing="not computed yet")
    if isinstance(engine, Missing):
        return engine
    if _number(engine.get("seed_spearman_default")) is None:
        return Missing("seed stability of the default solver", path, STABILITY_COMMAND,
                       reason="has no seed_spearman_default yet")
    return engine


def _number(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out == out else None  # NaN counts as missing


def top10_share(engine: Mapping) -> float | None:
    """``seed_top10_overlap_default`` as a share 0-1 (a count out of 10 is divided by 10)."""
    value = _number(engine.get("seed_top10_overlap_default"))
    if value is None:
        return None
    return value / 10 if value > 1 else value


def lds_rows(lds: Mapping, key: str = "lds_margin") -> list[tuple[str, float, tuple[float, float] | None, int | None]]:
    """``(method, value, (low, high) or None, n_models)`` for every method with a number under
    ``key`` (``"lds_margin"`` or ``"lds_loss"``), highest first."""
    rows = []
    for name, m in lds.get("methods", {}).items():
        value = _number(m.get(key)) if isinstance(m, dict) else None
        if value is None:
            continue
        ci = m.get(f"{key}_ci")
        ci = (float(ci[0]), float(ci[1])) if isinstance(ci, (list, tuple)) and len(ci) == 2 else None
        n_models = m.get("n_models")
        rows.append((name, value, ci, int(n_models) if _number(n_models) is not None else None))
    return sorted(rows, key=lambda r: -r[1])


def _earlier_checkpoint(lds: Mapping) -> list[str]:
    """The methods ``validate lds`` scored on another checkpoint than the rest (``methods_from_other_checkpoints``)."""
    return list(lds.get("methods_from_other_checkpoints") or ())


def _like_for_like(lds: Mapping, default: str, earlier: list[str], rows: Mapping) -> list[str]:
    """The methods comparable with ``default``: scored on the same checkpoint and as many test images."""
    methods = lds.get("methods", {})

    def n_test(name):
        return methods.get(name, {}).get("n_test") if isinstance(methods.get(name), dict) else None

    return [k for k in rows if k not in earlier and n_test(k) == n_test(default)]


def _missing_figure(missing: Missing) -> Figure:
    fig = Figure(figsize=(8, 1.3))
    ax = fig.subplots()  # an (invisible) axes: the notebook's inline backend skips figures without one
    ax.axis("off")
    ax.text(0.0, 0.5, missing.message(), fontsize=11, va="center", transform=ax.transAxes)
    return fig


def draw_lds_bars(ax: Axes, rows: list, default: str | None, labels: list[str], fontsize: float | None = None,
                  ceiling: float | None = None, ceiling_label: str | None = None) -> None:
    """Horizontal bars, top to bottom, of :func:`lds_rows`-style ``rows`` with their 95% intervals, the default in colour;
    ``ceiling`` (:func:`noise_ceiling`'s against one model) as a dashed line, labelled ``ceiling_label`` for a legend."""
    values = [v for _, v, _, _ in rows]
    err = [[v - (ci or (v, v))[0] for _, v, ci, _ in rows], [(ci or (v, v))[1] - v for _, v, ci, _ in rows]]
    y = list(range(len(rows)))[::-1]
    ax.barh(y, values, xerr=err, capsize=3, color=["#0969da" if name == default else "#8c959f" for name, _, _, _ in rows])
    ax.set_yticks(y, labels)
    if fontsize is not None:
        ax.tick_params(axis="both", labelsize=fontsize)
    ax.axvline(0, color="black", linewidth=0.8)
    if ceiling is not None:
        ax.axvline(ceiling, color="#cf222e", linestyle="--", linewidth=1.2, label=ceiling_label)


def plot_lds(lds: Mapping, ax: Axes | None = None, key: str = "lds_margin") -> Figure:
    """Horizontal bars: each method's LDS (``key``) with its 95% interval, the default solver in
    colour, the number of trained models each method used in its label."""
    rows = lds_rows(lds, key)
    if ax is None:
        fig = Figure(figsize=(7.5, 0.45 * len(rows) + 1.4), layout="constrained")
        ax = fig.subplots()
    else:
        fig = ax.figure
    default = lds.get("default_solver")
    earlier = set(_earlier_checkpoint(lds))
    names = [f"{name}" + (f" ({n} models)" if n and n > 1 else "") + (" [default]" if name == default else "")
             + (" [earlier checkpoint]" if name in earlier else "") for name, _, _, n in rows]
    ceiling = noise_ceiling(lds)
    draw_lds_bars(ax, rows, default, names, ceiling=ceiling and ceiling[1],
                  ceiling_label=ceiling and f"noise ceiling {ceiling[1]:.2f}:\nno method can\npass it here")
    if ceiling is not None:
        ax.legend(loc="center right", fontsize=8)
    what = "margin" if key == "lds_margin" else "loss"
    ax.set_xlabel(f"LDS ({what}): Spearman, across retrained subsets, of predicted vs actual")
    ax.set_title(f"Does influence predict retraining? {lds.get('n_subsets', '?')} random halves, "
                 f"{lds.get('n_test', '?')} test images", fontsize=11)
    return fig


def plot_stability(engine: Mapping, ax: Axes | None = None) -> Figure:
    """Bars for the default solver's seed-to-seed Spearman, shared top-10 and Pearson with exact
    influence (those present), each with its goal marked."""
    values = {"seed_spearman_default": _number(engine.get("seed_spearman_default")),
              "seed_top10_overlap_default": top10_share(engine),
              "pearson_default_vs_exact_small": _number(engine.get("pearson_default_vs_exact_small"))}
    values = {k: v for k, v in values.items() if v is not None}
    if ax is None:
        fig = Figure(figsize=(7.5, 3.2), layout="constrained")
        ax = fig.subplots()
    else:
        fig = ax.figure
    x = range(len(values))
    ax.bar(x, list(values.values()), color="#0969da", width=0.55)
    for i, (key, v) in enumerate(values.items()):
        ax.plot([i - 0.35, i + 0.35], [STABILITY_GOALS[key]] * 2, color="black", linestyle="--", linewidth=1)
        ax.text(i, v + 0.02, f"{v:.2f}", ha="center", va="bottom")
    ax.set_xticks(list(x), [STABILITY_LABELS[k] for k in values])
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("agreement (dashed: goal)")
    ax.set_title("The default solver: stable across curvature samples? faithful to the exact answer?", fontsize=11)
    return fig


def noise_ceiling(lds: Mapping) -> tuple[float, float, float | None] | None:
    """``(test-retest Spearman, ceiling against one model, against the mean of two)`` from ``lds["noise_ceiling"]``
    (``validate lds --noise-ceiling``, :mod:`..experiments.lds_ceiling`), or None where it was not measured."""
    c = lds.get("noise_ceiling") if isinstance(lds, Mapping) else None
    if not isinstance(c, Mapping) or _number(c.get("retest")) is None or _number(c.get("ceiling_one")) is None:
        return None
    return float(c["retest"]), float(c["ceiling_one"]), _number(c.get("ceiling_mean2"))


def _ceiling_sentence(lds: Mapping, rows: Mapping, default: str) -> str:
    """The noise ceiling in words, with how much of it the default and the best of our ensembles reach; "" if absent."""
    ceiling = noise_ceiling(lds)
    if ceiling is None:
        return ""
    r, one, _ = ceiling
    line = (f"How high could an LDS be? Trained twice on the same halves with different seeds, the subset models' "
            f"margins agree at Spearman {r:.2f} only, so no attribution method can exceed about {one:.2f} against one "
            f"retrained model (the noise ceiling); the default reaches {rows[default][0] / one:.0%} of it")
    ours = [k for k in rows if k.startswith("fast_ens") and k not in _earlier_checkpoint(lds)]
    if ours:
        best = max(ours, key=lambda k: rows[k][0])
        line += f", {best} ({rows[best][2]} models) {rows[best][0] / one:.0%}"
    return line + "."


def trust_figures(lds, engine) -> list[Figure]:
    """The LDS figure and the stability figure; a missing result gives a figure naming its command."""
    return [plot_lds(lds) if lds else _missing_figure(lds), plot_stability(engine) if engine else _missing_figure(engine)]


def _paired(lds: Mapping, ours: str, rival: str) -> str:
    """``ahead by +0.03 (paired over the same 500 test images, 95% interval +0.02 to +0.04)`` (or ``behind``) from
    ``lds["paired"]`` (:func:`..experiments.lds_run.paired_comparisons`), or "" where it holds no such pair."""
    c = (lds.get("paired") or {}).get(ours, {}).get(rival)
    if not isinstance(c, dict) or _number(c.get("difference")) is None or not c.get("ci"):
        return ""
    return (f"{'ahead' if c['difference'] > 0 else 'behind'} by {c['difference']:+.3f} (paired over the same "
            f"{c.get('n_test', '?')} test images, 95% interval {c['ci'][0]:+.3f} to {c['ci'][1]:+.3f})")


def _sha(path) -> str | None:
    from ..engine.hashing import file_sha256

    return file_sha256(path)[:16] if path is not None and Path(path).is_file() else None


def trust_sentences(lds, engine, checkpoint: str | os.PathLike | None = None) -> list[str]:
    """How far the rankings can be trusted, in plain words, each sentence built from the numbers
    in the two files (or saying which command makes the missing one). ``checkpoint``: the model the
    reader is looking at; where the files measured another training of the recipe, a sentence says so."""
    out = []
    if not engine:
        out.append(f"Seed stability: not computed yet; run `{engine.command}`.")
    else:
        s, share = _number(engine["seed_spearman_default"]), top10_share(engine)
        shared = "" if share is None else f", and share {10 * share:.1f} of their top 10"
        head = f"Two fits of the default solver that differ only in their random curvature sample agree at Spearman {s:.2f}{shared}"
        if s >= 0.95 and (share is None or share >= 0.9):
            out.append(head + ": the lists shown are a property of the model, not of the sample.")
        elif s >= 0.8:
            out.append(head + ": the bulk of the ranking holds, but a few of the top images change from one seed to "
                       "the next; read a top-k list as typical of the most helpful or harmful, not as an exact order.")
        else:
            out.append(head + ": another seed reorders much of the list; trust only what several seeds agree on.")
    if not lds:
        out.append(f"LDS against retraining: not computed yet; run `{lds.command}`.")
        return out
    rows = {name: (v, ci, n) for name, v, ci, n in lds_rows(lds)}
    default = lds.get("default_solver") if lds.get("default_solver") in rows else next(iter(rows))
    v, ci, _ = rows[default]
    interval = f" (95% interval {ci[0]:.2f} to {ci[1]:.2f})" if ci else ""
    line = (f"Retrained on {lds.get('n_subsets', '?')} random halves of the training set, the models' margins on "
            f"{lds.get('n_test', '?')} test images follow the default solver's predictions at an LDS of {v:.2f}{interval}")
    others = [f"{name} {rows[name][0]:.2f}" for name in ("grad_dot", "random") if name in rows]
    if others:
        line += f"; gradient dot product and random scores reach {', '.join(others)}"
    versus = _paired(lds, default, "grad_dot")
    if versus:
        line += f"; against gradient dot product it is {versus}"
    earlier = [name for name in _earlier_checkpoint(lds) if name in rows]
    n_models = rows[default][2] or 1
    peers = [k for k in _like_for_like(lds, default, earlier, rows) if (rows[k][2] or 1) <= n_models]
    best = max(peers, key=lambda k: rows[k][0])
    if best != default:
        line += (f"; the best method with as many trained models or fewer, on the same test images, is {best} "
                 f"({rows[best][0]:.2f})")
    ensembles = [k for k in _like_for_like(lds, default, earlier, rows) if (rows[k][2] or 1) > n_models]
    if ensembles:
        top = max(ensembles, key=lambda k: rows[k][0])
        line += f"; averaged over {rows[top][2]} trained models, {top} reaches {rows[top][0]:.2f}"
    out.append(line + ".")
    ceiling = _ceiling_sentence(lds, rows, default)
    if ceiling:
        out.append(ceiling)
    for ours, rivals in (lds.get("paired") or {}).items():  # our ensembles against TRAK over the same models
        for rival in rivals:
            versus = _paired(lds, ours, rival)
            if ours != default and rival.startswith("trak_") and ours in rows and rival in rows and versus:
                out.append(f"Averaged over the same {rows[ours][2]} trained models, {ours} reaches {rows[ours][0]:.2f} and "
                           f"TRAK {rows[rival][0]:.2f}: ours is {versus}"
                           + (" (both scored on an earlier training of the recipe)." if ours in earlier else "."))
    if earlier:
        out.append(f"Scored on an earlier training of the same recipe (training is not bit-reproducible across "
                   f"machines), so not like for like with the rest: {', '.join(earlier)}.")
    sha, measured = _sha(checkpoint), lds.get("checkpoint_sha256")
    if sha and measured and not str(measured).startswith(sha) and not sha.startswith(str(measured)):
        out.append(f"This LDS was measured on another training of the same recipe (checkpoint {str(measured)[:16]}) than "
                   f"the model here ({sha}): training is not bit-reproducible across machines, so read it as the "
                   "solver's score on this recipe, not on these exact weights.")
    if ci and ci[0] <= 0:
        out.append("That is not distinguishable from chance: the scores do not predict what retraining does.")
    elif v < 0.2:
        out.append("So the scores carry a real but weak signal about retraining: use them to find images worth "
                   "inspecting (mislabelled, atypical, near-duplicates), not to predict the effect of removing data.")
    else:
        out.append("So the scores predict a good part of what retraining does: which groups of training images "
                   "a prediction leans on, more reliably than any single image's exact effect.")
    return out
