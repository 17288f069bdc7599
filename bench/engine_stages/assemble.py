"""Putting the stages together: agreement with the CG reference, the summary JSON, its notes and the printed table."""

from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from influence_over_inference.study.data import load_cifar10

from .common import ROOT
from .config import BenchConfig

log = logging.getLogger("bench")

def _spearman_rows(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    from scipy.stats import spearmanr

    return np.array([spearmanr(a[i].numpy(), b[i].numpy()).statistic for i in range(len(a))])


def _top_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    """Mean fraction of shared indices among the k most helpful (and, separately, most harmful)."""
    shares = []
    for i in range(len(a)):
        for largest in (True, False):
            ta = set(a[i].topk(k, largest=largest).indices.tolist())
            tb = set(b[i].topk(k, largest=largest).indices.tolist())
            shares.append(len(ta & tb) / k)
    return float(np.mean(shares))


def agreement(out: Path, n_agree: int) -> dict:
    """Spearman (mean over the agreement test images) and top-10 overlap of each method vs CG."""
    ref_path = out / "cg.pt"
    if not ref_path.exists():
        return {}
    cg = torch.load(ref_path, weights_only=True)[:n_agree]
    res = {}
    for name in ("fast", "lissa", "nimarb_own", "kronfluence"):
        p = out / f"{name}.pt"
        if not p.exists():
            continue
        other = torch.load(p, weights_only=True)[:n_agree]
        key = "nimarb" if name == "nimarb_own" else name
        rho = _spearman_rows(other, cg)
        res[f"spearman_{key}_vs_cg"] = float(rho.mean())
        res[f"spearman_{key}_vs_cg_per_test"] = rho.tolist()
        res[f"top10_overlap_{key}_vs_cg"] = _top_overlap(other, cg)
        if name == "nimarb_own":  # as nimarb labels them, its numbers are the negatives of ours
            res["spearman_nimarb_as_published_vs_cg"] = float(_spearman_rows(-other, cg).mean())
        if name == "kronfluence":  # kronfluence's sign: same as ours if this is positive
            res["kronfluence_sign_vs_ours"] = "same" if rho.mean() > 0 else "opposite"
    return res


def assemble(cfg: BenchConfig, quick: bool, out: Path, stages: dict) -> dict:
    g = {k: v for s in stages.values() for k, v in s.items() if not isinstance(v, dict)}
    n_train = cfg.n_train or 50_000
    res = {"data_source": None, "quick": quick, "n_test": cfg.n_test, "n_train": n_train, "n_agree": cfg.n_agree,
           "damping": cfg.damping, "config": asdict(cfg)}
    src = load_cifar10(root=str(ROOT / "data")).source
    res["data_source"] = src
    ns, os_ = stages.get("nimarb_same", {}), stages.get("ours_same", {})
    if "nimarb_s_per_test" in ns and "ours_s_per_test" in os_:
        res["nimarb_s_per_test"] = ns["nimarb_s_per_test"]
        res["ours_s_per_test"] = os_["ours_s_per_test"]
        res["speedup_1test_same_settings"] = ns["nimarb_s_per_test"] / os_["ours_s_per_test"]
        res["same_settings"] = ns["settings"]
    no = stages.get("nimarb_own", {})
    if "nimarb_own_s_test_s" in no and "nimarb_per_train_image_s" in ns:
        per_test = no["nimarb_own_s_test_s"] + ns["nimarb_per_train_image_s"] * n_train
        res["nimarb_t100_s"] = cfg.n_test * per_test
        res["nimarb_own_settings"] = no["settings"]
        res["nimarb_loop_rel_diff"] = no["nimarb_loop_rel_diff"]
    for key in ("t100_fast_s", "fast_fit_s", "fast_s_test_s", "fast_scoring_s", "cg_iterations", "cg_final_residual",
                "epoch_s", "epoch_call_s", "kronfluence_t100_s", "kronfluence_fit_s", "kronfluence_scores_s",
                "lissa_s_test_s", "stream_s", "cg_residuals",
                "pearson_fast_vs_exact_small", "pearson_kronfluence_vs_exact_small", "small_params",
                "small_test_accuracy", "small_train_accuracy", "small_train_loss", "small_n_train"):
        if key in g:
            res[key] = g[key]
    for key in ("fast_settings", "cg_settings", "lissa_settings", "small_by_damping"):
        for s in stages.values():
            if key in s:
                res[key] = s[key]
    cg, fast = stages.get("cg", {}), stages.get("fast", {})
    if "cg_s_test_s" in cg and "fast_scoring_s" in fast:
        # CG's s_test per test image (batched over the agreement images) times n_test, plus the
        # same streamed scoring of n_test vectors as the fast run's
        res["t100_cg_s"] = cg["cg_s_test_s"] * cfg.n_test / cfg.n_agree + fast["fast_scoring_s"]
        res["cg_s_test_s"] = cg["cg_s_test_s"]
    if "t100_fast_s" in res and "nimarb_t100_s" in res:
        res["speedup_vs_nimarb"] = res["nimarb_t100_s"] / res["t100_fast_s"]
    if "t100_fast_s" in res and "epoch_s" in res:
        res["t100_fast_epochs"] = res["t100_fast_s"] / res["epoch_s"]
    if "t100_fast_s" in res and "kronfluence_t100_s" in res:
        res["speedup_vs_kronfluence"] = res["kronfluence_t100_s"] / res["t100_fast_s"]
    res["peak_rss_mb"] = stages.get("fast", {}).get("peak_rss_mb")
    res["peak_rss_mb_by_stage"] = {k: v.get("peak_rss_mb") for k, v in stages.items()}
    res["wall_s_by_stage"] = {k: v.get("stage_wall_s") for k, v in stages.items()}
    res["load_avg_by_stage"] = {k: v.get("load_avg") for k, v in stages.items()}
    res["finished_at_by_stage"] = {
        k: v.get("finished_at") or (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime((out / f"{k}.json").stat().st_mtime))
                                    if (out / f"{k}.json").exists() else None)
        for k, v in stages.items()}
    res.update(agreement(out, cfg.n_agree))
    res["notes"] = notes(cfg, n_train)
    res["git"] = _git_state()
    res["failed_stages"] = [k for k, v in stages.items() if v.get("failed")]
    return res


