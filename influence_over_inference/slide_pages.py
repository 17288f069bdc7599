"""The content of each slide of ``presentation.pdf`` (the deck's machinery is in :mod:`.slides`).

Each function takes the loaded :class:`~.slides.Inputs` and the :class:`~.slides.SlidesConfig`
and returns ``(title, page)``. Numbers come from the result files only; where one is missing
the page says "not computed" and names the command that computes it. The method and its
references: Koh & Liang (2017), "Understanding Black-box Predictions via Influence Functions".
"""

from __future__ import annotations

import numpy as np

from . import plots
from .data import CLASSES, MEAN, STD
from .slides import (
    BODY_PT,
    COMMANDS,
    SMALL_PT,
    Missing,
    _bullets,
    _new_page,
    _not_computed,
    describe_source,
)

NOT_COMPUTED = "not computed"
# Solver settings worth a mention on a slide, in this order (the rest stay in the results file).
SOLVER_KEYS = ("curvature", "damping", "rank", "n_samples", "scale", "depth", "r", "batch_size",
               "tol", "max_iter")


def _get(result, key, default=None):
    """``result[key]``, or None when the result or the key is missing."""
    if isinstance(result, Missing) or not isinstance(result, dict):
        return default
    return result.get(key, default)


def _fmt(value, spec: str = ".2f", missing: str = NOT_COMPUTED) -> str:
    """Format a number, a list of numbers or a mapping of them; None -> "not computed"."""
    if value is None:
        return missing
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_fmt(v, spec)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v, spec) for v in value)
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not np.isfinite(v):
        return missing
    return format(v, spec)


def _corr(value) -> str:
    """Correlations: one number, a list, or solver -> list (see plots.format_correlation)."""
    if value is None:
        return NOT_COMPUTED
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_corr(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_corr(v) for v in value)
    return plots.format_correlation(float(value))


def _pct(value, decimals: int = 0) -> str:
    if value is None:
        return NOT_COMPUTED
    if isinstance(value, (list, tuple)):
        return ", ".join(_pct(v, decimals) for v in value)
    return f"{100 * float(value):.{decimals}f}%"


def _footer(*parts) -> str:
    return "   \u00b7   ".join(p for p in parts if p)


def _source(result) -> str | None:
    if isinstance(result, Missing) or not isinstance(result, dict):
        return None
    return describe_source(result.get("data_source")) if "data_source" in result else None


def _n_train(inputs) -> int | None:
    for result in (inputs.train, inputs.influence):
        n = _get(result, "n_train", None)
        if n:
            return int(n)
    return len(inputs.data.train) if inputs.data is not None else None


# --------------------------------------------------------------------------------------------


def title_slide(inputs, config):
    from matplotlib.figure import Figure

    from .slides import PAGE_INCHES

    fig = Figure(figsize=PAGE_INCHES, layout="constrained")
    top, strip = fig.subfigures(2, 1, height_ratios=[3.2, 1.3])
    top.text(0.5, 0.72, "Influence over inference", fontsize=48, fontweight="bold", ha="center")
    top.text(0.5, 0.50, "Which training images help \u2014 and which harm \u2014 a CNN's predictions",
             fontsize=26, ha="center")
    top.text(0.5, 0.32, "Influence functions (Koh & Liang, 2017) on CIFAR-10, done right and fast",
             fontsize=BODY_PT, ha="center", color="0.3")
    source = inputs.data.source if inputs.data is not None else None
    top.text(0.5, 0.16, f"All results: {describe_source(source or _get(inputs.train, 'data_source', None))}",
             fontsize=SMALL_PT, ha="center", color="0.3")
    if inputs.data is not None:
        labels = inputs.data.train.labels.numpy()
        first = [int(np.nonzero(labels == c)[0][0]) for c in range(len(CLASSES)) if (labels == c).any()]
        plots.plot_image_grid(inputs.data.train.images[first], labels[first], CLASSES,
                              ncols=len(first), fig=strip)
    return "Title", fig


