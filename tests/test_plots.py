"""Each plot function returns a Figure with the panels and labels a reader would look for."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure

from influence_over_inference.report import plots
from influence_over_inference.study.data import CLASSES


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)


def _texts(ax):
    return [t for t in ax.texts]


def test_image_grid_titles_are_class_names(images):
    labels = np.arange(12) % 10
    fig = plots.plot_image_grid(images, labels, CLASSES, ncols=5)
    assert isinstance(fig, Figure)
    axes = fig.axes
    assert len(axes) == 15  # 3 rows x 5, the last 3 switched off
    assert [ax.get_title() for ax in axes[:12]] == [CLASSES[i] for i in labels]
    assert all(not ax.axison for ax in axes[12:])
    assert axes[0].images[0].get_interpolation() == "nearest"


def test_image_grid_rejects_mismatched_labels(images):
    with pytest.raises(ValueError, match="labels"):
        plots.plot_image_grid(images, [0, 1], CLASSES)
    with pytest.raises(ValueError, match="uint8"):
        plots.plot_image_grid(images.astype(np.float32), np.zeros(12), CLASSES)


def test_rgb_channels_annotates_every_pixel_with_contrasting_colour(images):
    image = images[0]
    fig = plots.plot_rgb_channels(image, title="a test image")
    assert len(fig.axes) == 4
    texts = [t for ax in fig.axes for t in ax.texts]
    assert len(texts) == 3 * 1024
    red = fig.axes[1]
    for t in red.texts[:50]:
        col, row = (int(round(v)) for v in t.get_position())
        value = int(image[row, col, 0])
        assert t.get_text() == str(value)
        assert t.get_color() == ("black" if value >= plots.TEXT_THRESHOLD else "white")
    assert fig.get_figwidth() >= 10 and fig.get_figheight() >= 40  # stacked, 10 in per panel


def test_rgb_channels_crop_annotates_the_window_only(images):
    fig = plots.plot_rgb_channels(images[1], crop=(4, 6, 5), ncols=4, panel_inches=3)
    texts = [t for ax in fig.axes for t in ax.texts]
    assert len(texts) == 3 * 25
    assert fig.axes[3].texts[0].get_text() == str(int(images[1][4, 6, 2]))
    assert len(fig.axes[0].patches) == 1  # the box on the colour image
    with pytest.raises(ValueError, match="crop"):
        plots.plot_rgb_channels(images[1], crop=(30, 30, 5))


def test_influence_figure_shows_test_and_k_helpful_and_harmful(images):
    helpful = [(i, images[i], i % 10, 1e-3 / (i + 1)) for i in range(6)]
    harmful = [(100 + i, images[i + 6], (i + 3) % 10, -1e-3 / (i + 1)) for i in range(6)]
    fig = plots.plot_influence(images[0], 5, 3, CLASSES, helpful, harmful, k=5)
    assert len(fig.axes) == 1 + 5 + 5
    titles = [ax.get_title() for ax in fig.axes]
    assert "true: dog" in titles[0] and "predicted: cat" in titles[0] and "wrong" in titles[0]
    assert titles[1] == f"{CLASSES[0]}\n#0\n{1e-3:+.2e}"
    assert titles[6].startswith(f"{CLASSES[3]}\n#100\n-")


def test_loo_scatter_reports_pearson_and_spearman():
    predicted = np.array([1.0, 2.0, 3.0, 4.0])
    actual = np.array([1.0, 2.0, 3.0, 5.0])
    fig = plots.plot_loo_scatter(predicted, actual, title="test image 7")
    (ax,) = fig.axes
    r = np.corrcoef(predicted, actual)[0, 1]
    assert ax.get_title() == f"test image 7\nPearson {r:.2f}, Spearman 1.00"
    assert [line.get_label() for line in ax.lines].count("y = x") == 1
    assert ax.get_xlabel().startswith("predicted")


def test_loo_scatter_draws_into_given_axes():
    fig = Figure()
    ax1, ax2 = fig.subplots(1, 2)
    out = plots.plot_loo_scatter([0, 1, 2], [0, 2, 1], ax=ax2)
    assert out is fig
    assert len(ax2.collections) == 1 and len(ax1.collections) == 0


def test_fraction_found_one_line_per_ranking():
    x = np.linspace(0, 1, 11)
    curves = {"self-influence": (x, np.sqrt(x)), "training loss": (x, x ** 0.8), "random": (x, x)}
    fig = plots.plot_fraction_found(curves)
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.lines[:3]] == list(curves)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(curves)


def test_training_history_and_per_class_accuracy():
    history = [{"epoch": e, "loss": 2.0 / e, "accuracy": 0.3 + 0.05 * e} for e in range(1, 5)]
    fig = plots.plot_training_history(history, test_accuracy=0.5)
    assert len(fig.axes) == 2
    assert len(fig.axes[0].lines[0].get_xdata()) == 4
    fig = plots.plot_per_class_accuracy(dict(zip(CLASSES, np.linspace(0.4, 0.8, 10), strict=True)))
    (ax,) = fig.axes
    assert len(ax.patches) == 10
    assert ax.texts[0].get_text() == "40%"


def test_timings_and_agreement_mark_missing_values():
    fig = plots.plot_timings({"nimarb": 6400.0, "ours (fast)": 30.0, "kronfluence": None})
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels == ["1.8 h", "30 s", "not measured"]
    fig = plots.plot_agreement({"ours": 0.97, "nimarb": 0.1, "kronfluence": float("nan")})
    assert [t.get_text() for t in fig.axes[0].texts] == ["0.97", "0.10", "not measured"]


def test_figures_render_without_pyplot_state(images):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    with matplotlib.rc_context({"font.size": 16}):
        fig = plots.plot_image_grid(images[:4], [0, 1, 2, 3], CLASSES)
        fig.canvas.draw()  # lays out and renders without errors
    assert plt.get_fignums() == before


def test_sign_deltas_two_bars_per_test_image():
    fig = plots.plot_sign_deltas([-0.5, -0.2, 0.1], [0.4, 0.6, 0.2], labels=["#1", "#2", "#3"])
    (ax,) = fig.axes
    assert len(ax.patches) == 6
    assert [t.get_text() for t in ax.get_xticklabels()] == ["#1", "#2", "#3"]
    with pytest.raises(ValueError, match="helpful"):
        plots.plot_sign_deltas([1.0], [1.0, 2.0])


def test_perturbation_map_shows_the_image_and_three_symmetric_channels(images):
    from influence_over_inference.report.perturbation_plots import plot_perturbation_map

    pmap = np.random.default_rng(1).normal(size=(3, 32, 32))
    fig = plot_perturbation_map(images[0], pmap, title="dog")
    titles = [ax.get_title() for ax in fig.axes[:4]]
    assert titles == ["training image", "red channel", "green channel", "blue channel"]
    vmin, vmax = fig.axes[1].images[0].get_clim()
    assert vmin == -vmax == -np.abs(pmap).max()
    with pytest.raises(ValueError, match="pmap must have shape"):
        plot_perturbation_map(images[0], pmap[:2])
