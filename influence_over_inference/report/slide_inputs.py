"""What the slides are built from: the result files, loaded, with a "not computed" marker for each missing one."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..study.data import same_source

log = logging.getLogger(__name__)

# How to make each result file; shown on a slide when the file is missing.
COMMANDS = {
    "train": "python -m influence_over_inference train --json results/train.json",
    "influence": "python -m influence_over_inference notebook",
    "validation": "python -m influence_over_inference validate all",
    "engine": "python bench/engine.py",
    "perturbation": "python -m influence_over_inference validate perturbation",
    "perturbation_map": "python -m influence_over_inference notebook",
}


@dataclass
class SlidesConfig:
    """Where the deck reads its results and writes the PDF."""

    out: str = "presentation.pdf"  # the PDF to write (atomically)
    results_dir: str = "results"  # train.json, influence.json, validation.json, perturbation.json live here
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


# Result files


def read_json(path: Path, what: str, command: str, missing: str = "missing"):
    """The JSON at ``path``, or :class:`Missing` (reason ``missing`` when absent, or why it is unreadable)."""
    if not path.is_file():
        return Missing(what, path, command, reason=missing)
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
    return read_json(Path(path), "training summary", COMMANDS["train"])


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
    result = read_json(Path(path), "influence results", COMMANDS["influence"])
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
    from ..study.data import CLASSES

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
    result = read_json(Path(path), "validation results", COMMANDS["validation"])
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
    return read_json(Path(path), "benchmark", COMMANDS["engine"])


def load_perturbation_map(path: str | os.PathLike = "results/perturbation_map.npz"):
    """The saved map as a dict (``map`` (3, H, W), ``train_image`` uint8, indices, labels), or Missing."""
    path = Path(path)
    if not path.is_file():
        return Missing("perturbation map of the dog", path, COMMANDS["perturbation_map"])
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except (OSError, ValueError) as error:
        return Missing("perturbation map of the dog", path, COMMANDS["perturbation_map"], reason=f"unreadable: {error}")
    out["data_source"] = str(out["data_source"])
    for key in ("test_index", "train_index", "test_label", "train_label"):
        out[key] = int(out[key])
    return out


def load_perturbation(path: str | os.PathLike = "results/perturbation.json",
                      arrays: str | os.PathLike = "results/perturbation.npz"):
    """``results/perturbation.json`` with its example arrays under ``"_arrays"`` (if the npz is there), or Missing."""
    result = read_json(Path(path), "perturbation check and attack", COMMANDS["perturbation"])
    if isinstance(result, Missing):
        return result
    if Path(arrays).is_file():
        with np.load(arrays, allow_pickle=False) as z:
            result["_arrays"] = {k: z[k] for k in z.files}
    return result


def describe_source(source: str | None) -> str:
    """A short, human description of a ``data_source`` string."""
    if not source:
        return "CIFAR-10 (source not recorded)"
    if "JPEG copy" in source:
        return "CIFAR-10, offline JPEG copy"
    if source.startswith(("torchvision", "cifar10-torchvision")):
        return "CIFAR-10 (torchvision's original)"
    if source.startswith("cifar10-folder:"):
        return f"CIFAR-10 from an image folder ({source.split(':', 1)[1]})"
    return f"CIFAR-10 from {Path(source.split(':', 1)[-1]).name}"


# The deck


@dataclass
class Inputs:
    """Everything the slides read, loaded once."""

    train: dict | Missing
    influence: dict | Missing
    validation: dict | Missing
    engine: dict | Missing
    perturbation: dict | Missing  # results/perturbation.json (+ npz): the check and the attack
    perturbation_map: dict | Missing  # results/perturbation_map.npz: the dog's map (the notebook)
    data: object | None  # CIFAR10Data, or None when the images could not be loaded
    data_error: str | None = None
    lds: dict | Missing | None = None  # results/lds.json (:func:`.trust.load_lds`; set by :func:`.slides.build_slides`)


def load_inputs(config: SlidesConfig, data=None) -> Inputs:
    """Read every result file; load CIFAR-10 (for the images) unless ``data`` is given."""
    results = Path(config.results_dir)
    inputs = Inputs(
        train=load_train_summary(results / "train.json"),
        influence=load_influence_results(results / "influence.json"),
        validation=load_validation(results / "validation.json"),
        engine=load_engine_benchmark(config.engine_json),
        perturbation=load_perturbation(results / "perturbation.json", results / "perturbation.npz"),
        perturbation_map=load_perturbation_map(results / "perturbation_map.npz"),
        data=data,
    )
    if data is None:
        from ..study.data import DataSourceError, load_cifar10

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
        if recorded and not same_source(recorded, inputs.data.source):
            log.warning("influence results were made on %s but the images come from %s: "
                        "training-image indices may name other images", recorded, inputs.data.source)
    return inputs


def source_from_record(recorded: str | None) -> str | None:
    """The ``load_cifar10`` source for a recorded ``data_source`` string, if it exists here:
    ``"folder:/path (JPEG copy)"`` -> ``"/path"``; ``"torchvision:/root"`` or
    ``"cifar10-torchvision:<sha>"`` -> ``"torchvision"``; a content-keyed folder -> None (auto)."""
    if not recorded:
        return None
    kind, _, rest = recorded.partition(":")
    if kind in ("torchvision", "cifar10-torchvision"):
        return "torchvision"
    if kind == "folder":
        folder = Path(rest.split(" (", 1)[0])
        return str(folder) if folder.is_dir() else None
    return None
