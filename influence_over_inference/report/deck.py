"""The slide deck's machinery: 16:9 pages, text that fits, sharp images, layout checks, the PDF."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure, SubFigure
from matplotlib.text import Text

from ..engine.io import atomic_write
from .slide_inputs import Missing

PAGE_INCHES = (13.333, 7.5)  # 16:9, the size of a PowerPoint widescreen slide


TITLE_PT = 32


BODY_PT = 20


SMALL_PT = 16  # the smallest text on any page


PDF_DPI = 72  # matplotlib's PDF backend lays text out at 72 dpi


UPSCALE = 8  # 32x32 images are embedded as 256x256 (each pixel repeated 8x8)


FIGURE_RC = {
    "font.size": SMALL_PT, "axes.titlesize": SMALL_PT, "axes.labelsize": SMALL_PT,
    "xtick.labelsize": SMALL_PT, "ytick.labelsize": SMALL_PT, "legend.fontsize": SMALL_PT,
    "figure.titlesize": BODY_PT, "pdf.fonttype": 42,
}


# Page drawing helpers


def _new_page(title: str, footer: str | None = None) -> tuple[Figure, SubFigure]:
    """A 16:9 page with its title; returns the page and the body (a SubFigure) to draw into."""
    fig = Figure(figsize=PAGE_INCHES, layout="constrained")
    fig.get_layout_engine().set(w_pad=0.08, h_pad=0.08)
    head, body, foot = fig.subfigures(3, 1, height_ratios=[1.05, 5.95, 0.5])
    head.text(0.035, 0.45, title, fontsize=TITLE_PT, fontweight="bold", va="center", ha="left")
    if footer:
        foot.text(0.035, 0.5, footer, fontsize=SMALL_PT, color="0.35", va="center", ha="left")
    return fig, body


def _wrap(text: str, width_inches: float, fontsize: float) -> str:
    """Wrap text to a width, at about 0.55 em per character (DejaVu Sans averages ~0.52)."""
    chars = max(10, int(width_inches * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.fill(part, chars, break_long_words=False, break_on_hyphens=False)
                     if part else "" for part in text.split("\n"))


def _bullets(sub, items: list[str], fontsize: float = BODY_PT, top: float = 0.97,
             left: float = 0.035, width: float | None = None, gap: float = 0.45) -> float:
    """Bulleted paragraphs from the top of ``sub``; returns the y (0-1) below the last one."""
    w_in, h_in = sub.get_window_extent().width / sub.figure.dpi, sub.get_window_extent().height / sub.figure.dpi
    width = width if width is not None else (1 - 2 * left) * w_in
    y = top
    line_h = fontsize * 1.25 / 72 / h_in  # one line, as a fraction of the SubFigure's height
    for item in items:
        text = _wrap(item, width - 0.35, fontsize)
        sub.text(left, y, "\u2022", fontsize=fontsize, va="top", ha="left")
        sub.text(left + 0.3 / w_in, y, text, fontsize=fontsize, va="top", ha="left", linespacing=1.25)
        y -= line_h * (text.count("\n") + 1) + gap * line_h
    return y


def _not_computed(sub, missing: Missing | str, fontsize: float = BODY_PT) -> None:
    """A grey box saying what is not computed and how to compute it."""
    text = missing.message() if isinstance(missing, Missing) else "not computed \u2014 " + missing
    w_in = sub.get_window_extent().width / sub.figure.dpi
    sub.text(0.5, 0.5, _wrap(text, 0.8 * w_in, fontsize), fontsize=fontsize,
             ha="center", va="center", color="0.25",
             bbox={"boxstyle": "round,pad=0.6", "facecolor": "0.93", "edgecolor": "0.6"})


def _sharpen_images(fig: Figure) -> None:
    """Embed every small image upscaled by pixel repetition, drawn without resampling, so a PDF
    viewer that smooths images still shows sharp 32x32 pixels (and hide SubFigure backgrounds)."""
    for ax in fig.get_children():
        _sharpen_in(ax)


def _sharpen_in(artist) -> None:
    from matplotlib.axes import Axes

    if isinstance(artist, SubFigure):
        # the page's white background is enough; a SubFigure's own background rectangle sits at
        # coordinates that come out as 0 or -0 from run to run, which would break byte-identity
        artist.patch.set_visible(False)
        for child in artist.get_children():
            _sharpen_in(child)
    elif isinstance(artist, Axes):
        for image in artist.images:
            data = np.asarray(image.get_array())
            if data.ndim >= 2 and max(data.shape[:2]) <= 64:
                extent = image.get_extent()
                image.set_data(np.repeat(np.repeat(data, UPSCALE, axis=0), UPSCALE, axis=1))
                image.set_extent(extent)
                image.set_interpolation("none")


def _drawn_texts(fig: Figure) -> list[Text]:
    """Visible, non-empty texts of a page; tick labels only for ticks inside the axes' view
    (matplotlib keeps, but does not draw, labels of ticks beyond the limits)."""
    from matplotlib.axis import Tick

    ticks = {id(t) for tick in fig.findobj(Tick) for t in (tick.label1, tick.label2)}
    texts = [t for t in fig.findobj(Text) if id(t) not in ticks]
    from matplotlib.axes import Axes

    for ax in fig.findobj(Axes):
        if not ax.axison or not ax.get_visible():
            continue
        for axis, (lo, hi) in ((ax.xaxis, sorted(ax.get_xlim())), (ax.yaxis, sorted(ax.get_ylim()))):
            tol = 1e-9 * max(abs(lo), abs(hi), 1.0)
            for locs, labels in ((axis.get_majorticklocs(), axis.get_majorticklabels()),
                                 (axis.get_minorticklocs(), axis.get_minorticklabels())):
                texts += [lab for loc, lab in zip(locs, labels, strict=False) if lo - tol <= loc <= hi + tol]
    return [t for t in texts if t.get_visible() and t.get_text().strip() and t.figure is not None]


def freeze_layout(fig: Figure, decimals: int = 4) -> None:
    """Run the constrained layout once, round every position it set (axes, SubFigures, titles)
    to ``decimals`` digits of a figure fraction and switch the layout engine off.

    Constrained layout sums floats in an order that varies from call to call, so the same page
    can come out with coordinates differing by ~1e-9; rounding makes rebuilds byte-identical.
    """
    from matplotlib.axes import Axes

    fig.draw_without_rendering()
    for sub in fig.findobj(SubFigure):
        points = np.round(sub.bbox_relative.get_points(), decimals)
        sub.bbox_relative.set_points(points)
    for ax in fig.findobj(Axes):
        for which in ("original", "active"):
            bounds = np.round(ax.get_position(original=which == "original").bounds, decimals)
            ax.set_position(bounds, which=which)
    for f in [fig, *fig.findobj(SubFigure)]:
        for t in (f._suptitle, f._supxlabel, f._supylabel):
            if t is not None:
                t.set_position(tuple(np.round(t.get_position(), decimals)))
    fig.set_layout_engine("none")


def layout_problems(fig: Figure) -> list[str]:
    """Text on a drawn page that is cut off by the page edge, spills out of its panel (e.g. a
    list running into the footer), overlaps other text, or is smaller than ``SMALL_PT`` (too
    small to read when projected)."""
    # tick locators read rcParams (tick label size) when asked: ask under the deck's settings
    with matplotlib.rc_context(FIGURE_RC):
        return _layout_problems(fig)


def _layout_problems(fig: Figure) -> list[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    page = fig.bbox
    boxes = []
    for t in _drawn_texts(fig):
        box = t.get_window_extent(renderer)
        if box.width == 0:
            continue
        label = t.get_text().strip().replace("\n", " ")[:40]
        cut = box.x0 < page.x0 - 1 or box.y0 < page.y0 - 1 or box.x1 > page.x1 + 1 or box.y1 > page.y1 + 1
        area = t.figure.bbox  # the SubFigure (region of the page) the text belongs to
        spills = box.x0 < area.x0 - 1 or box.y0 < area.y0 - 1 or box.x1 > area.x1 + 1 or box.y1 > area.y1 + 1
        message = f"cut off: {label!r}" if cut else f"outside its panel: {label!r}" if spills else None
        boxes.append((box, label, message))
        if t.get_fontsize() < SMALL_PT - 1e-9:
            boxes[-1] = (box, label, (boxes[-1][2] or "") + f"too small ({t.get_fontsize():g} pt): {label!r}")
    problems = [msg for _, _, msg in boxes if msg]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            a, b = boxes[i][0], boxes[j][0]
            overlap_w = min(a.x1, b.x1) - max(a.x0, b.x0)
            overlap_h = min(a.y1, b.y1) - max(a.y0, b.y0)
            if overlap_w > 2 and overlap_h > 2:
                problems.append(f"overlap: {boxes[i][1]!r} and {boxes[j][1]!r}")
    return problems


def write_pdf(pages: list[tuple[str, Figure]], out: str | os.PathLike) -> Path:
    """Write the pages to ``out`` atomically, with fixed metadata (byte-identical rebuilds)."""
    from matplotlib.backends.backend_pdf import PdfPages

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"Title": "Influence over inference", "Author": None, "Subject": None,
                "Creator": "influence_over_inference.slides", "Producer": "matplotlib",
                "CreationDate": None, "ModDate": None}

    def write(tmp: Path) -> None:
        with matplotlib.rc_context(FIGURE_RC), PdfPages(tmp, metadata=metadata) as pdf:
            for _, fig in pages:
                fig.set_dpi(PDF_DPI)  # lay out (and later check) at the resolution the PDF uses
                if fig.get_layout_engine() is not None:
                    freeze_layout(fig)
                pdf.savefig(fig)

    atomic_write(out, write)
    return out
