"""The LDS experiment: retrained subset models (:mod:`.lds`), every method's scores (:mod:`.lds_methods`),
their LDS (:mod:`.lds_score`), written to ``results/lds.json`` and a small npz.

Each method's scores are cached under ``data/lds/scores/`` (named by the method, the checkpoint and
the test images), so a rerun only computes what is missing; the result file is rewritten after
every method, so an interrupted run keeps the methods done.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..engine.io import save_npz_atomic, write_json_atomic
from .lds import (
    LDS_DIR,
    LDSConfig,
    balanced_test_indices,
    load_outputs,
    nested_subset,
    previous_run,
    subset_masks,
)
from .lds_methods import FAST_V1, FAST_V2, FAST_V3
from .lds_score import lds_summary, paired_difference
from .store import settings_key

log = logging.getLogger(__name__)

RESULT_PATH = Path("results/lds.json")

ARRAYS_PATH = Path("results/lds.npz")

FAST_METHODS = ("fast", "fast_v1", "fast_v2", "fast_v3", "ekfac", "grad_dot", "random", "kronfluence_ekfac", "trak_1")  # all n_test images

SLOW_METHODS = ("cg", "lissa", "nimarb")  # the n_test_subset images only

OUR_FAST = {"fast": {}, "fast_v1": FAST_V1, "fast_v2": FAST_V2, "fast_v3": FAST_V3}  # the fast solver's settings per method name: its defaults, v1-v3

OUR_SOLVERS = {**{name: ("fast", settings) for name, settings in OUR_FAST.items()}, "ekfac": ("ekfac", {})}  # (solver, settings)


def _method_scores(name, model, wd, train, x, y, work: Path, data=None, checkpoint=None):
    from . import lds_methods as m

    if name.startswith(("fast_ens", "fast_v1_ens")):  # fast[_v1]_ens<k>: averaged over k independently trained models
        base, k = name.split("_ens")
        paths = m.ensemble_members(data, checkpoint, int(k), work.parent / "ensemble")
        return m.fast_ensemble_scores(paths, wd, train, x, y, work / "ensemble", OUR_FAST[base])

    if name in OUR_SOLVERS:
        return m.solver_scores(*OUR_SOLVERS[name], model, wd, train, x, y)
    if name == "grad_dot":
        return m.grad_dot_scores(model, wd, train, x, y)
    if name == "random":
        return m.random_scores(len(y), len(train))
    if name == "kronfluence_ekfac":
        return m.kronfluence_scores(model, wd, train, x, y, work / "kronfluence")
    if name.startswith("trak_"):  # trak_<k>: TRAK over the checkpoint and k-1 models of other seeds (as fast_ens<k>)
        k = int(name.removeprefix("trak_"))
        if k > 1:
            from ..study.checkpoints import load_checkpoint

            model = [load_checkpoint(p)[0] for p in m.ensemble_members(data, checkpoint, k, work.parent / "ensemble")]
        return m.trak_scores(model, train, x, y, work / "trak")
    if name == "cg":
        return m.solver_scores("cg", m.CG_SETTINGS, model, wd, train, x, y)
    if name == "lissa":
        return m.lissa_scores(model, wd, train, x, y)
    if name == "nimarb":
        return m.nimarb_scores(model, train, x, y)
    raise ValueError(f"unknown method {name!r}; choose from {FAST_METHODS + SLOW_METHODS}, fast_ens<k>, fast_v1_ens<k> or trak_<k>")


def _solver_key(name: str) -> str:
    """For our solvers' methods, ensembles included: a hash of the described settings (a new default is a new
    cache entry; ``fast_ens<k>`` takes the default's, ``fast_v1_ens<k>`` fast_v1's)."""
    from ..engine.solvers import make_solver

    if name.startswith(("fast_ens", "fast_v1_ens")):
        return "-" + settings_key(make_solver("fast", **OUR_FAST[name.split("_ens")[0]]).describe())
    if name not in OUR_SOLVERS:
        return ""
    solver, settings = OUR_SOLVERS[name]
    return "-" + settings_key(make_solver(solver, **settings).describe())


def scores_key(checkpoint_sha: str, data_source: str, test_idx: np.ndarray) -> str:
    """The part of a scores cache name shared by all methods of one run: checkpoint, data, test images."""
    return settings_key({"checkpoint": checkpoint_sha, "data_source": data_source, "test": test_idx.tolist()})


def scores_path(work: Path, name: str, key: str, sub_pos: np.ndarray) -> Path:
    """Where method ``name``'s scores are cached; the slow methods' are of the ``sub_pos`` test images only."""
    subset = "-subset" + settings_key(sub_pos.tolist()) if name in SLOW_METHODS else ""
    return Path(work) / f"{name}-{key}{_solver_key(name)}{subset}.npz"


def total_minutes(result: dict) -> float:
    """Compute minutes of the whole experiment: the subset models' training plus every method's scoring
    (a method that reuses another's scores, ``same_as``, counts once)."""
    models = result.get("subset_model_minutes_mean", 0.0) * result.get("n_subsets", 0)
    methods = sum(m.get("seconds", 0.0) or 0.0 for m in result.get("methods", {}).values()
                  if m.get("computed") and not m.get("settings", {}).get("same_as"))
    return float(models + methods / 60)


def other_checkpoint_methods(result: dict) -> list[str]:
    """Computed methods whose scores came from another checkpoint than ``result["checkpoint_sha256"]`` (or an
    unrecorded one): an earlier run's, kept when a retrained checkpoint (training is not bit-reproducible
    across machines) rescored only some methods. They are not like for like with the others."""
    sha = result.get("checkpoint_sha256")
    return sorted(name for name, m in result.get("methods", {}).items()
                  if m.get("computed") and m.get("checkpoint_sha256") != sha)


def ours(result: dict) -> list[str]:
    """Our methods that :func:`paired_comparisons` sets against the rest: the default solver and the fast ensembles."""
    default = result.get("default_solver", "fast")
    return [name for name, m in result.get("methods", {}).items() if m.get("computed")
            and (name == default or name.startswith("fast_ens"))]


def paired_comparisons(result: dict, per_test: dict, n_boot: int = 1000) -> dict:
    """Each of :func:`ours` against every other computed method with as many trained models, paired over test images.

    ``{ours: {rival: {"difference", "ci", "n_test", "on"}}}``: the mean over test images of our
    per-test LDS (on the margin) minus the rival's, with a paired 95% bootstrap interval; ``on`` is
    ``"all"`` (the n_test images) or ``"subset"`` (the n_test_subset images, where the rival, a slow
    method, was scored on those only). Methods scored on another checkpoint than ours are left out
    (not like for like); so are ours of other sizes. Issue 9 asks of the default that every difference
    be positive, and against gradient dot product more than the interval.
    """
    methods = result.get("methods", {})
    sub_pos = per_test.get("subset_positions")
    out = {}
    for name in ours(result):
        mine = methods[name]
        rivals = {}
        for rival, m in methods.items():
            if (rival == name or not m.get("computed") or m.get("n_models", 1) != mine.get("n_models", 1)
                    or m.get("checkpoint_sha256") != mine.get("checkpoint_sha256")):
                continue
            a, b = per_test.get(f"{name}_margin"), per_test.get(f"{rival}_margin")
            if a is None or b is None:
                continue
            on = "all" if len(b) == len(a) else "subset"
            if on == "subset":
                if sub_pos is None or len(b) != len(sub_pos):
                    continue
                a = a[sub_pos]
            diff, ci, n = paired_difference(a, b, n_boot)
            rivals[rival] = {"difference": diff, "ci": list(ci), "n_test": n, "on": on}
        out[name] = rivals
    return out


def _fast_is_v1() -> bool:
    from ..engine.solvers import make_solver
    return make_solver("fast").describe() == make_solver("fast", **OUR_FAST["fast_v1"]).describe()


def run_lds(data, checkpoint: str | os.PathLike, config: LDSConfig | None = None,
            methods: tuple[str, ...] = FAST_METHODS + SLOW_METHODS, cache_dir: str | os.PathLike = LDS_DIR,
            out: str | os.PathLike = RESULT_PATH, arrays: str | os.PathLike = ARRAYS_PATH, cached_only: bool = False,
            previous=None) -> dict:
    """Score ``methods`` against the subset models trained so far; returns (and writes) the result dict.

    ``cached_only``: report the methods whose scores are not cached yet as not computed (no new work),
    e.g. to assemble the results of runs made in parallel processes.

    An earlier run's result at ``out`` (same config, data and test images, with all its subsets in
    ``arrays``) is extended, not replaced: its other methods and fields are kept as they are, only
    ``methods`` are (re)scored, and its stored subset outputs are used when the subset models are
    no longer on disk. So ``--methods trak_1`` adds TRAK without retraining or rescoring the rest.
    ``previous``: that earlier run as :func:`.lds.previous_run` returned it, when the caller has read it
    already (it is read here otherwise).
    """
    from ..engine.hashing import file_sha256
    from ..study.checkpoints import load_checkpoint

    config = config or LDSConfig()
    start = time.perf_counter()
    model, meta = load_checkpoint(checkpoint)
    wd = float(meta.get("recipe", {}).get("weight_decay", 0.0))
    test_idx = balanced_test_indices(data.test.labels, config.n_test, config.test_seed)
    sub_pos = nested_subset(test_idx, config.n_test_subset, config.test_seed + 1)
    outputs = load_outputs(data, config, test_idx, cache_dir)
    if previous is None:
        previous = previous_run(out, arrays, config, data.source, test_idx)
    if previous is not None and len(outputs["subsets"]) < config.n_subsets:
        log.info("subset models not all on disk (%d of %d): using the outputs stored in %s",
                 len(outputs["subsets"]), config.n_subsets, arrays)
        outputs = previous[1]["outputs"]
    done = outputs["subsets"]
    if len(done) < 2:
        raise RuntimeError(f"only {len(done)} subset models in {cache_dir}; train them first (validate lds --retrain-only)")
    masks = subset_masks(len(data.train), config)[done]
    x, y = data.test.tensors(test_idx)
    work = Path(cache_dir) / "scores"
    checkpoint_sha = file_sha256(checkpoint)
    key = scores_key(checkpoint_sha, data.source, test_idx)
    result = {"n_subsets": int(len(done)), "n_subsets_planned": config.n_subsets, "n_test": int(len(test_idx)),
              "n_test_subset": int(len(sub_pos)), "alpha": config.alpha, "data_source": data.source,
              "checkpoint": str(checkpoint), "default_solver": "fast",
              "subset_model_test_accuracy_mean": float(outputs["test_accuracy"].mean()),
              "subset_model_minutes_mean": float(outputs["seconds"].mean() / 60),
              "config": asdict(config), "methods": {}}
    per_test, per_test_scores, ceiling = {}, {}, {}
    if previous is not None:  # extend the earlier run: its fields and other methods as they were
        result, per_test = previous[0], dict(previous[1]["per_test"])
        result["methods"] = dict(result.get("methods", {}))
        ceiling = previous[1].get("ceiling", {})  # the noise ceiling's arrays (.lds_ceiling)
    result["checkpoint_sha256"] = checkpoint_sha
    for name in methods:
        slow = name in SLOW_METHODS
        pos = sub_pos if slow else np.arange(len(test_idx))
        path = scores_path(work, name, key, sub_pos)
        same_as_fast = name == "fast_v1" and _fast_is_v1() and "fast" in per_test_scores
        fresh = not path.exists()
        if same_as_fast:  # today's default is v1: the same scores, not computed twice
            scores, seconds, described = per_test_scores["fast"], result["methods"]["fast"]["seconds"], {"same_as": "fast"}
        elif not path.exists() and cached_only:
            result["methods"][name] = {"computed": False, "reason": "no cached scores (not finished in time); "
                                       f"run `validate lds --methods {name}`"}
            continue
        elif path.exists():
            blob = np.load(path, allow_pickle=False)
            scores, seconds = blob["scores"], float(blob["seconds"])
            described = json.loads(str(blob["settings"])) if "settings" in blob.files else {}
        else:
            t0 = time.perf_counter()
            try:
                scores, described = _method_scores(name, model, wd, data.train, x[pos], y[pos], work, data, checkpoint)
            except Exception as error:  # a peer that fails is reported, not fatal
                log.exception("method %s failed", name)
                result["methods"][name] = {"computed": False, "reason": f"{type(error).__name__}: {error}"}
                continue
            seconds = time.perf_counter() - t0
            save_npz_atomic(path, scores=scores.astype(np.float32), seconds=np.float64(seconds),
                            settings=np.array(json.dumps(described)))
        if name == "fast":
            per_test_scores["fast"] = scores
        summary, per_m, per_l = lds_summary(scores, masks, outputs["margins"][:, pos], outputs["losses"][:, pos],
                                            n_boot=config.n_boot)
        if not slow:
            sub, _, _ = lds_summary(scores[sub_pos], masks, outputs["margins"][:, sub_pos],
                                    outputs["losses"][:, sub_pos], n_boot=config.n_boot)
            summary.update({k.replace("_ci", "_subset_ci") if k.endswith("_ci") else f"{k}_subset": v
                            for k, v in sub.items() if k.startswith("lds")})
        else:
            summary.update({k.replace("_ci", "_subset_ci") if k.endswith("_ci") else f"{k}_subset": v
                            for k, v in summary.items() if k.startswith("lds")})
        summary.update({"n_models": int(described.get("n_models", 1)), "seconds": seconds, "settings": described,
                        "computed": True, "checkpoint_sha256": checkpoint_sha})
        result["methods"][name] = summary
        per_test[f"{name}_margin"], per_test[f"{name}_loss"] = per_m.astype(np.float32), per_l.astype(np.float32)
        if fresh:  # new scores: the noise ceiling's rows of this method (.lds_ceiling) are stale
            result.get("noise_ceiling", {}).get("methods", {}).pop(name, None)
            for k in (f"ceiling_{name}_vs_replicate", f"ceiling_{name}_vs_mean2"):
                ceiling.pop(k, None)
        result["minutes"] = total_minutes(result)
        write_json_atomic(result, out)
        save_npz_atomic(arrays, test_indices=test_idx, subset_positions=sub_pos, subsets=done,
                        margins=outputs["margins"].astype(np.float32), losses=outputs["losses"].astype(np.float32),
                        **per_test, **ceiling)
        log.info("%s: LDS margin %.4f %s, loss %.4f", name, summary["lds_margin"], summary["lds_margin_ci"],
                 summary["lds_loss"])
    result["minutes"] = total_minutes(result)
    result["minutes_this_run"] = (time.perf_counter() - start) / 60
    result["methods_from_other_checkpoints"] = other_checkpoint_methods(result)
    result["paired"] = paired_comparisons(result, {**per_test, "subset_positions": sub_pos}, config.n_boot)
    write_json_atomic(result, out)
    return result


def compare_only(out: str | os.PathLike = RESULT_PATH, arrays: str | os.PathLike = ARRAYS_PATH) -> dict:
    """Recompute ``paired`` (:func:`paired_comparisons`) in an existing result from its npz; nothing is scored.

    Needs neither the checkpoint nor the data: what ``validate lds --compare-only`` runs.
    """
    out, arrays = Path(out), Path(arrays)
    if not out.exists() or not arrays.exists():
        raise FileNotFoundError(f"no LDS result to compare in {out} and {arrays}; run `validate lds` first")
    result = json.loads(out.read_text())
    with np.load(arrays, allow_pickle=False) as blob:
        per_test = {k: blob[k] for k in blob.files if k.endswith(("_margin", "_loss")) or k == "subset_positions"}
    result["methods_from_other_checkpoints"] = other_checkpoint_methods(result)
    result["paired"] = paired_comparisons(result, per_test, result.get("config", {}).get("n_boot", 1000))
    write_json_atomic(result, out)
    return result
