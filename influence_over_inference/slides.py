"""The slide deck, ``presentation.pdf``, built from the cached results of the project's run.

``python -m influence_over_inference slides`` draws 16:9 pages with matplotlib (no LaTeX) and
writes them with :class:`~matplotlib.backends.backend_pdf.PdfPages`. Every number and figure on
a slide is read from a result file -- the training summary, the notebook's influence results,
the validation summary and the benchmark -- never typed in here; a missing result becomes a
"not computed -- run <command>" panel instead of an error or an invented number. The pages are
meant to be projected: titles 32 pt, body text at least 16 pt, 32x32 images upscaled by
repeating pixels (nearest neighbour) so they stay sharp in any PDF viewer, and
:func:`layout_problems` checks that no text is cut off or overlaps another. The same inputs give
a byte-identical PDF (no creation date, fixed producer).

Figures come from :mod:`influence_over_inference.plots`, the same functions the notebook uses.
The method is Koh & Liang (2017), "Understanding Black-box Predictions via Influence Functions".
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure, SubFigure
from matplotlib.text import Text

log = logging.getLogger(__name__)

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

# How to make each result file; shown on a slide when the file is missing.
COMMANDS = {
    "train": "python -m influence_over_inference train --json results/train.json",
    "influence": "python -m influence_over_inference notebook",
    "validation": "python -m influence_over_inference validate all",
    "engine": "python bench/engine.py",
}


@dataclass
class SlidesConfig:
    """Where the deck reads its results and writes the PDF."""

    out: str = "presentation.pdf"  # the PDF to write (atomically)
    results_dir: str = "results"  # train.json, influence.json, validation.json live here
    engine_json: str = "bench/results/engine.json"  # the benchmark's summary
    data: str | None = None  # CIFAR-10 source for the images (None: as load_cifar10 decides)
    data_root: str = "data"  # torchvision's download root and the decoded-image cache
    max_test_images: int = 3  # influence slides: at most this many test images, one slide each
    k: int = 5  # helpful and harmful training images shown per test image
    check_layout: bool = True  # look for text cut off or overlapping (draws each page once more)

    def __post_init__(self):
        if self.max_test_images < 0:
            raise ValueError(f"max_test_images must be >= 0, got {self.max_test_images}")
        if not 1 <= self.k <= 8:
            raise ValueError(f"k must be between 1 and 8 (what fits on a slide), got {self.k}")


class Missing:
    """A result that is not there: the slide says so and names the command that makes it."""

    def __init__(self, what: str, path: str | os.PathLike, command: str, reason: str = "missing"):
        self.what, self.path, self.command, self.reason = what, str(path), command, reason

    def __bool__(self) -> bool:
        return False

    def message(self) -> str:
        path = Path(self.path)
        try:
            shown = str(path.resolve().relative_to(Path.cwd()))
        except ValueError:
            shown = f".../{path.parent.name}/{path.name}"
        return f"{self.what}: not computed\n({shown} {self.reason})\nrun: {self.command}"


# --------------------------------------------------------------------------------------------
# Result files


def _read_json(path: Path, what: str, command: str):
    if not path.is_file():
        return Missing(what, path, command)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        log.warning("could not read %s: %s", path, error)
        return Missing(what, path, command, reason=f"unreadable: {error}")


def load_train_summary(path: str | os.PathLike = "results/train.json"):
    """The training summary written by ``train --json``: ``recipe`` (TrainConfig fields),
    ``history`` (per epoch: ``epoch``, ``loss``, ``accuracy``), ``test_accuracy``,
    ``test_per_class`` (class -> accuracy), ``seconds_per_epoch``, ``n_train``, ``data_source``,
    ``device``. Returns the dict, or :class:`Missing`."""
    return _read_json(Path(path), "training summary", COMMANDS["train"])


def load_influence_results(path: str | os.PathLike = "results/influence.json"):
    """The notebook's influence results (written by the notebook's run), or :class:`Missing`.

    Format (JSON object; scores use the project's sign convention: the predicted change in the
    test loss if the training image were removed, positive = helpful, negative = harmful)::

        {
          "data_source": "folder:... (JPEG copy)",  # CIFAR10Data.source of the run
          "checkpoint": "data/cifar_net.pt",          # optional; and "checkpoint_sha256"
          "n_train": 50000,                           # training images scored
          "k": 5,                                     # length of each top-k list
          "solver": {"name": "...", ...},             # solver name and its settings (damping, ...)
          "seconds": 12.3,                            # optional: time to score all test images
          "test_images": [                            # in the notebook's order
            {"index": 12,                             # index into the CIFAR-10 test split
             "label": 5, "pred": 3,                   # true and predicted class (0-9)
             "note": "a correctly classified dog",    # optional: why this image was chosen
             "helpful": [{"index": 3, "score": 1.2e-4}, ...],   # most helpful first
             "harmful": [{"index": 9, "score": -8.1e-5}, ...]}  # most harmful (most negative) first
          ],
          "rgb_test_index": 12                        # optional: the image of "how a machine sees"
        }

    Training images are looked up by index in ``load_cifar10().train`` (never stored here), and
    their labels too. Raises nothing for a missing file; a file without ``test_images`` or with
    malformed entries is reported as unreadable. The report of ``python -m
    influence_over_inference influence`` (``tests`` entries with ``test_index``, ``label`` and
    ``predicted`` class names) is read as well.
    """
    result = _read_json(Path(path), "influence results", COMMANDS["influence"])
    if isinstance(result, Missing):
        return result
    try:
        if "test_images" not in result and "tests" in result:
            result = _from_influence_cli(result)
        for item in result["test_images"]:
            int(item["index"]), int(item["label"]), int(item["pred"])
            for key in ("helpful", "harmful"):
                for entry in item[key]:
                    int(entry["index"]), float(entry["score"])
    except (KeyError, TypeError, ValueError) as error:
        return Missing("influence results", path, COMMANDS["influence"],
                       reason=f"malformed ({type(error).__name__}: {error})")
    return result


def _from_influence_cli(report: dict) -> dict:
    """The ``influence`` command's report (``tests`` with ``test_index`` and class names) in the
    notebook's format above, so the slides read either."""
    from .data import CLASSES

    def cls(v):
        return CLASSES.index(v) if isinstance(v, str) else int(v)

    out = {k: v for k, v in report.items() if k != "tests"}
    solver = report.get("solver") or {}
    out["solver"] = {"name": solver.get("solver", solver.get("name")), **solver}
    out["test_images"] = [{"index": int(t["test_index"]), "label": cls(t["label"]), "pred": cls(t["predicted"]),
                           "helpful": t["helpful"], "harmful": t["harmful"]} for t in report["tests"]]
    return out


