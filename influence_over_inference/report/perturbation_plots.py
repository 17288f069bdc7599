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
    _root(fig).colorbar(shown, ax=list(axes[1:]), shrink=0.8, label="test-loss change per unit step")
    if title:
        fig.suptitle(title)
    return _root(fig)