def _git_state() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    dirty = git("status", "--porcelain", "--", "influence_over_inference", "bench")
    return {"commit": git("rev-parse", "HEAD"), "uncommitted_package_changes": dirty.splitlines() if dirty else []}


def notes(cfg: BenchConfig, n_train: int) -> list[str]:
    return [
        f"nimarb_s_per_test and ours_s_per_test: s_test timed over {cfg.timing_depth} recursion steps and "
        f"extrapolated linearly to depth {cfg.same_depth} (both); nimarb's one-image-at-a-time scoring timed on "
        f"{cfg.nimarb_train_measured} training images and extrapolated to {n_train}; ours scores all {n_train}.",
        f"nimarb_t100_s: extrapolated from its per-image costs: {cfg.n_test} x (its s_test at its settings, timed "
        f"over {min(cfg.timing_depth, cfg.nimarb_depth)} steps and extrapolated to depth {cfg.nimarb_depth}, + "
        f"{n_train} x its per-training-image cost); calc_img_wise recomputes every training gradient per test image.",
        f"t100_cg_s: CG's s_test run on the first {cfg.n_agree} test images (batched), extrapolated linearly to "
        f"{cfg.n_test}, plus the fast run's measured streamed scoring of {cfg.n_test} vectors over {n_train} images.",
        f"spearman_*_vs_cg: mean over the first {cfg.n_agree} test images of the Spearman correlation over all "
        f"{n_train} training scores with CG ({cfg.curvature}, damping {cfg.damping} + weight decay) as the reference.",
        "spearman_nimarb_vs_cg uses nimarb's numbers negated into our sign convention; "
        "spearman_nimarb_as_published_vs_cg uses them as nimarb labels them (its harmful/helpful are swapped).",
        "nimarb's scores over all training images were computed from its own s_test vectors with our streamed "
        "gradients (the same numbers as its loop: see nimarb_loop_rel_diff on a 200-image prefix).",
        "peak_rss_mb is the fast-solver process's peak RSS (ru_maxrss); each stage ran in its own process.",
        f"CG reference: the GGN of the engine's CGSolver's fixed seeded subsample ({cfg.cg}) + (weight decay + "
        "damping) I, solved by "
        + ("a bench-side conjugate gradient with float64 recurrences, products from the subsample's GGN factor "
           "rows computed once, preconditioned by the fast solver (the answer does not depend on the "
           "preconditioner; cg_true_residual checks it)."
           if cfg.cg_cached_factor else "the engine's CGSolver as it is (factor rows held, float64 recurrences)."),
        f"spearman_lissa_vs_cg: our LiSSA ({cfg.curvature}, batch {cfg.lissa_batch}) at depth {cfg.lissa_depth}, "
        "not 5000: see lissa_s_test_s (all agreement vectors together) for the cost of this depth on this loaded "
        "CPU; depth 5000 would take 25x longer; scale " + ("1.5 x the largest minibatch eigenvalue found by power iteration on 5 minibatches."
                           if cfg.lissa_scale is None else f"{cfg.lissa_scale}."),
        f"threads: every stage ran with torch.set_num_threads({cfg.threads}) on a shared 2-core machine; "
        "load_avg_by_stage records how busy it was.",
        "Stages are cached: a stage rerun with --only reuses the others' results; git records the commit at "
        "assembly, finished_at_by_stage when each stage's result was written.",
    ]