def load_validation(path: str | os.PathLike = "results/validation.json"):
    """The validation summary (``validate all``), or :class:`Missing`.

    Keys read (each optional; a missing one shows "not computed" where it would appear):
    ``loo_convex_pearson`` (list, one per test image), ``loo_network_pearson`` and
    ``loo_network_spearman`` (solver -> list per test image), ``flipped_found_at_10``,
    ``flipped_found_at_20``, ``flipped_auc``, ``loss_found_at_20``,
    ``sign_harmful_removed_delta``, ``sign_helpful_removed_delta``, ``sign_flipped_to_correct``,
    ``data_source``, ``n_train``; and the arrays for the figures, either inline or in an npz
    named by ``"arrays"`` (a path relative to the JSON file or to the working directory, or a file
    of that name beside the JSON):
    ``loo_convex_predicted`` / ``loo_convex_actual`` and ``loo_network_predicted`` /
    ``loo_network_actual`` (one row per test image), ``flipped_curves`` (name -> [fraction
    checked, fraction found]) or npz keys ``flipped_checked`` and ``flipped_found_<name>``.
    """
    result = _read_json(Path(path), "validation results", COMMANDS["validation"])
    if isinstance(result, Missing):
        return result
    arrays = result.get("arrays")
    if isinstance(arrays, str):
        for candidate in (Path(path).parent / arrays, Path(arrays), Path(path).parent / Path(arrays).name):
            if candidate.is_file():
                with np.load(candidate, allow_pickle=False) as npz:
                    result["_arrays"] = {key: npz[key] for key in npz.files}
                break
        else:
            log.warning("validation arrays %s not found", arrays)
    return result


