"""Influence results as people read them: top-k tables, the images behind them, and the summary file.

The notebook computes scores with :class:`.influence.InfluenceEngine`; this module turns a
:class:`.influence.TopK` into a printed table (one row per training image: kind, rank, index,
class, file, score) and into the ``(index, image, label, score)`` tuples that
:func:`.plots.plot_influence` draws, and writes ``results/influence.json`` in the format that
:func:`.slides.load_influence_results` documents and reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..engine.io import write_text_atomic
from ..engine.scores import TopK
from ..study.data import CIFAR10Data, CIFAR10Split


def top_k_images(best: TopK, row: int, train: CIFAR10Split) -> tuple[list, list]:
    """``(helpful, harmful)`` for test image ``row``: lists of (index, uint8 image, label, score)."""

    def pick(indices, scores):
        return [(int(i), train.images[int(i)], int(train.labels[int(i)]), float(s)) for i, s in zip(indices, scores, strict=True)]

    return pick(best.helpful[row], best.helpful_scores[row]), pick(best.harmful[row], best.harmful_scores[row])


def format_top_k(test_index: int, label: int, pred: int, best: TopK, row: int, train: CIFAR10Split, classes) -> str:
    """A fixed-width table of the top-k helpful and harmful training images for one test image."""
    label, pred = int(label), int(pred)
    lines = [
        f"test image {test_index}: true {classes[label]}, predicted {classes[pred]}"
        + ("" if label == pred else "  (misclassified)"),
        f"{'kind':8s} {'rank':>4s} {'index':>6s}  {'class':10s} {'file':22s} {'score':>11s}",
    ]
    for kind, idx, sc in (("helpful", best.helpful, best.helpful_scores), ("harmful", best.harmful, best.harmful_scores)):
        for rank, (i, s) in enumerate(zip(idx[row].tolist(), sc[row].tolist(), strict=True), start=1):
            lines.append(f"{kind:8s} {rank:4d} {i:6d}  {classes[int(train.labels[i])]:10s} {train.names[i]:22s} {s:+11.3e}")
    return "\n".join(lines)


def write_influence_summary(
    path: str | os.PathLike,
    test_indices: list[int],
    data: CIFAR10Data,
    predictions: torch.Tensor,
    best: TopK,
    scores: torch.Tensor,
    solver,
    train_meta: dict,
    notes: list[str] | None = None,
    seconds: float | None = None,
    rgb_test_index: int | None = None,
    checkpoint: str | None = None,
) -> Path:
    """Write the notebook's influence results (format: :func:`.slides.load_influence_results`) atomically."""
    path = Path(path)
    k = best.helpful.shape[1]
    entries = []
    for row, t in enumerate(test_indices):
        entries.append({
            "index": int(t),
            "label": int(data.test.labels[t]),
            "pred": int(predictions[t]),
            "note": (notes or [None] * len(test_indices))[row],
            "helpful": [{"index": int(i), "score": float(s)} for i, s in zip(best.helpful[row], best.helpful_scores[row], strict=True)],
            "harmful": [{"index": int(i), "score": float(s)} for i, s in zip(best.harmful[row], best.harmful_scores[row], strict=True)],
            "n_positive": int((scores[row] > 0).sum()),
        })
    summary = {
        "data_source": data.source,
        "checkpoint": checkpoint,
        "n_train": int(scores.shape[1]),
        "k": int(k),
        "solver": {"name": solver.name, **solver.describe()},
        "seconds": seconds,
        "test_accuracy": train_meta.get("test_accuracy"),
        "test_images": entries,
        "rgb_test_index": rgb_test_index,
    }
    return write_text_atomic(json.dumps(summary, indent=1, default=str), path)


def validation_figures(validation) -> list:
    """The leave-one-out scatters and the flipped-label curve from :func:`.slides.load_validation`.

    A missing result gives one figure that says so and names the command that makes it.
    """
    from matplotlib.figure import Figure

    from .evidence import flip_curves, loo_pairs
    from .plots import plot_fraction_found, plot_loo_scatter

    if not validation:
        fig = Figure(figsize=(8, 1.5))
        fig.text(0.02, 0.5, validation.message(), fontsize=12, va="center")
        return [fig]
    figs = []
    for kind, what in (("convex", "last layer (convex)"), ("network", "whole network")):
        pairs = loo_pairs(validation, kind)
        if pairs:
            fig = Figure(figsize=(4.2 * len(pairs), 4.2), layout="constrained")
            for ax, (label, pred, act) in zip(fig.subplots(1, len(pairs), squeeze=False)[0], pairs, strict=True):
                plot_loo_scatter(pred, act, ax=ax, title=f"{what}, {label}")
            figs.append(fig)
    curves = flip_curves(validation)
    if curves:
        figs.append(plot_fraction_found(curves, title="Finding flipped labels"))
    return figs


