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

Pages: :mod:`.pages_story`, :mod:`.pages_evidence` and :mod:`.pages_perturbation`, drawn with :mod:`.deck` from
:mod:`.slide_inputs`. Figures come from :mod:`.plots`, the same functions the notebook uses.
The method is Koh & Liang (2017), "Understanding Black-box Predictions via Influence Functions".
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from . import pages_evidence as evidence
from . import pages_perturbation as perturbation
from . import pages_story as story
from .deck import FIGURE_RC, _sharpen_images, layout_problems, write_pdf
from .slide_inputs import Inputs, SlidesConfig, load_inputs
from .trust import load_lds

log = logging.getLogger(__name__)

def build_pages(inputs: Inputs, config: SlidesConfig) -> list[tuple[str, Figure]]:
    """Draw every slide; returns (title, page) pairs in order."""
    builders: list[Callable] = [story.title_slide, story.question_slide, story.data_slide, story.pixels_slide,
                                story.model_slide, story.method_slide]
    pages = []
    with matplotlib.rc_context(FIGURE_RC):
        for build in builders:
            pages.append(build(inputs, config))
        pages.extend(story.influence_slides(inputs, config))
        for build in (evidence.loo_slide, evidence.flipped_slide, evidence.sign_slide, evidence.lds_slide, perturbation.map_slide,
                      perturbation.attack_slide, evidence.engine_slide, evidence.applications_slide,
                      evidence.references_slide):
            pages.append(build(inputs, config))
        for _, fig in pages:
            _sharpen_images(fig)
    return pages


def build_slides(config: SlidesConfig | None = None, data=None) -> tuple[Path, list[str], list[str]]:
    """Build the deck: returns (path of the PDF, slide titles, layout problems found)."""
    config = config or SlidesConfig()
    inputs = load_inputs(config, data=data)
    inputs.lds = load_lds(Path(config.results_dir) / "lds.json")  # here: trust itself reads through slide_inputs
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