def print_table(res: dict) -> None:
    def f(key, fmt="{:.1f}"):
        v = res.get(key)
        return "-" if v is None else fmt.format(v)

    rows = [
        ("data", str(res.get("data_source"))),
        ("1 test image, same LiSSA settings: nimarb s", f("nimarb_s_per_test")),
        ("1 test image, same LiSSA settings: ours s", f("ours_s_per_test")),
        ("  speedup", f("speedup_1test_same_settings", "{:.1f}x")),
        (f"{res['n_test']} x {res['n_train']}: nimarb (its settings, extrapolated) s", f("nimarb_t100_s", "{:.0f}")),
        (f"{res['n_test']} x {res['n_train']}: ours, fast solver s", f("t100_fast_s")),
        ("  speedup vs nimarb", f("speedup_vs_nimarb", "{:.0f}x")),
        (f"{res['n_test']} x {res['n_train']}: ours, CG (extrapolated) s", f("t100_cg_s", "{:.0f}")),
        (f"{res['n_test']} x {res['n_train']}: kronfluence EK-FAC s", f("kronfluence_t100_s")),
        ("  fast vs kronfluence speedup", f("speedup_vs_kronfluence", "{:.2f}x")),
        ("one training epoch s", f("epoch_s")),
        ("fast solver in epoch-times", f("t100_fast_epochs", "{:.2f}")),
        ("peak RSS of the fast run MB", f("peak_rss_mb", "{:.0f}")),
        ("Spearman vs CG: fast", f("spearman_fast_vs_cg", "{:.3f}")),
        ("Spearman vs CG: LiSSA", f("spearman_lissa_vs_cg", "{:.3f}")),
        ("Spearman vs CG: nimarb (sign-corrected)", f("spearman_nimarb_vs_cg", "{:.3f}")),
        ("Spearman vs CG: nimarb (as published)", f("spearman_nimarb_as_published_vs_cg", "{:.3f}")),
        ("Spearman vs CG: kronfluence", f("spearman_kronfluence_vs_cg", "{:.3f}")),
        ("top-10 overlap with CG: fast / LiSSA", f"{f('top10_overlap_fast_vs_cg', '{:.2f}')} / {f('top10_overlap_lissa_vs_cg', '{:.2f}')}"),
        ("small net: Pearson vs exact: fast", f("pearson_fast_vs_exact_small", "{:.3f}")),
        ("small net: Pearson vs exact: kronfluence", f("pearson_kronfluence_vs_exact_small", "{:.3f}")),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