def load_engine_benchmark(path: str | os.PathLike = "bench/results/engine.json"):
    """The benchmark summary (``bench/engine.py``; keys listed in issue 6 item 7, e.g.
    ``nimarb_t100_s``, ``t100_fast_s``, ``t100_cg_s``, ``kronfluence_t100_s``,
    ``speedup_vs_nimarb``, ``t100_fast_epochs``, ``peak_rss_mb``, ``spearman_*_vs_cg``), or
    :class:`Missing`."""
    return _read_json(Path(path), "benchmark", COMMANDS["engine"])


def describe_source(source: str | None) -> str:
    """A short, human description of a ``data_source`` string."""
    if not source:
        return "CIFAR-10 (source not recorded)"
    if "JPEG copy" in source:
        return "CIFAR-10, offline JPEG copy"
    if source.startswith("torchvision"):
        return "CIFAR-10 (torchvision's original)"
    return f"CIFAR-10 from {Path(source.split(':', 1)[-1]).name}"


# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# The deck


@dataclass
class Inputs:
    """Everything the slides read, loaded once."""

    train: dict | Missing
    influence: dict | Missing
    validation: dict | Missing
    engine: dict | Missing
    data: object | None  # CIFAR10Data, or None when the images could not be loaded
    data_error: str | None = None


def load_inputs(config: SlidesConfig, data=None) -> Inputs:
    """Read every result file; load CIFAR-10 (for the images) unless ``data`` is given."""
    results = Path(config.results_dir)
    inputs = Inputs(
        train=load_train_summary(results / "train.json"),
        influence=load_influence_results(results / "influence.json"),
        validation=load_validation(results / "validation.json"),
        engine=load_engine_benchmark(config.engine_json),
        data=data,
    )
    if data is None:
        from .data import DataSourceError, load_cifar10

        source = config.data
        if source in (None, "auto") and isinstance(inputs.influence, dict):
            # the images behind the indices: the data source the influence results were made on
            source = source_from_record(inputs.influence.get("data_source")) or source
        try:
            inputs.data = load_cifar10(source, root=config.data_root)
        except DataSourceError as error:
            inputs.data_error = f"CIFAR-10 images unavailable ({error}); pass --data"
            log.warning("%s", inputs.data_error)
    if inputs.data is not None and isinstance(inputs.influence, dict):
        recorded = inputs.influence.get("data_source")
        if recorded and recorded != inputs.data.source:
            log.warning("influence results were made on %s but the images come from %s: "
                        "training-image indices may name other images", recorded, inputs.data.source)
    return inputs


def source_from_record(recorded: str | None) -> str | None:
    """The ``load_cifar10`` source for a recorded ``data_source`` string, if it exists here:
    ``"folder:/path (JPEG copy)"`` -> ``"/path"``; ``"torchvision:/root"`` -> ``"torchvision"``."""
    if not recorded:
        return None
    kind, _, rest = recorded.partition(":")
    if kind == "torchvision":
        return "torchvision"
    if kind == "folder":
        folder = Path(rest.split(" (", 1)[0])
        return str(folder) if folder.is_dir() else None
    return None


