"""The perturbation slides: which pixels of a training image matter, and a training-set attack.

Each function takes the loaded :class:`~.slide_inputs.Inputs` and the
:class:`~.slide_inputs.SlidesConfig` and returns ``(title, page)``. Numbers and images come from
``results/perturbation_map.npz`` (the notebook) and ``results/perturbation.json`` / ``.npz``
(``validate perturbation``) only.
"""

from __future__ import annotations

from ..study.data import CLASSES
from .deck import SMALL_PT, _bullets, _new_page, _not_computed
from .perturbation_plots import plot_attack_example, plot_perturbation_map
from .perturbation_results import example_title
from .slide_inputs import COMMANDS, Missing
from .slide_text import _footer, _pct, _source


def map_slide(inputs, config):
    title = "Which pixels of a training image matter"
    found = inputs.perturbation_map
    fig, body = _new_page(title, _footer("results/perturbation_map.npz", _source(found)))
    if isinstance(found, Missing):
        _not_computed(body, found)
        return title, fig
    panels, text = body.subfigures(2, 1, height_ratios=[3.2, 1.4])
    plot_perturbation_map(found["train_image"], found["map"], fig=panels)
    _bullets(text, [
        f"The dog (test #{found['test_index']}) and its most helpful training image "
        f"(#{found['train_index']}, a {CLASSES[found['train_label']]}): red pixels, if brightened, would "
        "raise the dog's test loss after retraining; blue ones would lower it (Koh & Liang's I_pert,loss).",
        "Moving every pixel a step along the map's sign makes this image help the dog less.",
    ], fontsize=SMALL_PT + 1, top=0.95, gap=0.3)
    return title, fig


def attack_slide(inputs, config):
    title = "A training-set attack, checked by retraining"
    result = inputs.perturbation
    fig, body = _new_page(title, _footer("results/perturbation.json", _source(result)))
    if isinstance(result, Missing):
        _not_computed(body, result)
        return title, fig
    left, right = body.subfigures(1, 2, width_ratios=[1, 1.15])
    arrays = result.get("_arrays")
    if arrays and "example_poisoned" in arrays:
        k = min(3, len(arrays["example_original"]))  # three fit beside the text
        plot_attack_example(arrays["example_test_image"], arrays["example_original"][:k],
                            arrays["example_poisoned"][:k], example_title(result, CLASSES), fig=left)
    else:
        _not_computed(left, f"the example images \u2014 run: {COMMANDS['perturbation']}")
    items = [f"Check: {result['n_pairs']} (training image, step) pairs, one image moved 1 or 2 levels along "
             f"\u00b1 its map, retrained: Pearson {result['retrain_pearson']:.2f} (the map), "
             f"{result['retrain_pearson_score_difference']:.2f} (score difference)."]
    eps = result.get("epsilon_levels", round(255 * result["epsilon"]))
    names = {"typical": "Typical", "low_margin": "Smallest margins"}
    for name, g in result.get("groups", {}).items():
        items.append(f"{names.get(name, name)}: {g['n']} test images, {result['k_images']} most helpful images each "
                     f"moved \u2264 {eps}/255: flipped {_pct(g['attack_flip_rate'])} (random "
                     f"{_pct(g['random_flip_rate'])}); test loss {g['attack_loss_change']:+.3f} "
                     f"(random {g['random_loss_change']:+.3f}).")
    items.append("Poisoning: invisible edits of a few images, aimed by influence, move a prediction more than noise "
                 "does. Robustness: the map shows which images and pixels to guard.")
    _bullets(right, items, fontsize=SMALL_PT, top=0.98, gap=0.35)
    return title, fig
