"""Every figure of the project: data, training, influence, validation and speed.

Each function takes data (numpy arrays, tensors, lists, dicts: never file paths) and an optional
place to draw (``ax`` for one-panel plots, ``fig`` -- a Figure or a SubFigure -- for multi-panel
ones) and returns the :class:`~matplotlib.figure.Figure` it drew on. None of them calls
``plt.show()`` or ``savefig()``: the notebook displays the figure, the slides place it on a page.
Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot state), so they never
pile up in pyplot's figure manager. Font sizes follow ``matplotlib.rcParams``: wrap a call in
``matplotlib.rc_context({"font.size": 16})`` to enlarge everything for slides.

32x32 CIFAR-10 images are always drawn with nearest-neighbour interpolation so pixels stay sharp.
The sign convention of the scores is the project's (see :mod:`influence_over_inference.engine.scores`):
a score is the predicted change in the test loss if the training image were removed; positive =
helpful, negative = harmful.

Figure conventions follow Koh & Liang (2017), "Understanding Black-box Predictions via Influence
Functions" (ICML): leave-one-out scatter of predicted against actual change in test loss, and the
fraction of flipped labels found against the fraction of training data checked.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure, SubFigure

log = logging.getLogger(__name__)

# Colours used throughout: helpful (removing it raises the test loss) and harmful.
HELPFUL_COLOR = "#1a7f37"


HARMFUL_COLOR = "#cf222e"


# Pixel value at or above which an annotated grayscale cell gets black text (white below).
TEXT_THRESHOLD = 128


def _as_uint8_images(images) -> np.ndarray:
    """uint8 (N, H, W, 3) numpy array from a tensor or array (also accepts one (H, W, 3) image)."""
    arr = np.asarray(images.numpy() if hasattr(images, "numpy") else images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) or (H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (0-255), got {arr.dtype}")
    return arr


def _root(fig: Figure | SubFigure) -> Figure:
    """The top-level Figure of a Figure or SubFigure."""
    return fig if isinstance(fig, Figure) else fig.figure


def _new_or(fig, figsize) -> Figure | SubFigure:
    return Figure(figsize=figsize, layout="constrained") if fig is None else fig


def _new_ax(ax: Axes | None, figsize) -> tuple[Figure, Axes]:
    if ax is not None:
        return _root(ax.figure), ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _show_image(ax: Axes, image: np.ndarray) -> None:
    ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_image_grid(images, labels, classes: Sequence[str], ncols: int = 8, titles=None,
                    fig: Figure | SubFigure | None = None) -> Figure:
    """A grid of images, each titled with its class name (or with ``titles[i]`` when given).

    ``images``: uint8 (N, 32, 32, 3); ``labels``: N class indices into ``classes``.
    """
    imgs = _as_uint8_images(images)
    labels = [int(v) for v in np.asarray(labels).reshape(-1)]
    if len(labels) != len(imgs):
        raise ValueError(f"{len(imgs)} images but {len(labels)} labels")
    if titles is not None and len(titles) != len(imgs):
        raise ValueError(f"{len(imgs)} images but {len(titles)} titles")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    n = len(imgs)
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig = _new_or(fig, (1.6 * ncols, 1.8 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for i, ax in enumerate(axes):
        if i >= n:
            ax.set_axis_off()
            continue
        _show_image(ax, imgs[i])
        ax.set_title(titles[i] if titles is not None else classes[labels[i]])
    return _root(fig)


def plot_rgb_channels(image, title: str | None = None, crop: tuple[int, int, int] | None = None,
                      ncols: int = 1, panel_inches: float = 10.0, fontsize: float | None = None,
                      fig: Figure | SubFigure | None = None) -> Figure:
    """How a machine sees an image: the colour image beside its R, G and B channels in grayscale,
    every pixel of each channel annotated with its value (0-255).

    ``image``: uint8 (32, 32, 3). ``crop=(row, col, size)`` annotates only that ``size`` x
    ``size`` window (marked with a box on the colour image), so the numbers can be large enough
    for a slide; by default all 32x32 pixels are annotated (3 x 1024 numbers). ``ncols`` panels
    per row: 1 (default) stacks the four panels, each ``panel_inches`` (10) wide -- the layout
    whose numbers stay legible where a notebook is shown about 1,000 pixels wide (GitHub), since
    wider figures are scaled down; 2 gives a 2x2 layout, 4 a row (for slides, with ``crop``). Text is black on light pixels, white on dark ones.
    """
    img = _as_uint8_images(image)[0]
    h, w, _ = img.shape
    r0, c0, size_r, size_c = 0, 0, h, w
    if crop is not None:
        r0, c0, size = (int(v) for v in crop)
        if size < 1 or r0 < 0 or c0 < 0 or r0 + size > h or c0 + size > w:
            raise ValueError(f"crop {crop} does not fit in a {h}x{w} image")
        size_r = size_c = size
    if ncols not in (1, 2, 4):
        raise ValueError(f"ncols must be 1, 2 or 4, got {ncols}")
    nrows = 4 // ncols
    if fontsize is None:
        # a cell is panel_inches / size_c inches wide; "255" needs about 2 character widths of it
        fontsize = 72.0 * panel_inches / size_c * 0.30
    fig = _new_or(fig, (panel_inches * ncols, panel_inches * nrows * 1.08))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    _show_image(axes[0], img)
    axes[0].set_title("colour" if crop is None else "colour (yellow box)")
    if crop is not None:
        from matplotlib.patches import Rectangle

        axes[0].add_patch(Rectangle((c0 - 0.5, r0 - 0.5), size_c, size_r, fill=False,
                                    edgecolor="yellow", linewidth=2.5))
    for ch, (ax, name) in enumerate(zip(axes[1:], ("red", "green", "blue"), strict=True)):
        values = img[r0:r0 + size_r, c0:c0 + size_c, ch]
        ax.imshow(values, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{name} channel" + (" (box)" if crop is not None else ""))
        for (r, c), v in np.ndenumerate(values):
            ax.text(c, r, str(int(v)), ha="center", va="center", fontsize=fontsize,
                    color="black" if v >= TEXT_THRESHOLD else "white")
    if title:
        fig.suptitle(title)
    return _root(fig)


def _score_title(classes, label: int, index: int, score: float) -> str:
    return f"{classes[int(label)]}\n#{int(index)}\n{score:+.2e}"


def plot_influence(test_image, test_label: int, test_pred: int, classes: Sequence[str],
                   helpful, harmful, k: int | None = None, title: str | None = None,
                   fig: Figure | SubFigure | None = None) -> Figure:
    """A test image beside its top-k most helpful (top row) and most harmful (bottom row) training
    images.

    ``helpful`` and ``harmful``: sequences of ``(index, image uint8 (32, 32, 3), label, score)``,
    most influential first; ``k`` how many of each to show (default: all given). Each training
    image is titled with its class, its index in the training set and its score (predicted change
    in the test loss if it were removed: positive = helpful, negative = harmful).
    """
    helpful = list(helpful)[:k] if k is not None else list(helpful)
    harmful = list(harmful)[:k] if k is not None else list(harmful)
    ncol = max(len(helpful), len(harmful), 1)
    fig = _new_or(fig, (1.7 * (ncol + 1.6), 4.6))
    grid = fig.add_gridspec(2, ncol + 1, width_ratios=[1.6] + [1] * ncol)
    ax_test = fig.add_subplot(grid[:, 0])
    _show_image(ax_test, _as_uint8_images(test_image)[0])
    ok = "correct" if int(test_label) == int(test_pred) else "wrong"
    ax_test.set_title(f"test image\ntrue: {classes[int(test_label)]}\n"
                      f"predicted: {classes[int(test_pred)]}\n({ok})")
    for row, (items, name, color) in enumerate(((helpful, "helpful", HELPFUL_COLOR),
                                                 (harmful, "harmful", HARMFUL_COLOR))):
        for j in range(ncol):
            ax = fig.add_subplot(grid[row, j + 1])
            if j >= len(items):
                ax.set_axis_off()
                continue
            index, image, label, score = items[j]
            _show_image(ax, _as_uint8_images(image)[0])
            ax.set_title(_score_title(classes, label, index, float(score)), color=color)
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(3)
            if j == 0:
                ax.set_ylabel(f"most {name}", color=color)
    if title:
        fig.suptitle(title)
    return _root(fig)


def format_correlation(r: float) -> str:
    """Two decimals, or four when two would round a near-perfect correlation up to 1.00."""
    if not np.isfinite(r):
        return "n/a"
    return f"{r:.4f}" if abs(r) >= 0.995 and abs(r) < 1.0 else f"{r:.2f}"


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import rankdata

    return _pearson(rankdata(x), rankdata(y))


def plot_loo_scatter(predicted, actual, ax: Axes | None = None, title: str | None = None,
                     label: str | None = None, separator: str = ", ") -> Figure:
    """Leave-one-out check: predicted (x) against actual (y) change in the test loss when one
    training image is removed, with the y = x line; Pearson and Spearman in the title.

    ``title`` goes on the first line of the title, above the correlations (joined by
    ``separator``: ``"\n"`` puts them on two lines, for narrow panels).
    """
    x = np.asarray(predicted, dtype=float).reshape(-1)
    y = np.asarray(actual, dtype=float).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"predicted and actual differ in length: {x.shape} vs {y.shape}")
    fig, ax = _new_ax(ax, (5.5, 5.0))
    finite = np.isfinite(x) & np.isfinite(y)
    # show values in units of 10^e so tick labels stay short and no offset text is needed
    peak = np.abs(np.concatenate([x[finite], y[finite]])).max() if finite.any() else 0.0
    e = int(np.floor(np.log10(peak))) if peak > 0 else 0
    e = e if not -1 <= e <= 2 else 0
    unit = 10.0 ** e
    xs, ys = x / unit, y / unit
    ax.scatter(xs, ys, s=22, alpha=0.8, label=label)
    if finite.any():
        lo = min(xs[finite].min(), ys[finite].min())
        hi = max(xs[finite].max(), ys[finite].max())
        pad = 0.05 * (hi - lo if hi > lo else 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", linewidth=1, label="y = x")
    ax.axhline(0, color="0.8", linewidth=0.8, zorder=0)
    ax.axvline(0, color="0.8", linewidth=0.8, zorder=0)
    scale = f"\n(\u00d710$^{{{e}}}$)" if e else ""
    ax.set_xlabel(f"predicted change in test loss{scale}")
    ax.set_ylabel(f"actual change, retrained{scale}")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(5, prune="lower"))  # keep the corner for the y labels
    ax.yaxis.set_major_locator(MaxNLocator(6))
    stats = (f"Pearson {format_correlation(_pearson(x[finite], y[finite]))}"
             f"{separator}Spearman {format_correlation(_spearman(x[finite], y[finite]))}")
    ax.set_title(f"{title}\n{stats}" if title else stats)
    return fig


def plot_fraction_found(curves: Mapping[str, tuple], ax: Axes | None = None,
                        title: str | None = None) -> Figure:
    """Flipped-label detection: fraction of flipped labels found (y) against the fraction of the
    training set checked (x), one curve per ranking (self-influence, training loss, random).
    """
    fig, ax = _new_ax(ax, (5.5, 5.0))
    for name, (checked, found) in curves.items():
        checked = np.asarray(checked, dtype=float).reshape(-1)
        found = np.asarray(found, dtype=float).reshape(-1)
        if checked.shape != found.shape:
            raise ValueError(f"curve {name!r}: x and y differ in length")
        style = ":" if "random" in name.lower() else "-"
        ax.plot(checked, found, style, linewidth=2.5, label=name)
    ax.axvline(0.2, color="0.6", linewidth=1, linestyle="--")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("fraction of training data checked")
    ax.set_ylabel("fraction of flipped labels found")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    return fig


def plot_sign_deltas(harmful_removed, helpful_removed, labels: Sequence[str] | None = None,
                     ax: Axes | None = None, title: str | None = None) -> Figure:
    """The sign, checked by retraining: for each test image, the change in its test loss after
    removing the training images ranked most harmful (should fall: below 0) and, separately, the
    most helpful (should rise: above 0). Grouped bars, one group per test image."""
    harm = np.asarray(harmful_removed, dtype=float).reshape(-1)
    helps = np.asarray(helpful_removed, dtype=float).reshape(-1)
    if harm.shape != helps.shape:
        raise ValueError(f"{len(harm)} harmful-removed but {len(helps)} helpful-removed changes")
    labels = list(labels) if labels is not None else [str(i + 1) for i in range(len(harm))]
    if len(labels) != len(harm):
        raise ValueError(f"{len(harm)} test images but {len(labels)} labels")
    fig, ax = _new_ax(ax, (max(5.0, 0.7 * len(harm) + 2), 4.5))
    x = np.arange(len(harm))
    ax.bar(x - 0.2, harm, width=0.4, color=HARMFUL_COLOR, label="most harmful removed")
    ax.bar(x + 0.2, helps, width=0.4, color=HELPFUL_COLOR, label="most helpful removed")
    ax.axhline(0, color="k", linewidth=0.8)
    ax.set_xticks(x, labels)
    ax.set_xlabel("test image")
    ax.set_ylabel("change in test loss")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, frameon=False)  # above the bars
    if title:
        ax.set_title(title)
    return fig


def plot_training_history(history: Sequence[Mapping], fig: Figure | SubFigure | None = None,
                          test_accuracy: float | None = None) -> Figure:
    """Training loss and training accuracy per epoch (two panels side by side).

    ``history``: one mapping per epoch with ``epoch``, ``loss`` and ``accuracy`` (0-1), as in the
    training summary. ``test_accuracy`` (0-1), if given, is drawn as a horizontal line.
    """
    if len(history) == 0:
        raise ValueError("empty training history")
    epochs = [int(h["epoch"]) for h in history]
    fig = _new_or(fig, (10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [h["loss"] for h in history], "o-", linewidth=2)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_acc.plot(epochs, [100 * h["accuracy"] for h in history], "o-", linewidth=2, label="training")
    if test_accuracy is not None:
        ax_acc.axhline(100 * test_accuracy, color="C1", linestyle="--",
                       label=f"test (final): {100 * test_accuracy:.1f}%")
        ax_acc.legend(loc="lower right")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    return _root(fig)


def plot_per_class_accuracy(per_class: Mapping[str, float], ax: Axes | None = None,
                            title: str | None = None) -> Figure:
    """Test accuracy per class (0-1 values) as horizontal bars labelled with the percentage."""
    names = list(per_class)
    values = np.array([100 * float(per_class[n]) for n in names])
    fig, ax = _new_ax(ax, (6, 4.5))
    bars = ax.barh(names, values, color="C0")
    ax.bar_label(bars, labels=[f"{v:.0f}%" for v in values], padding=3)
    ax.invert_yaxis()
    ax.set_xlim(0, 110)
    ax.set_xlabel("test accuracy (%)")
    if title:
        ax.set_title(title)
    return fig


def plot_timings(seconds: Mapping[str, float], ax: Axes | None = None, title: str | None = None,
                 log: bool = True, xlabel: str = "seconds") -> Figure:
    """Horizontal bars of run times (e.g. 100 test x 50,000 training images by each method),
    each labelled with its value; missing (None/NaN) entries are labelled "not measured".
    """
    names = list(seconds)
    vals = [seconds[n] for n in names]
    measured = [v is not None and np.isfinite(float(v)) and float(v) > 0 for v in vals]
    widths = [float(v) if m else 0.0 for v, m in zip(vals, measured, strict=True)]
    fig, ax = _new_ax(ax, (7, 0.8 * len(names) + 1.2))
    bars = ax.barh(names, widths, color=["C2" if "our" in n.lower() else "C7" for n in names])
    ax.bar_label(bars, labels=[_fmt_seconds(w) if m else "not measured"
                               for w, m in zip(widths, measured, strict=True)], padding=4)
    ax.invert_yaxis()
    if log and any(measured):
        ax.set_xscale("log")
        top = max(w for w, m in zip(widths, measured, strict=True) if m)
        low = min(w for w, m in zip(widths, measured, strict=True) if m)
        ax.set_xlim(low / 3, top * 30)
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title)
    return fig


def _fmt_seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 120:
        return f"{s / 60:.1f} min"
    return f"{s:.3g} s"


def plot_agreement(values: Mapping[str, float], ax: Axes | None = None, title: str | None = None,
                   xlabel: str = "Spearman with CG") -> Figure:
    """Horizontal bars of correlations (e.g. each method's Spearman with CG), labelled; missing
    entries are labelled "not measured"."""
    names = list(values)
    vals = [values[n] for n in names]
    measured = [v is not None and np.isfinite(float(v)) for v in vals]
    widths = [float(v) if m else 0.0 for v, m in zip(vals, measured, strict=True)]
    fig, ax = _new_ax(ax, (7, 0.8 * len(names) + 1.2))
    bars = ax.barh(names, widths, color=["C2" if "our" in n.lower() else "C7" for n in names])
    ax.bar_label(bars, labels=[f"{w:.2f}" if m else "not measured"
                               for w, m in zip(widths, measured, strict=True)], padding=4)
    ax.invert_yaxis()
    ax.set_xlim(min(0.0, *widths) - 0.05, 1.25)
    ax.set_xticks([t for t in (-1.0, -0.5, 0.0, 0.5, 1.0) if t >= min(0.0, *widths) - 0.05])
    ax.axvline(0, color="k", linewidth=0.8)
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title)
    return fig
