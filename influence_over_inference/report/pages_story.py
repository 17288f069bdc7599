"""The story slides: title, question, data, pixels, model, method and the influence examples.

Each function takes the loaded :class:`~.slide_inputs.Inputs` and the
:class:`~.slide_inputs.SlidesConfig` and returns ``(title, page)``. Numbers come from the result
files only.
"""

from __future__ import annotations

import numpy as np

from ..study.data import CLASSES, MEAN, STD
from . import plots
from .deck import BODY_PT, SMALL_PT, _bullets, _new_page, _not_computed
from .slide_inputs import Missing, describe_source
from .slide_text import SOLVER_KEYS, _fmt, _footer, _get, _n_train, _pct, _source


def title_slide(inputs, config):
    from matplotlib.figure import Figure

    from .deck import PAGE_INCHES

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
    from ..study.model import Net, count_parameters

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
        "a fast one: the top eigenpairs of the Gauss-Newton matrix from 16 small training "
        "subsamples, inverted exactly there, and EK-FAC from all training images elsewhere.",
    ]
    if solver:
        short = {"n_samples": "images", "n_fits": "fits"}  # one line on the slide
        shown = [(k, solver[k]) for k in SOLVER_KEYS if solver.get(k) is not None and k != "curvature"]
        settings = ", ".join(f"{short.get(k, k.replace('_', ' '))} {v}" for k, v in shown)
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
