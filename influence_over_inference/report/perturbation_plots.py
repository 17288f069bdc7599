"""Figures of perturbation influence (:mod:`influence_over_inference.engine.perturbation`).

A training image beside its map per channel, in the style of
:func:`.plots.plot_rgb_channels`: red where moving that pixel's value up raises the predicted
test loss, blue where it lowers it. Takes data, returns a Figure; never shows or saves.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure, SubFigure

from .plots import _as_uint8_images, _new_or, _root, _show_image


def plot_perturbation_map(image, pmap, title: str | None = None,
                          fig: Figure | SubFigure | None = None) -> Figure:
    """The colour ``image`` (uint8 (H, W, 3)) beside its perturbation-influence map per channel.

    ``pmap``: (3, H, W) (a tensor or array), the map of one test image and this training image on
    the normalised input. One colour scale, symmetric about 0, is shared by the three channels.
    """
    img = _as_uint8_images(image)[0]
    m = np.asarray(pmap.numpy() if hasattr(pmap, "numpy") else pmap, dtype=np.float64)
    if m.shape != (3, *img.shape[:2]):
        raise ValueError(f"pmap must have shape (3, {img.shape[0]}, {img.shape[1]}), got {m.shape}")
    fig = _new_or(fig, (13.0, 3.6))
    axes = fig.subplots(1, 4)
    _show_image(axes[0], img)
    axes[0].set_title("training image")
    limit = float(np.abs(m).max()) or 1.0
    for ch, (ax, name) in enumerate(zip(axes[1:], ("red", "green", "blue"), strict=True)):
        shown = ax.imshow(m[ch], cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{name} channel")
    bar = _root(fig).colorbar(shown, ax=list(axes[1:]), shrink=0.8, label="test-loss change per unit step")
    bar.solids.set_rasterized(False)  # vector in a PDF: no low-resolution strip beside the sharp 32x32 images
    if title:
        fig.suptitle(title)
    return _root(fig)


def plot_attack_example(test_image, original, poisoned, test_title: str | None = None,
                        fig: Figure | SubFigure | None = None, amplify: int = 8) -> Figure:
    """One attacked test image: its training images before and after the attack, and the change.

    ``test_image`` uint8 (H, W, 3); ``original`` and ``poisoned`` uint8 (k, H, W, 3), the k training
    images before and after. Rows: before, after, and the change ``u' - u`` amplified ``amplify``
    times around mid-grey (the change itself is at most a few levels of 255: invisible unamplified).
    """
    test = _as_uint8_images(test_image)[0]
    before, after = _as_uint8_images(original), _as_uint8_images(poisoned)
    if before.shape != after.shape:
        raise ValueError(f"original {before.shape} and poisoned {after.shape} differ in shape")
    k = len(before)
    change = after.astype(np.int32) - before.astype(np.int32)
    shown = np.clip(128 + amplify * change, 0, 255).astype(np.uint8)
    fig = _new_or(fig, (1.9 * (k + 1), 6.2))
    axes = fig.subplots(3, k + 1, squeeze=False, width_ratios=[1.6] + [1] * k)  # room for the test image's title
    _show_image(axes[0, 0], test)
    axes[0, 0].set_title(test_title or "test image")
    axes[1, 0].set_axis_off()
    axes[2, 0].set_axis_off()
    for i in range(k):
        for row, (img, name) in enumerate(((before[i], "before"), (after[i], "after"),
                                           (shown[i], f"change \u00d7{amplify}"))):
            _show_image(axes[row, i + 1], img)
            if i == 0:
                axes[row, i + 1].set_ylabel(name)
        axes[0, i + 1].set_title(f"helpful #{i + 1}")
    return _root(fig)
