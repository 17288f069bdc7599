"""Does influence predict reality? The validation experiments' shared parts, summary and command line.

The experiments (Koh & Liang, ICML 2017, §5.1 and §5.4) live beside this module:
:mod:`.leave_one_out` (convex last layer, whole network, the sign; retraining in
:mod:`.retraining`) and :mod:`.flipped` (flipped-label detection). Here: the metrics (Pearson,
Spearman, ROC-AUC, fraction found), the resumable result caches under ``data/validation/``, the
summary ``results/validation.json`` (+ ``results/validation_arrays.npz``) that the notebook and the
slides read, and ``python -m influence_over_inference validate {loo-convex,loo-network,flipped,sign,all}``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

CACHE_DIR = Path("data/validation")
SUMMARY_PATH = Path("results/validation.json")
ARRAYS_PATH = Path("results/validation_arrays.npz")


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def pearson(x, y) -> float:
    """Pearson correlation of two 1-d arrays (nan if either is constant)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"pearson needs two 1-d arrays of equal length >= 2, got {x.shape} and {y.shape}")
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(xc @ xc) * float(yc @ yc))
    return float(xc @ yc / denom) if denom > 0 else float("nan")


def rankdata(x) -> np.ndarray:
    """Ranks 1..n of a 1-d array, ties given their average rank (as scipy.stats.rankdata)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    start = 0
    while start < len(x):
        stop = start + 1
        while stop < len(x) and sorted_x[stop] == sorted_x[start]:
            stop += 1
        ranks[order[start:stop]] = 0.5 * (start + stop - 1) + 1.0
        start = stop
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation: Pearson of the (tie-averaged) ranks."""
    return pearson(rankdata(x), rankdata(y))


