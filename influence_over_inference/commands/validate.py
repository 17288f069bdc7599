"""``python -m influence_over_inference validate {loo-convex,loo-network,flipped,sign,lds,perturbation,all}``."""

from __future__ import annotations

import json

import torch

from ..engine.io import check_writable, check_writable_dir
from ..experiments.store import ARRAYS_PATH, CACHE_DIR, SUMMARY_PATH
from ..experiments.summary import summarize

EXPERIMENTS = ("loo-convex", "loo-network", "flipped", "sign")


def register(subparsers) -> None:
    """``python -m influence_over_inference validate {loo-convex,loo-network,flipped,sign,all}``."""
    p = subparsers.add_parser("validate", help="check influence against retraining: leave-one-out (convex, network), "
                                               "flipped labels, the sign; writes results/validation.json")
    p.add_argument("experiment", choices=(*EXPERIMENTS, "lds", "perturbation", "all"),
                   help="which experiment (all: the four in turn; lds: the linear datamodeling score against models "
                        "retrained on random halves, results/lds.json; perturbation: perturbation influence checked "
                        "by retraining and the training-set attack, results/perturbation.json; neither is part of all)")
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
    p.add_argument("--retrain-only", action="store_true",
                   help="lds only: train this worker's subset models (see --worker) and stop; score later")
    p.add_argument("--methods", nargs="+", default=None,
                   help="lds only: methods to score (default: all: fast fast_v1 fast_v2 fast_v3 ekfac grad_dot random "
                        "kronfluence_ekfac trak_1 cg lissa nimarb)")
    p.add_argument("--cached-only", action="store_true",
                   help="lds only: score only methods whose scores are cached (others reported as not computed)")
    p.add_argument("--no-retrain", action="store_true",
                   help="lds only: train no subset model; score against the models on disk or, where there are none, "
                        "the subset models' margins and losses in --arrays (results/lds.npz) from an earlier run")
    p.add_argument("--compare-only", action="store_true",
                   help="lds only: score nothing; recompute the paired comparisons (ours against each method with as "
                        "many models) in --out from --arrays")
    p.add_argument("--noise-ceiling", action="store_true",
                   help="lds only: train each subset a second time with another seed (resumable; --worker and "
                        "--retrain-only apply), then add the noise ceiling (how far any method can predict one "
                        "retrained model) and each cached method's LDS against the replicates to --out; scores "
                        "nothing new")
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
    from ..experiments.flipped import run_flipped
    from ..experiments.loo_convex import ConvexLOOConfig, run_loo_convex
    from ..experiments.loo_network import NetworkLOOConfig, run_loo_network
    from ..experiments.sign import SignConfig, run_sign
    from ..study.data import load_cifar10

    check_writable(args.out, "--out")
    check_writable(args.arrays, "--arrays")
    check_writable_dir(args.cache_dir, "--cache-dir")
    torch.set_num_threads(args.threads)
    if args.compare_only and args.experiment != "lds":
        raise ValueError("--compare-only is for `validate lds`")
    if args.noise_ceiling and args.experiment != "lds":
        raise ValueError("--noise-ceiling is for `validate lds`")
    data = None if args.compare_only else load_cifar10(args.data, root=args.data_root)  # it compares stored results only
    from ..experiments.flipped import FlippedConfig

    if args.experiment == "lds":
        return _cmd_lds(args, data)
    if args.experiment == "perturbation":
        return _cmd_perturbation(args, data)
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


def _cmd_lds(args, data) -> int:
    from ..experiments.lds import LDSConfig, balanced_test_indices, previous_run, retrain_subsets
    from ..experiments.lds_run import ARRAYS_PATH as LDS_ARRAYS
    from ..experiments.lds_run import FAST_METHODS, RESULT_PATH, SLOW_METHODS, compare_only, run_lds

    out = RESULT_PATH if args.out == str(SUMMARY_PATH) else args.out
    arrays = LDS_ARRAYS if args.arrays == str(ARRAYS_PATH) else args.arrays
    if args.compare_only:
        _print_paired(compare_only(out, arrays))
        print(f"results: {out}")  # noqa: T201 (CLI output)
        return 0
    config = LDSConfig(**_overrides(args.set))
    worker, workers = (int(v) for v in args.worker.split("/"))
    if args.noise_ceiling:
        return _cmd_lds_ceiling(args, data, config, worker, workers, out, arrays)
    test_idx = balanced_test_indices(data.test.labels, config.n_test, config.test_seed)
    previous = previous_run(out, arrays, config, data.source, test_idx)  # read once, handed to run_lds
    stored = previous is not None
    if args.retrain_only or not (args.no_retrain or stored):
        retrain_subsets(data, config, progress=not args.no_progress, worker=worker, workers=workers)
    elif stored:  # the earlier run's stored subset outputs stand in for the models: nothing to retrain
        print(f"subset outputs: {arrays} (from the earlier run in {out}; no retraining)")  # noqa: T201 (CLI output)
    if args.retrain_only:
        print(f"worker {worker}/{workers}: subset models done")  # noqa: T201 (CLI output)
        return 0
    r = run_lds(data, args.checkpoint, config, tuple(args.methods or FAST_METHODS + SLOW_METHODS), out=out,
                arrays=arrays, cached_only=args.cached_only, previous=previous)
    print(f"LDS over {r['n_subsets']} subset models, {r['n_test']} test images ({r['minutes']:.1f} min):")  # noqa: T201
    for name, m in r["methods"].items():
        if not m.get("computed"):
            print(f"  {name}: not computed ({m['reason']})")  # noqa: T201 (CLI output)
            continue
        print(f"  {name}: margin {m['lds_margin']:.4f} [{m['lds_margin_ci'][0]:.4f}, {m['lds_margin_ci'][1]:.4f}], "  # noqa: T201
              f"loss {m['lds_loss']:.4f}, subset ({r['n_test_subset']} images) {m['lds_margin_subset']:.4f}")
    _print_paired(r)
    print(f"results: {out}")  # noqa: T201 (CLI output)
    return 0