def build_pages(inputs: Inputs, config: SlidesConfig) -> list[tuple[str, Figure]]:
    """Draw every slide; returns (title, page) pairs in order."""
    from . import slide_pages as sp

    builders: list[Callable] = [sp.title_slide, sp.question_slide, sp.data_slide, sp.pixels_slide,
                                sp.model_slide, sp.method_slide]
    pages = []
    with matplotlib.rc_context(FIGURE_RC):
        for build in builders:
            pages.append(build(inputs, config))
        pages.extend(sp.influence_slides(inputs, config))
        for build in (sp.loo_slide, sp.flipped_slide, sp.sign_slide, sp.engine_slide, sp.applications_slide,
                      sp.references_slide):
            pages.append(build(inputs, config))
        for _, fig in pages:
            _sharpen_images(fig)
    return pages


def write_pdf(pages: list[tuple[str, Figure]], out: str | os.PathLike) -> Path:
    """Write the pages to ``out`` atomically, with fixed metadata (byte-identical rebuilds)."""
    from matplotlib.backends.backend_pdf import PdfPages

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"Title": "Influence over inference", "Author": None, "Subject": None,
                "Creator": "influence_over_inference.slides", "Producer": "matplotlib",
                "CreationDate": None, "ModDate": None}
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with matplotlib.rc_context(FIGURE_RC), PdfPages(tmp, metadata=metadata) as pdf:
            for _, fig in pages:
                fig.set_dpi(PDF_DPI)  # lay out (and later check) at the resolution the PDF uses
                if fig.get_layout_engine() is not None:
                    freeze_layout(fig)
                pdf.savefig(fig)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the PDF ordinary permissions
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def build_slides(config: SlidesConfig | None = None, data=None) -> tuple[Path, list[str], list[str]]:
    """Build the deck: returns (path of the PDF, slide titles, layout problems found)."""
    config = config or SlidesConfig()
    inputs = load_inputs(config, data=data)
    pages = build_pages(inputs, config)
    # write first: the PDF's layout must not depend on an earlier draw (constrained layout starts
    # from the current positions, so a check drawn before would shift coordinates by ~1e-6)
    path = write_pdf(pages, config.out)
    problems = []
    for number, (title, fig) in enumerate(pages if config.check_layout else [], start=1):
        problems += [f"slide {number} ({title}): {p}" for p in layout_problems(fig)]
    for p in problems:
        log.warning("%s", p)
    return path, [title for title, _ in pages], problems


# --------------------------------------------------------------------------------------------
# Command line


def register(subparsers) -> None:
    defaults = SlidesConfig()
    p = subparsers.add_parser("slides", help="build presentation.pdf from the cached results")
    p.add_argument("--out", default=defaults.out, help=f"PDF to write (default: {defaults.out})")
    p.add_argument("--results-dir", default=defaults.results_dir,
                   help=f"folder with train.json, influence.json, validation.json (default: {defaults.results_dir})")
    p.add_argument("--engine-json", default=defaults.engine_json,
                   help=f"benchmark summary (default: {defaults.engine_json})")
    p.add_argument("--data", default=defaults.data, help="CIFAR-10 source for the images (default: auto)")
    p.add_argument("--data-root", default=defaults.data_root, help="torchvision root and cache folder")
    p.add_argument("--max-test-images", type=int, default=defaults.max_test_images,
                   help=f"influence slides, one per test image (default: {defaults.max_test_images})")
    p.add_argument("--k", type=int, default=defaults.k,
                   help=f"helpful and harmful images per test image (default: {defaults.k})")
    p.set_defaults(func=_cmd_slides)


def _cmd_slides(args) -> int:
    config = SlidesConfig(out=args.out, results_dir=args.results_dir, engine_json=args.engine_json,
                          data=args.data, data_root=args.data_root,
                          max_test_images=args.max_test_images, k=args.k)
    path, titles, problems = build_slides(config)
    lines = [f"{path}: {len(titles)} slides"] + [f"  {i:2d}. {t}" for i, t in enumerate(titles, 1)]
    lines += [f"layout problem: {p}" for p in problems]
    print("\n".join(lines))  # noqa: T201 (CLI output)
    return 0