def question_slide(inputs, config):
    title = "Which training images drive a prediction?"
    fig, body = _new_page(title)
    n = _n_train(inputs)
    n_text = f"{n:,}" if n else "all its"
    _bullets(body, [
        f"A CNN trained on {n_text} CIFAR-10 images calls a test image \u201ccat\u201d. Which training "
        "images made it say so \u2014 and which pushed against it?",
        f"Leave-one-out retraining answers exactly, but needs one retraining per training image: "
        f"{n_text} retrainings per question.",
        "Influence functions (Koh & Liang, 2017) predict the effect of removing each training image "
        "on the test loss without retraining, from gradients and the curvature of the loss.",
        "Why it matters: find mislabelled training data, debug wrong predictions, and decide how far "
        "to trust a prediction.",
    ], fontsize=22, top=0.92, gap=0.8)
    return title, fig


def data_slide(inputs, config):
    title = "The data: CIFAR-10"
    data = inputs.data
    fig, body = _new_page(title, _footer(describe_source(data.source) if data is not None else None))
    left, right = body.subfigures(1, 2, width_ratios=[1.25, 1])
    if data is None:
        _not_computed(left, inputs.data_error or "CIFAR-10 images unavailable")
        _bullets(right, ["CIFAR-10: 32\u00d732 colour images in 10 classes."])
        return title, fig
    labels = data.train.labels.numpy()
    pick = [int(i) for c in range(len(CLASSES)) for i in np.nonzero(labels == c)[0][:2]]
    pick = sorted(pick, key=lambda i: (pick.index(i) % 2, labels[i]))  # row 1: first of each class
    plots.plot_image_grid(data.train.images[pick], labels[pick], CLASSES, ncols=5, fig=left)
    h, w = data.train.images.shape[1:3]
    _bullets(right, [
        f"{len(data.train):,} training and {len(data.test):,} test images, {h}\u00d7{w} pixels, "
        f"{len(CLASSES)} classes.",
        f"The users' transform: ToTensor, then Normalize(mean {MEAN[0]}, std {STD[0]}) per channel: "
        "pixel values 0\u2013255 become numbers in [\u22121, 1].",
        "Training images keep one fixed order and no augmentation: results name them by index.",
        f"Source here: {describe_source(data.source)}.",
    ], top=0.95, gap=0.7)
    return title, fig