def choose_test_images(labels: torch.Tensor, predictions: torch.Tensor, classes, reader_index: int | None = None,
                       cls: str = "dog") -> tuple[list[int], list[str]]:
    """The notebook's test images: the first correctly classified ``cls`` image (the first ``cls``
    image if none is correct), the first misclassified image, and the reader's choice.

    Returns ``(indices, notes)``; the notes say why each was chosen.
    """
    if reader_index is not None and not 0 <= reader_index < len(labels):
        raise ValueError(f"test index {reader_index} is out of range: the test set has {len(labels)} images (0-{len(labels) - 1})")
    target = classes.index(cls)
    right = torch.nonzero((labels == target) & (predictions == labels)).flatten()
    if len(right):
        first, note = int(right[0]), f"a correctly classified {cls}"
    else:
        first, note = int(torch.nonzero(labels == target).flatten()[0]), f"a {cls} (none classified correctly)"
    indices, notes = [first], [note]
    wrong = torch.nonzero(predictions != labels).flatten()
    if len(wrong):
        indices.append(int(wrong[0]))
        notes.append("a misclassified image")
    if reader_index is not None:
        indices.append(int(reader_index))
        notes.append("the reader's choice")
    return indices, notes


def _read(path) -> dict | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _span(values, spec: str = ".2f") -> str:
    vals = [float(v) for v in values]
    lo, hi = format(min(vals), spec), format(max(vals), spec)
    return lo if lo == hi else f"{lo} to {hi}"


def findings(validation_path="results/validation.json", engine_path="bench/results/engine.json",
             train_path="results/train.json") -> list[str]:
    """The headline findings, each sentence built from a committed results file (or saying which
    command makes the missing one). The notebook prints them; the slides read the same files."""
    out = []
    train = _read(train_path)
    if train:
        out.append(f"The CNN reaches {100 * train['test_accuracy']:.1f}% test accuracy after "
                   f"{train['recipe']['epochs']} epochs ({train['seconds_per_epoch']:.1f} s per epoch on {train['device']}).")
    engine = _read(engine_path)
    if engine is None:
        out.append("Engine benchmark: not computed; run `python bench/engine.py`.")
    else:
        def num(key, spec=".2f"):
            value = engine.get(key)
            return "n/a" if value is None else format(float(value), spec)
        old = (engine.get("superseded_under_load") or {}).get("keys", {})
        if engine.get("t100_default_s") is not None:  # bench/trust.py's idle run
            nimarb = old.get("speedup_vs_nimarb")
            out.append(
                f"Engine, idle machine, 1 thread (100 test x {engine.get('n_train', 50000):,} training images): the default fast "
                f"solver takes {num('t100_default_s', '.0f')} s ({num('t100_default_epochs', '.1f')} training epochs), kronfluence "
                f"EK-FAC {num('kronfluence_t100_s', '.0f')} s; two curvature seeds agree at Spearman {num('seed_spearman_default')}; "
                f"on a small conv net, Pearson with exact influence {num('pearson_default_vs_exact_small', '.3f')}."
                + (f" Under load with the old default, {float(nimarb):,.0f}x faster than nimarb's package at its settings."
                   if nimarb is not None else ""))
            return out + _validation_findings(validation_path)
        out.append(
            f"Engine (100 test x {engine.get('n_train', 50000):,} training images): fast solver {num('t100_fast_s', '.0f')} s "
            f"({num('t100_fast_epochs', '.1f')} training epochs), {num('speedup_vs_nimarb', ',.0f')}x faster than nimarb's "
            f"package at its settings; kronfluence EK-FAC {num('kronfluence_t100_s', '.0f')} s. Spearman with CG: fast "
            f"{num('spearman_fast_vs_cg')}, kronfluence {num('spearman_kronfluence_vs_cg')}, nimarb {num('spearman_nimarb_vs_cg')}. "
            f"On a small conv net, Pearson with exact influence: fast {num('pearson_fast_vs_exact_small', '.3f')}, "
            f"kronfluence {num('pearson_kronfluence_vs_exact_small', '.3f')}.")
    return out + _validation_findings(validation_path)


def _validation_findings(validation_path) -> list[str]:
    out = []
    val = _read(validation_path)
    if val is None:
        out.append("Validation: not computed; run `python -m influence_over_inference validate all`.")
        return out
    if val.get("loo_convex_pearson"):
        out.append(f"Leave-one-out, last layer (convex): Pearson {_span(val['loo_convex_pearson'], '.4f')} "
                   f"over {len(val['loo_convex_pearson'])} test images (goal 0.95).")
    network = val.get("loo_network_pearson")
    if isinstance(network, dict) and network:
        parts = ", ".join(f"{solver} {_span(v)}" for solver, v in network.items())
        out.append(f"Leave-one-out, whole network (retrained, control subtracted): Pearson {parts} (goal 0.9; Koh & Liang 0.86).")
    if val.get("flipped_found_at_20") is not None:
        line = (f"Flipped labels (10%): checking the top 20% by self-influence finds {100 * val['flipped_found_at_20']:.0f}% "
                f"of them, by training loss {100 * val.get('loss_found_at_20', float('nan')):.0f}%")
        if val.get("last_layer_found_at_20") is not None:
            line += f", by last-layer self-influence {100 * val['last_layer_found_at_20']:.0f}%"
        out.append(line + f" (random: {100 * val.get('random_found_at_20', 0.2):.0f}%).")
    if val.get("sign_harmful_removed_delta") is not None:
        out.append(f"The sign, by retraining ({val.get('sign_n_test', '?')} misclassified test images): removing the 100 most "
                   f"harmful changes their test loss by {val['sign_harmful_removed_delta']:+.2f} on average, removing the 100 "
                   f"most helpful by {val['sign_helpful_removed_delta']:+.2f}.")
    return out