def roc_auc(scores, positives) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positives`` (higher = more positive).

    The probability that a random positive scores above a random negative, ties counting one half
    (the Mann-Whitney U statistic divided by n_pos * n_neg).
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    if scores.shape != positives.shape:
        raise ValueError(f"scores {scores.shape} and positives {positives.shape} differ in shape")
    n_pos = int(positives.sum())
    n_neg = len(positives) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc needs at least one positive and one negative")
    ranks = rankdata(scores)
    u = ranks[positives].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def fraction_found(scores, positives) -> tuple[np.ndarray, np.ndarray]:
    """Check items in order of decreasing score: fraction checked (0..1) vs fraction of positives found.

    Returns two arrays of length ``n + 1`` starting at (0, 0). Ties are broken by index (stable).
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    if scores.shape != positives.shape:
        raise ValueError(f"scores {scores.shape} and positives {positives.shape} differ in shape")
    if not positives.any():
        raise ValueError("fraction_found needs at least one positive")
    order = np.argsort(-scores, kind="stable")
    found = np.concatenate([[0], np.cumsum(positives[order])]) / positives.sum()
    checked = np.arange(len(scores) + 1) / len(scores)
    return checked, found


def found_at(checked: np.ndarray, found: np.ndarray, fraction: float) -> float:
    """Fraction found after checking ``fraction`` of the data (the first ``floor(fraction * n)`` items)."""
    n = len(checked) - 1
    return float(found[int(math.floor(fraction * n + 1e-9))])


# ----------------------------------------------------------------------------------------------
# Result caches: JSON, written atomically, keyed by the settings that produced them
# ----------------------------------------------------------------------------------------------


def write_json_atomic(obj, path: str | os.PathLike) -> Path:
    """Write ``obj`` as JSON to a temporary file beside ``path``, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def save_npz_atomic(path: str | os.PathLike, **arrays) -> Path:
    """``np.savez`` to a temporary file beside ``path``, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


class ResultCache:
    """A JSON file of ``entries`` (key -> value) with the ``settings`` that produced them.

    A file made with other settings is ignored (and replaced on the next write), so a changed
    experiment never reads stale results; an interrupted run resumes from the entries written.
    """

    def __init__(self, path: str | os.PathLike, settings: dict):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings))  # normalise tuples -> lists
        self.entries: dict = {}
        if self.path.exists():
            try:
                blob = json.loads(self.path.read_text())
                if blob.get("settings") == self.settings:
                    self.entries = blob.get("entries", {})
                    log.info("resuming from %s (%d entries)", self.path, len(self.entries))
                else:
                    log.warning("%s was made with other settings; starting afresh", self.path)
            except (OSError, ValueError) as error:
                log.warning("ignoring unreadable cache %s (%s)", self.path, error)

    def __contains__(self, key) -> bool:
        return str(key) in self.entries

    def __getitem__(self, key):
        return self.entries[str(key)]

    def put(self, key, value, flush: bool = True) -> None:
        self.entries[str(key)] = value
        if flush:
            self.flush()

    def flush(self) -> None:
        write_json_atomic({"settings": self.settings, "entries": self.entries}, self.path)

    def absorb(self, paths) -> None:
        """Add the entries of other caches made with the same settings (e.g. a parallel worker's)."""
        for path in paths:
            try:
                blob = json.loads(Path(path).read_text())
            except (OSError, ValueError):
                continue
            if blob.get("settings") == self.settings:
                for key, value in blob.get("entries", {}).items():
                    self.entries.setdefault(key, value)


def _read_result(path: Path, matches) -> dict | None:
    """The JSON result at ``path`` if it exists, parses and ``matches(result["settings"])``; else None."""
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not matches(result.get("settings", {})):
        return None
    log.info("loaded finished result %s", path)
    return result


def load_result(path: Path, settings: dict) -> dict | None:
    """A finished experiment's result file if it was made with ``settings`` (else None): reruns are instant,
    and keep the minutes of the run that computed them."""
    wanted = json.loads(json.dumps(settings))
    return _read_result(path, lambda found: found == wanted)


def load_config_result(path: Path, config: dict, data_source: str) -> dict | None:
    """As :func:`load_result` for results whose ``settings`` hold the config's fields plus extras."""
    wanted = json.loads(json.dumps(config))
    return _read_result(
        path, lambda found: {k: found.get(k) for k in wanted} == wanted and found.get("data_source") == data_source
    )


def settings_key(settings: dict, length: int = 10) -> str:
    """A short hash of a settings dict: names cache files after what made them."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# ----------------------------------------------------------------------------------------------
# 5. The summary the notebook and the slides read, and the command line
# ----------------------------------------------------------------------------------------------

CURVE_POINTS = 1001  # fraction-found curves are stored at this many evenly spaced fractions checked


def _summarize_loo_network(summary: dict, arrays: dict, key: str, r: dict) -> None:
    """The network leave-one-out's keys (``key``: ``loo_network``, or a variant's name) and plot arrays."""
    solvers = list(r["test"][0]["pearson"])
    summary[f"{key}_pearson"] = {s: [t["pearson"][s] for t in r["test"]] for s in solvers}
    summary[f"{key}_spearman"] = {s: [t["spearman"][s] for t in r["test"]] for s in solvers}
    summary[f"{key}_test_indices"] = r["test_indices"]
    summary[f"{key}_timings"] = r["timings"]
    summary["minutes"][key] = r["minutes"]
    summary["n_train"][key] = r["settings"]["n_train"]
    summary["settings"][key] = r["settings"]
    summary["data_source"] = r["settings"]["data_source"]
    for old in [k for k in arrays if k.startswith(f"{key}_actual_") or k.startswith(f"{key}_predicted_")]:
        del arrays[old]
    for k, t in enumerate(r["test"]):
        arrays[f"{key}_actual_{k}"] = np.asarray(t["actual"])
        for s in solvers:
            arrays[f"{key}_predicted_{s}_{k}"] = np.asarray(t["predicted"][s])


def summarize(results: dict, summary_path: str | os.PathLike = SUMMARY_PATH,
              arrays_path: str | os.PathLike = ARRAYS_PATH) -> dict:
    """Merge experiment results (``{"loo_convex": ..., "loo_network": ..., "flipped": ..., "sign": ...}``,
    any subset) into ``results/validation.json`` and the plot arrays into ``results/validation_arrays.npz``."""
    summary_path, arrays_path = Path(summary_path), Path(arrays_path)
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    arrays = dict(np.load(arrays_path)) if arrays_path.exists() else {}
    summary.setdefault("minutes", {})
    summary.setdefault("n_train", {})
    summary.setdefault("settings", {})
    r = results.get("loo_convex")
    if r is not None:
        summary["loo_convex_pearson"] = [t["pearson"] for t in r["test"]]
        summary["loo_convex_spearman"] = [t["spearman"] for t in r["test"]]
        summary["loo_convex_test_indices"] = r["test_indices"]
        summary["minutes"]["loo_convex"] = r["minutes"]
        summary["n_train"]["loo_convex"] = r["settings"]["n_train"]
        summary["settings"]["loo_convex"] = r["settings"]
        summary["data_source"] = r["settings"]["data_source"]
        arrays = {k: v for k, v in arrays.items() if not k.startswith("loo_convex_")}
        for k, t in enumerate(r["test"]):
            arrays[f"loo_convex_predicted_{k}"] = np.asarray(t["predicted"])
            arrays[f"loo_convex_actual_{k}"] = np.asarray(t["actual"])
    for key in [k for k in results if k.startswith("loo_network")]:
        _summarize_loo_network(summary, arrays, key, results[key])
    for key, prefix in (("flipped", ""), ("flipped_memorising", "memorising_")):
        r = results.get(key)
        if r is None:
            continue
        m = r["metrics"]
        summary[f"{prefix}flipped_found_at_10"] = m["self_influence"]["found_at_10"]
        summary[f"{prefix}flipped_found_at_20"] = m["self_influence"]["found_at_20"]
        summary[f"{prefix}flipped_auc"] = m["self_influence"]["auc"]
        summary[f"{prefix}loss_found_at_10"] = m["training_loss"]["found_at_10"]
        summary[f"{prefix}loss_found_at_20"] = m["training_loss"]["found_at_20"]
        summary[f"{prefix}loss_auc"] = m["training_loss"]["auc"]
        summary[f"{prefix}random_found_at_20"] = m["random"]["found_at_20"]
        summary[f"{prefix}random_auc"] = m["random"]["auc"]
        if "self_influence_last_layer" in m:
            summary[f"{prefix}last_layer_found_at_10"] = m["self_influence_last_layer"]["found_at_10"]
            summary[f"{prefix}last_layer_found_at_20"] = m["self_influence_last_layer"]["found_at_20"]
            summary[f"{prefix}last_layer_auc"] = m["self_influence_last_layer"]["auc"]
        summary[f"{prefix}flipped_details"] = {k: r[k] for k in ("n_flipped", "test_accuracy", "train_accuracy",
                                                                 "flipped_memorised", "timings")}
        summary["minutes"][key] = r["minutes"]
        summary["n_train"][key] = r["settings"]["n_train"]
        summary["settings"][key] = r["settings"]
        summary["data_source"] = r["settings"]["data_source"]
        grid = np.linspace(0, 1, CURVE_POINTS)
        for name, (checked, found) in r["curves"].items():
            arrays[f"{prefix}flipped_{name}_checked"] = grid
            arrays[f"{prefix}flipped_{name}_found"] = np.interp(grid, checked, found)
    r = results.get("sign")
    if r is not None:
        summary["sign_harmful_removed_delta"] = r["harmful_removed_delta_mean"]
        summary["sign_helpful_removed_delta"] = r["helpful_removed_delta_mean"]
        summary["sign_harmful_removed_deltas"] = [p["harmful_removed_delta"] for p in r["per_image"]]
        summary["sign_helpful_removed_deltas"] = [p["helpful_removed_delta"] for p in r["per_image"]]
        summary["sign_test_indices"] = [p["test_index"] for p in r["per_image"]]
        for key in ("harmful_removed_fell", "helpful_removed_rose", "n_test", "flipped_to_correct",
                    "helpful_removed_correct", "control_correct"):
            summary[f"sign_{key}"] = r[key]
        summary["minutes"]["sign"] = r["minutes"]
        summary["n_train"]["sign"] = r["settings"]["n_train"]
        summary["settings"]["sign"] = r["settings"]
    summary["arrays"] = str(arrays_path)
    write_json_atomic(summary, summary_path)
    save_npz_atomic(arrays_path, **arrays)
    return summary


EXPERIMENTS = ("loo-convex", "loo-network", "flipped", "sign")


def register(subparsers) -> None:
    """``python -m influence_over_inference validate {loo-convex,loo-network,flipped,sign,all}``."""
    p = subparsers.add_parser("validate", help="check influence against retraining: leave-one-out (convex, network), "
                                               "flipped labels, the sign; writes results/validation.json")
    p.add_argument("experiment", choices=(*EXPERIMENTS, "all"), help="which experiment (all: the four in turn)")
    p.add_argument("--checkpoint", default="data/cifar_net.pt", help="trained model for loo-convex (default: %(default)s)")
    p.add_argument("--data", default="auto", help="CIFAR-10 source, as for `train`")
    p.add_argument("--data-root", default="data", help="where torchvision downloads to and caches live")
    p.add_argument("--cache-dir", default=str(CACHE_DIR), help="experiment caches (default: %(default)s)")
    p.add_argument("--out", default=str(SUMMARY_PATH), help="summary JSON (default: %(default)s)")
    p.add_argument("--arrays", default=str(ARRAYS_PATH), help="plot arrays (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: %(default)s, leaves a core to other work)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a field of the experiment's config (JSON value), e.g. --set n_per_class=500 "
                        "--set epochs=30 (flipped); repeatable; only with a single experiment")
    p.add_argument("--as", dest="summary_key", default=None,
                   help="summary key for this run (e.g. flipped_memorising: the memorising-regime flipped run)")
    p.add_argument("--worker", default="0/1", metavar="I/N",
                   help="loo-network only: this process is worker I of N parallel retraining processes "
                        "(start worker 0 first; the others once it retrains); default %(default)s")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_validate)


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        field_name, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set wants FIELD=VALUE, got {pair!r}")
        try:
            out[field_name] = json.loads(value)
        except ValueError:
            out[field_name] = value
    return out


def cmd_validate(args) -> int:
    from .data import load_cifar10
    from .flipped import run_flipped
    from .leave_one_out import (
        ConvexLOOConfig,
        NetworkLOOConfig,
        SignConfig,
        run_loo_convex,
        run_loo_network,
        run_sign,
    )

    torch.set_num_threads(args.threads)
    data = load_cifar10(args.data, root=args.data_root)
    from .flipped import FlippedConfig

    chosen = EXPERIMENTS if args.experiment == "all" else (args.experiment,)
    progress = not args.no_progress
    sets = _overrides(args.set)
    if sets and len(chosen) > 1:
        raise ValueError("--set applies to a single experiment, not 'all'")
    configs = {"loo-convex": ConvexLOOConfig, "loo-network": NetworkLOOConfig, "flipped": FlippedConfig,
               "sign": SignConfig}
    for name in chosen:
        config = configs[name](**sets)
        if name == "loo-convex":
            r = run_loo_convex(args.checkpoint, data, config, cache_dir=args.cache_dir, progress=progress)
            lines = [f"test image {i}: Pearson {t['pearson']:.4f}, Spearman {t['spearman']:.4f}"
                     for i, t in zip(r["test_indices"], r["test"], strict=True)]
        elif name == "loo-network":
            worker, workers = (int(v) for v in args.worker.split("/"))
            r = run_loo_network(data, config, cache_dir=args.cache_dir, progress=progress, worker=worker,
                                workers=workers)
            if r is None:
                print(f"worker {worker}/{workers} done")  # noqa: T201 (CLI output)
                continue
            lines = [f"test image {i}: " + ", ".join(f"{s} Pearson {t['pearson'][s]:.3f} Spearman {t['spearman'][s]:.3f}"
                                                     for s in t["pearson"])
                     for i, t in zip(r["test_indices"], r["test"], strict=True)]
        elif name == "flipped":
            r = run_flipped(data, config, cache_dir=args.cache_dir, progress=progress)
            lines = [f"{k}: found at 10% {m['found_at_10']:.3f}, at 20% {m['found_at_20']:.3f}, ROC-AUC {m['auc']:.3f}"
                     for k, m in r["metrics"].items()]
        else:
            r = run_sign(data, config, cache_dir=args.cache_dir, progress=progress)
            lines = [f"remove 100 most harmful: mean test-loss change {r['harmful_removed_delta_mean']:+.4f} "
                     f"(fell for {r['harmful_removed_fell']}/{r['n_test']}), flipped to correct: {r['flipped_to_correct']}",
                     f"remove 100 most helpful: mean test-loss change {r['helpful_removed_delta_mean']:+.4f} "
                     f"(rose for {r['helpful_removed_rose']}/{r['n_test']})"]
        summarize({args.summary_key or name.replace("-", "_"): r}, args.out, args.arrays)
        header = f"{name} ({r['minutes']:.1f} min, n_train {r['settings']['n_train']}):"
        print("\n  ".join([header, *lines]), flush=True)  # noqa: T201 (CLI output)
    print(f"summary: {args.out}")  # noqa: T201 (CLI output)
    return 0