def _contrast_crop(image: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner of the size x size window with the most varied gray values (a window
    worth annotating: an edge rather than a flat background)."""
    gray = image.astype(float).mean(axis=2)
    best, corner = -1.0, (0, 0)
    for r in range(0, gray.shape[0] - size + 1):
        for c in range(0, gray.shape[1] - size + 1):
            s = gray[r:r + size, c:c + size].std()
            if s > best + 1e-9:
                best, corner = s, (r, c)
    return corner


def _rgb_test_index(inputs) -> int | None:
    data = inputs.data
    if data is None:
        return None
    explicit = _get(inputs.influence, "rgb_test_index", None)
    if explicit is not None:
        return int(explicit)
    for item in _get(inputs.influence, "test_images", None) or []:
        if int(item["label"]) == CLASSES.index("dog") and int(item["pred"]) == int(item["label"]):
            return int(item["index"])
    dogs = np.nonzero(data.test.labels.numpy() == CLASSES.index("dog"))[0]
    return int(dogs[0]) if len(dogs) else 0


def pixels_slide(inputs, config):
    title = "How a machine sees an image"
    data = inputs.data
    fig, body = _new_page(title, _footer(describe_source(data.source) if data is not None else None))
    if data is None:
        _not_computed(body, inputs.data_error or "CIFAR-10 images unavailable")
        return title, fig
    index = _rgb_test_index(inputs)
    image = data.test.images[index].numpy()
    size = 6
    r, c = _contrast_crop(image, size)
    panels, text = body.subfigures(2, 1, height_ratios=[4.3, 1])
    plots.plot_rgb_channels(image, crop=(r, c, size), ncols=4, panel_inches=3.0, fontsize=SMALL_PT,
                            fig=panels)
    h, w, ch = image.shape
    _bullets(text, [
        f"Test image #{index} ({CLASSES[int(data.test.labels[index])]}): {ch} channels \u00d7 "
        f"{h} \u00d7 {w} = {ch * h * w:,} numbers from 0 to 255. The boxed {size}\u00d7{size} "
        "window is shown with its values: the network sees nothing else.",
    ], top=0.9)
    return title, fig


def model_slide(inputs, config):
    from .model import Net, count_parameters

    title = "The model: nimarb's CIFAR-10 LeNet"
    train = inputs.train
    fig, body = _new_page(title, _footer("results/train.json", _source(train)))
    left, right = body.subfigures(1, 2, width_ratios=[1.2, 1])
    text, history = left.subfigures(2, 1, height_ratios=[1.25, 1])
    net = Net()
    conv = [m for m in (net.conv1, net.conv2)]
    fcs = [net.fc1, net.fc2, net.fc3]
    arch = (", ".join(f"conv {m.kernel_size[0]}\u00d7{m.kernel_size[1]} {m.in_channels}\u2192"
                      f"{m.out_channels} + max-pool" for m in conv)
            + ", fully connected " + "\u2192".join(str(m.in_features) for m in fcs)
            + f"\u2192{fcs[-1].out_features}, ReLU")
    items = [f"{count_parameters(net):,} parameters: {arch}."]
    if isinstance(train, Missing):
        _not_computed(right, train)
    else:
        rc = train.get("recipe", {})
        items.append(
            f"Trained {rc.get('epochs', '?')} epochs, SGD lr {rc.get('lr', '?')}"
            f"{' cosine' if rc.get('cosine') else ''}, momentum {rc.get('momentum', '?')}, weight "
            f"decay {rc.get('weight_decay', '?')}, batch {rc.get('batch_size', '?')}, seed "
            f"{rc.get('seed', '?')}.")
        items.append(f"Test accuracy: {_pct(train.get('test_accuracy'), 1)} on "
                     f"{len(inputs.data.test):,} test images." if inputs.data is not None else
                     f"Test accuracy: {_pct(train.get('test_accuracy'), 1)}.")
        if train.get("seconds_per_epoch") is not None:
            items.append(f"{_fmt(train['seconds_per_epoch'], '.1f')} s per epoch on "
                         f"{train.get('device', 'the CPU')} ({_fmt(train.get('n_train'), ',.0f')} images).")
        if train.get("test_per_class"):
            plots.plot_per_class_accuracy(train["test_per_class"], ax=right.subplots(),
                                          title="test accuracy per class")
        else:
            _not_computed(right, "per-class accuracy")
        if train.get("history"):
            plots.plot_training_history(train["history"], fig=history)
    _bullets(text, items, fontsize=BODY_PT - 2, top=0.97, gap=0.35)
    return title, fig


def method_slide(inputs, config):
    title = "Influence functions on one slide"
    solver = _get(inputs.influence, "solver", None)
    fig, body = _new_page(title, _footer("Koh & Liang (2017), eq. 2; sign: project convention"))
    body.text(0.5, 0.97,
              r"$\mathcal{I}(z_j, z_{\mathrm{test}}) = \frac{1}{n}\,"
              r"\nabla_\theta L(z_{\mathrm{test}})^{\top}\,(H + \lambda I)^{-1}\,"
              r"\nabla_\theta L(z_j)$", fontsize=30, ha="center", va="top")
    items = [
        "Predicted change in the test loss if training image z\u2c7c were removed. "
        "Positive = helpful (removing it raises the test loss), negative = harmful.",
        "s_test = (H + \u03bbI)\u207b\u00b9 \u2207L(z_test): one inverse-Hessian-vector product per "
        "test image. grad_z = \u2207L(z\u2c7c): one gradient per training image, computed in "
        "vectorised chunks and dotted with every s_test at once.",
        "H: curvature of the mean training loss plus weight decay (Hessian, or Gauss-Newton); "
        "\u03bb: damping. Solvers: exact (small models), conjugate gradient, LiSSA (done right), and "
        "a fast one: the top eigenpairs of the Gauss-Newton matrix, fitted once on a training "
        "subsample, inverted exactly there and as 1/(weight decay + \u03bb) elsewhere.",
    ]
    if solver:
        shown = [(k, solver[k]) for k in SOLVER_KEYS if solver.get(k) is not None]
        settings = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in shown)
        items.append(f"Used for the results: {solver.get('name', solver.get('solver', 'solver'))}"
                     + (f" ({settings})" if settings else "") + ".")
    _bullets(body, items, fontsize=BODY_PT - 1, top=0.72, gap=0.45)
    return title, fig


def _influence_page(inputs, config, item, number):
    data = inputs.data
    label, pred, index = int(item["label"]), int(item["pred"]), int(item["index"])
    verdict = "correct" if label == pred else f"predicted {CLASSES[pred]}"
    note = item.get("note") or ""
    if note and len(note) <= 30:  # why the notebook chose it, when it fits on the title line
        title = f"Test image #{index}: {note}"
    else:
        title = f"Test image #{index} ({CLASSES[label]}, {verdict})"
    solver = (_get(inputs.influence, "solver", None) or {}).get("name")
    n = _get(inputs.influence, "n_train", None)
    footer = _footer("results/influence.json",
                     f"all {int(n):,} training images scored" if n else None,
                     f"solver: {solver}" if solver else None, _source(inputs.influence))
    fig, body = _new_page(title, footer)
    if data is None:
        _not_computed(body, inputs.data_error or "CIFAR-10 images unavailable")
        return title, fig
    n_train = len(data.train)
    if not 0 <= index < len(data.test):
        raise ValueError(f"test index {index} out of range for {len(data.test)} test images")
    if int(data.test.labels[index]) != label:
        raise ValueError(f"test image #{index} is a {CLASSES[int(data.test.labels[index])]} in the "
                         f"loaded data but a {CLASSES[label]} in the results: another data source?")

    def entries(key):
        out = []
        for e in item[key][: config.k]:
            j = int(e["index"])
            if not 0 <= j < n_train:
                raise ValueError(f"training index {j} out of range for {n_train} images")
            out.append((j, data.train.images[j].numpy(), int(data.train.labels[j]), float(e["score"])))
        return out

    plots.plot_influence(data.test.images[index].numpy(), label, pred, CLASSES, entries("helpful"),
                         entries("harmful"), k=config.k, fig=body)
    return title, fig


def influence_slides(inputs, config):
    influence = inputs.influence
    if isinstance(influence, Missing):
        title = "Most helpful and most harmful training images"
        fig, body = _new_page(title)
        _not_computed(body, influence)
        return [(title, fig)]
    pages = []
    for number, item in enumerate(influence["test_images"][: config.max_test_images], start=1):
        try:
            pages.append(_influence_page(inputs, config, item, number))
        except (ValueError, IndexError) as error:
            title = f"Test image #{item['index']}"
            fig, body = _new_page(title)
            _not_computed(body, f"influence results do not match the data: {error}")
            pages.append((title, fig))
    return pages


# --------------------------------------------------------------------------------------------
# Validation


def loo_pairs(validation, kind: str, solver: str | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label, predicted, actual) per test image for ``kind`` "convex" or "network" (predictions
    of ``solver``, default CG when present, for "network"), from the npz that the validation
    summary names (keys ``loo_convex_predicted_<k>``, ``loo_convex_actual_<k>``,
    ``loo_network_predicted_<solver>_<k>``, ``loo_network_actual_<k>``) or from inline lists
    ``loo_<kind>_predicted`` / ``loo_<kind>_actual`` (rows per test image; for "network" also a
    mapping solver -> rows)."""
    if isinstance(validation, Missing) or not isinstance(validation, dict):
        return []
    if kind == "network":
        kind = network_prefix(validation)[len("loo_"):]
    tests = validation.get(f"loo_{kind}_test_indices")
    arrays = validation.get("_arrays", {})
    rows = []
    if kind == "convex":
        k = 0
        while f"loo_convex_predicted_{k}" in arrays and f"loo_convex_actual_{k}" in arrays:
            rows.append((arrays[f"loo_convex_predicted_{k}"], arrays[f"loo_convex_actual_{k}"]))
            k += 1
    else:
        head = f"loo_{kind}_predicted_"
        solvers = sorted({key[len(head):].rsplit("_", 1)[0] for key in arrays if key.startswith(head)})
        if solvers:
            solver = solver or ("cg" if "cg" in solvers else solvers[0])
            k = 0
            while f"{head}{solver}_{k}" in arrays and f"loo_{kind}_actual_{k}" in arrays:
                rows.append((arrays[f"{head}{solver}_{k}"], arrays[f"loo_{kind}_actual_{k}"]))
                k += 1
    if not rows:
        pred, act = validation.get(f"loo_{kind}_predicted"), validation.get(f"loo_{kind}_actual")
        if pred is None or act is None:
            return []
        if isinstance(pred, dict):
            solver = solver or ("cg" if "cg" in pred else next(iter(pred)))
            pred = pred[solver]
        pred, act = np.atleast_2d(np.asarray(pred, float)), np.atleast_2d(np.asarray(act, float))
        rows = list(zip(pred, act, strict=False))
    tests = tests or list(range(len(rows)))
    return [(f"test image #{t}", np.asarray(p, float), np.asarray(a, float))
            for t, (p, a) in zip(tests, rows, strict=False)]




def network_prefix(validation) -> str:
    """The key prefix of the whole-network leave-one-out to show: ``loo_network`` when present,
    else the first variant the validation summary holds (``loo_network_<variant>_pearson``)."""
    if isinstance(validation, dict) and "loo_network_pearson" not in validation:
        variants = sorted(k[: -len("_pearson")] for k in validation
                          if k.startswith("loo_network_") and k.endswith("_pearson"))
        if variants:
            return variants[0]
    return "loo_network"


def _n_of(val, experiment: str) -> int | None:
    """Training images an experiment used: ``n_train`` is one number or experiment -> number."""
    n = _get(val, "n_train")
    if isinstance(n, dict):
        n = n.get(experiment)
    return int(n) if n else None


def _count(n: int | None) -> str:
    return f"{n:,}" if n else "?"


def loo_slide(inputs, config):
    title = "Does influence predict retraining?"
    val = inputs.validation
    fig, body = _new_page(title, _footer("results/validation.json", _source(val)))
    if isinstance(val, Missing):
        _not_computed(body, val)
        return title, fig
    plots_area, text = body.subfigures(1, 2, width_ratios=[2.2, 1])
    axes = plots_area.subplots(1, 2)
    for ax, kind, name in ((axes[0], "convex", "last layer"), (axes[1], "network", "whole network (CG)")):
        pairs = loo_pairs(val, kind)
        if pairs:
            label, p, a = pairs[0]
            plots.plot_loo_scatter(p, a, ax=ax, title=f"{name}\n{label}", separator="\n")
        else:
            ax.set_axis_off()
            ax.text(0.5, 0.5, f"{name}:\n{NOT_COMPUTED}\nrun: python -m\ninfluence_over_inference\n"
                    f"{COMMANDS['validation'].split()[-2]} {COMMANDS['validation'].split()[-1]}",
                    ha="center", va="center", fontsize=SMALL_PT, color="0.25",
                    bbox={"boxstyle": "round,pad=0.6", "facecolor": "0.93", "edgecolor": "0.6"})
    convex = val.get("loo_convex_pearson")
    prefix = network_prefix(val)
    network = val.get(f"{prefix}_pearson")
    retrain = ((val.get("settings") or {}).get(prefix) or {}).get("retrain") or {}
    items = ["Remove one training image, retrain, compare the change in test loss with the prediction."]
    items.append(f"Last layer as logistic regression, exact Hessian, {_count(_n_of(val, 'loo_convex'))} "
                 f"images \u2014 Pearson per test image: {_corr(convex) if convex else NOT_COMPUTED}.")
    n_net = _n_of(val, prefix)
    how = ", ".join(p for p in (f"lr {retrain['lr']}" if "lr" in retrain else "",
                                f"{retrain['steps']} steps" if "steps" in retrain else "") if p)
    items.append(f"Whole network{f', {n_net:,}-image subset' if n_net else ''}, retrained"
                 f"{f' ({how})' if how else ''} minus a control run \u2014 Pearson: "
                 f"{_corr(network) if network else NOT_COMPUTED}.")
    items.append("Koh & Liang report 0.86 for their CNN.")
    _bullets(text, items, fontsize=SMALL_PT + 1, top=0.97, gap=0.45)
    return title, fig


def flipped_slide(inputs, config):
    title = "Finding flipped labels"
    val = inputs.validation
    fig, body = _new_page(title, _footer("results/validation.json", _source(val)))
    if isinstance(val, Missing):
        _not_computed(body, val)
        return title, fig
    left, right = body.subfigures(1, 2, width_ratios=[1, 1.2])
    cmd = COMMANDS["validation"].rsplit(" ", 1)[0]  # "... validate"
    curves = flip_curves(val)
    if curves:
        plots.plot_fraction_found(curves, ax=left.subplots(), title="10% of labels flipped")
    else:
        _not_computed(left, f"fraction-found curves \u2014 run: {cmd} flipped")
    n_flip = _n_of(val, "flipped")
    if val.get("flipped_found_at_20") is None:
        items = [f"Flipped labels: {NOT_COMPUTED} \u2014 run: {cmd} flipped"]
    else:
        items = [
            f"Flipped labels ({_count(n_flip)} training images): self-influence finds "
            f"{_pct(val.get('flipped_found_at_10'))} after checking 10% of the data, "
            f"{_pct(val.get('flipped_found_at_20'))} after 20% (training loss: "
            f"{_pct(val.get('loss_found_at_20'))}); ROC-AUC {_fmt(val.get('flipped_auc'))}"
            + (f" (loss: {_fmt(val['loss_auc'])})." if val.get("loss_auc") is not None else "."),
        ]
        if val.get("last_layer_found_at_20") is not None:
            items.append(f"Self-influence of the last layer alone: {_pct(val['last_layer_found_at_20'])} "
                         f"after 20%; ROC-AUC {_fmt(val.get('last_layer_auc'))}.")
        if val.get("memorising_flipped_found_at_20") is not None:
            details = val.get("memorising_flipped_details") or {}
            train_acc = details.get("train_accuracy")
            items.append(
                f"A model that memorises them ({_count(_n_of(val, 'flipped_memorising'))} images"
                + (f", {_pct(train_acc)} training accuracy" if train_acc is not None else "")
                + f"): after 20%, self-influence {_pct(val['memorising_flipped_found_at_20'])}, last "
                f"layer {_pct(val.get('memorising_last_layer_found_at_20'))}, training loss "
                f"{_pct(val.get('memorising_loss_found_at_20'))}.")
    _bullets(right, items, fontsize=SMALL_PT + 1, top=0.97, gap=0.45)
    return title, fig


def sign_slide(inputs, config):
    title = "The sign, checked by retraining"
    val = inputs.validation
    fig, body = _new_page(title, _footer("results/validation.json", _source(val)))
    cmd = COMMANDS["validation"].rsplit(" ", 1)[0] + " sign"
    if isinstance(val, Missing):
        _not_computed(body, val)
        return title, fig
    if val.get("sign_harmful_removed_delta") is None:
        _not_computed(body, f"the sign by retraining \u2014 run: {cmd}")
        return title, fig
    left, right = body.subfigures(1, 2, width_ratios=[1.2, 1])
    harm, helps = val.get("sign_harmful_removed_deltas"), val.get("sign_helpful_removed_deltas")
    if harm and helps and len(harm) == len(helps):
        tests = val.get("sign_test_indices")
        labels = [f"#{t}" for t in tests] if tests and len(tests) == len(harm) else None
        ax = left.subplots()
        plots.plot_sign_deltas(harm, helps, labels=labels, ax=ax)
        if labels and len(labels) > 5:
            ax.tick_params(axis="x", labelrotation=90)
    else:
        _not_computed(left, f"per-image changes \u2014 run: {cmd}")
    sign = (val.get("settings") or {}).get("sign") or {}
    n_remove, n_test = sign.get("n_remove"), val.get("sign_n_test")
    n_model = _n_of(val, "sign")
    items = [
        f"For {_fmt(n_test, '.0f') if n_test is not None else 'each of the'} misclassified test "
        f"images, remove the {(_fmt(n_remove, '.0f') + ' ') if n_remove is not None else ''}training "
        "images ranked most harmful (or most helpful) and retrain"
        + (f" (a {n_model:,}-image model)" if n_model else "") + ".",
        f"Most harmful removed: mean change {_fmt(val.get('sign_harmful_removed_delta'), '+.3f')} "
        "(should fall)" + (f"; fell for {val['sign_harmful_removed_fell']} of {n_test}"
                           if val.get("sign_harmful_removed_fell") is not None and n_test else "") + ".",
        f"Most helpful removed: mean change {_fmt(val.get('sign_helpful_removed_delta'), '+.3f')} "
        "(should rise)" + (f"; rose for {val['sign_helpful_removed_rose']} of {n_test}"
                           if val.get("sign_helpful_removed_rose") is not None and n_test else "") + ".",
    ]
    if val.get("sign_flipped_to_correct") is not None:
        items.append(f"Classified correctly after removing the most harmful: "
                     f"{_fmt(val['sign_flipped_to_correct'], '.0f')}" + (f" of {n_test}" if n_test else "") + ".")
    _bullets(right, items, fontsize=SMALL_PT + 2, top=0.95, gap=0.5)
    return title, fig


def _curve_label(name: str) -> str:
    """``self_influence_last_layer`` -> ``self-influence, last layer``; ``training_loss`` ->
    ``training loss``."""
    if name.startswith("self_influence"):
        rest = name[len("self_influence"):].strip("_").replace("_", " ")
        return "self-influence" + (f", {rest}" if rest else "")
    return name.replace("_", " ")


def flip_curves(val) -> dict:
    """Fraction-found curves, name -> (fraction checked, fraction found), from the npz keys
    ``flipped_<name>_checked`` / ``flipped_<name>_found`` (names like ``self_influence``,
    ``training_loss``, ``random``), or inline ``flipped_curves`` (name -> [checked, found])."""
    if isinstance(val, Missing) or not isinstance(val, dict):
        return {}
    curves = val.get("flipped_curves")
    if isinstance(curves, dict) and curves:
        return {k: (np.asarray(v[0], float), np.asarray(v[1], float)) for k, v in curves.items()}
    arrays = val.get("_arrays", {})
    out = {}
    for key in arrays:
        if key.startswith("flipped_") and key.endswith("_found"):
            name = key[len("flipped_"):-len("_found")]
            if f"flipped_{name}_checked" in arrays:
                out[_curve_label(name)] = (
                    np.asarray(arrays[f"flipped_{name}_checked"], float), np.asarray(arrays[key], float))
    order = {"self-influence": 0, "training loss": 1, "random": 2}
    return dict(sorted(out.items(), key=lambda kv: (order.get(kv[0], 9), kv[0])))




# --------------------------------------------------------------------------------------------
# Engine, applications, references


def engine_slide(inputs, config):
    title = "Our engine against nimarb and kronfluence"
    eng = inputs.engine
    quick = bool(_get(eng, "quick"))
    fig, body = _new_page(title, _footer("bench/results/engine.json", _source(eng),
                                         "QUICK SMOKE RUN, not the real benchmark" if quick else None))
    n_test, n_train, n_agree = _get(eng, "n_test"), _get(eng, "n_train"), _get(eng, "n_agree")
    task = (f"{n_test} test \u00d7 {n_train:,} training images" if n_test and n_train
            else "100 test images \u00d7 all training images")
    if isinstance(eng, Missing):
        top, bottom = body.subfigures(2, 1, height_ratios=[1, 1.1])
        _not_computed(top, eng)
    else:
        top, bottom = body.subfigures(2, 1, height_ratios=[1.1, 1])
        left, right = top.subfigures(1, 2, width_ratios=[1.1, 1])
        cg_extrapolated = n_agree is not None and n_test is not None and n_agree < n_test
        plots.plot_timings({"nimarb (extrapolated)": eng.get("nimarb_t100_s"),
                            "kronfluence EK-FAC": eng.get("kronfluence_t100_s"),
                            "ours, CG" + (" (extrap.)" if cg_extrapolated else ""): eng.get("t100_cg_s"),
                            "ours, fast solver": eng.get("t100_fast_s")},
                           ax=left.subplots(), title=task)
        plots.plot_agreement({"nimarb, sign fixed": eng.get("spearman_nimarb_vs_cg"),
                              "kronfluence": eng.get("spearman_kronfluence_vs_cg"),
                              "ours, LiSSA": eng.get("spearman_lissa_vs_cg"),
                              "ours, fast": eng.get("spearman_fast_vs_cg")},
                             ax=right.subplots(), title="agreement with CG (Spearman)")
    items = [
        "nimarb's s_test as published returns one step of the recursion whatever the depth, never "
        "divided by scale; its \u201charmful\u201d list is what Koh & Liang call helpful.",
    ]
    ours = []
    if _get(eng, "speedup_vs_nimarb") is not None:
        ours.append(f"{_fmt(eng['speedup_vs_nimarb'], ',.0f')}\u00d7 faster than nimarb")
    if _get(eng, "speedup_vs_kronfluence") is not None:
        ours.append(f"{_fmt(eng['speedup_vs_kronfluence'], ',.1f')}\u00d7 faster than kronfluence")
    if _get(eng, "t100_fast_epochs") is not None:
        ours.append(f"{_fmt(eng['t100_fast_epochs'], '.1f')} training-epoch times")
    if _get(eng, "peak_rss_mb") is not None:
        ours.append(f"peak memory {_fmt(eng['peak_rss_mb'], ',.0f')} MB")
    if ours:
        items.append(f"Fast solver, {task}: " + "; ".join(ours) + ".")
    if _get(eng, "speedup_1test_same_settings") is not None:
        items.append(f"One test image, the same LiSSA settings: nimarb {_fmt(eng.get('nimarb_s_per_test'), ',.0f')} s, "
                     f"ours {_fmt(eng.get('ours_s_per_test'), ',.1f')} s "
                     f"({_fmt(eng['speedup_1test_same_settings'], ',.1f')}\u00d7, vectorised gradients alone).")
    small_acc = _get(eng, "small_test_accuracy")
    if _get(eng, "pearson_fast_vs_exact_small") is not None and (small_acc is None or small_acc > 0.2):
        # only for a trained small net: near initialisation any method agrees with exact influence
        items.append(f"Against exact influence on a small LeNet ({_fmt(_get(eng, 'small_params'), ',.0f')} "
                     f"parameters): Pearson fast {plots.format_correlation(eng['pearson_fast_vs_exact_small'])}, "
                     f"kronfluence {_fmt(_get(eng, 'pearson_kronfluence_vs_exact_small'))}.")
    _bullets(bottom, items, fontsize=SMALL_PT + 1, top=0.97, gap=0.35)
    return title, fig


def applications_slide(inputs, config):
    title = "Applications and future work"
    fig, body = _new_page(title)
    left, right = body.subfigures(1, 2)
    found = _get(inputs.validation, "flipped_found_at_20", None)
    loss = _get(inputs.validation, "loss_found_at_20", None)
    left.text(0.07, 0.97, "Applications", fontsize=24, fontweight="bold", va="top")
    _bullets(left, [
        "Checking labels: review the training images with the highest self-influence first"
        + (f" ({_pct(found)} of flipped labels in the top 20%" if found is not None else "")
        + (f"; ranking by training loss: {_pct(loss)})." if found is not None and loss is not None
           else ")." if found is not None else "."),
        "Debugging: the most harmful training images of a wrong prediction show what misled it.",
        "Trust: a prediction backed by similar, correctly labelled images is easier to believe.",
    ], fontsize=BODY_PT - 2, top=0.84, left=0.07, gap=0.45)
    right.text(0.07, 0.97, "Future work", fontsize=24, fontweight="bold", va="top")
    _bullets(right, [
        "Perturbation stress tests: are the rankings stable under small changes of the test image "
        "or of the training run (seed, data order)?",
        "A more accurate fast solver: more curvature samples or a few preconditioned CG steps, "
        "to close the gap to CG.",
        "Larger models (ResNets) and other solvers (EK-FAC, Arnoldi) on the same benchmarks.",
        "Scaling out: gradients on the GPU and across machines, scores for the whole test set.",
    ], fontsize=BODY_PT - 2, top=0.84, left=0.07, gap=0.45)
    return title, fig


def references_slide(inputs, config):
    title = "References"
    fig, body = _new_page(title)
    _bullets(body, [
        "Koh, P. W. & Liang, P. (2017). Understanding black-box predictions via influence "
        "functions. ICML.",
        "Agarwal, N., Bullins, B. & Hazan, E. (2017). Second-order stochastic optimization for "
        "machine learning in linear time (LiSSA). JMLR.",
        "George, T. et al. (2018). Fast approximate natural gradient descent in a Kronecker-factored "
        "eigenbasis (EK-FAC). NeurIPS.  Grosse, R. et al. (2023). Studying large language model "
        "generalization with influence functions. arXiv:2308.03296.",
        "Schioppa, A. et al. (2022). Scaling up influence functions (Arnoldi). AAAI.",
        "Basu, S., Pope, P. & Feizi, S. (2021). Influence functions in deep learning are fragile. ICLR.",
        "Krizhevsky, A. (2009). Learning multiple layers of features from tiny images (CIFAR-10).",
        "Software: nimarb/pytorch-influence-functions 0.1.1, kronfluence 1.0.1, captum 0.9, PyTorch.",
    ], fontsize=SMALL_PT + 2, top=0.97, gap=0.45)
    return title, fig