def _cmd_lds_ceiling(args, data, config, worker: int, workers: int, out, arrays) -> int:
    from ..experiments.lds import retrain_subsets
    from ..experiments.lds_ceiling import run_ceiling

    retrain_subsets(data, config, progress=not args.no_progress, worker=worker, workers=workers, replicate=1)
    if args.retrain_only:
        print(f"worker {worker}/{workers}: replicate models done")  # noqa: T201 (CLI output)
        return 0
    c = run_ceiling(data, config, out=out, arrays=arrays)["noise_ceiling"]
    print(f"noise ceiling over {config.n_subsets} subsets trained twice, {c['n_test']} test images:")  # noqa: T201
    print(f"  test-retest Spearman of the margin {c['retest']:.4f} [{c['retest_ci'][0]:.4f}, {c['retest_ci'][1]:.4f}]; "  # noqa: T201
          f"ceiling against one model {c['ceiling_one']:.4f}, against the mean of two {c['ceiling_mean2']:.4f}")
    for name, m in c["methods"].items():
        print(f"  {name}: LDS margin {m['lds_margin_original']:.4f} (original), {m['lds_margin_replicate']:.4f} "  # noqa: T201
              f"(replicate), {m['lds_margin_mean2']:.4f} (mean of both; predicted {m['predicted_mean2']:.4f}) "
              f"on {m['n_test']} images")
    print(f"results: {out}")  # noqa: T201 (CLI output)
    return 0


def _print_paired(result: dict) -> None:
    for name, rivals in result.get("paired", {}).items():
        print(f"{name} minus (paired over test images, 95% CI):")  # noqa: T201 (CLI output)
        for rival, c in rivals.items():
            print(f"  {rival}: {c['difference']:+.4f} [{c['ci'][0]:+.4f}, {c['ci'][1]:+.4f}] on {c['n_test']} images")  # noqa: T201


def _cmd_perturbation(args, data) -> int:
    from ..experiments.perturbation import ARRAYS_PATH as PERT_ARRAYS
    from ..experiments.perturbation import (
        RESULT_PATH,
        PerturbationConfig,
        run_perturbation,
        write_results,
    )

    out = RESULT_PATH if args.out == str(SUMMARY_PATH) else args.out
    arrays = PERT_ARRAYS if args.arrays == str(ARRAYS_PATH) else args.arrays
    r, a = run_perturbation(data, PerturbationConfig(**_overrides(args.set)), cache_dir=args.cache_dir,
                            progress=not args.no_progress)
    write_results(r, a, out, arrays)
    lines = [f"perturbation ({r['minutes']:.1f} min, n_train {r['settings']['n_train']}):",
             f"finite differences (tiny float64 model): relative error {r['fd_rel_err']:.2e}",
             f"retraining check, {r['n_pairs']} (training image, step) pairs: Pearson {r['retrain_pearson']:.3f} "
             f"(map . delta), {r['retrain_pearson_score_difference']:.3f} (score difference)"]
    for name, g in r["groups"].items():
        lines.append(f"attack, {name} ({g['n']} test images, {r['k_images']} training images each, "
                     f"{r['epsilon_levels']}/255): flipped {g['attack_flip_rate']:.2f} vs random {g['random_flip_rate']:.2f}; "
                     f"mean test-loss change {g['attack_loss_change']:+.4f} vs random {g['random_loss_change']:+.4f}"
                     + (f"; iterated: flipped {g['iterative_flip_rate']:.2f}, change {g['iterative_loss_change']:+.4f}"
                        if "iterative_flip_rate" in g else ""))
    print("\n  ".join(lines))  # noqa: T201 (CLI output)
    print(f"results: {out}, {arrays}")  # noqa: T201 (CLI output)
    return 0
