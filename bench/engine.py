"""Benchmark: our influence engine against nimarb's package and kronfluence, on the real model.

The real model is ``data/cifar_net.pt`` (the nimarb LeNet, 62,006 parameters) and the data the
real CIFAR-10 (here the offline JPEG copy; ``data_source`` records which). Issue 6, item 7.

    python bench/engine.py            # the full benchmark -> bench/results/engine.json
    python bench/engine.py --quick    # a smoke run on small numbers -> data/bench/quick/engine.json
    python bench/engine.py --fresh    # ignore cached stage results

Each measurement ("stage") runs in its own Python process, so its wall time and its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) are its own; its result is cached under
``data/bench/<key>/<stage>.json`` (+ ``.pt`` for score matrices), keyed by the checkpoint's
hash, the data source and the settings, so a rerun after an interruption resumes where it stopped.

What is measured (all wall seconds on this machine, with its load average recorded):

- ``epoch``: one training epoch of our TrainConfig recipe on the same data, same run.
- ``nimarb_same`` / ``ours_same``: ONE test image with the same LiSSA settings (Hessian, batch,
  scale, damp, depth, r = 1) and all training images. nimarb's ``s_test`` and our LiSSA run
  ``timing_depth`` recursion steps and are extrapolated linearly to ``depth`` (each step costs
  the same; nimarb's output does not even depend on the depth); nimarb's per-training-image
  scoring is timed on ``nimarb_train_measured`` images and extrapolated to all; ours scores all.
- ``nimarb_own``: nimarb at its own settings (damp 0.01, scale 25, depth 5000, batch 4) for the
  agreement test images: its ``s_test`` timed over ``timing_depth`` steps (extrapolated), its
  scores over all training images computed with our streamed gradients from its s_test vector
  (the same numbers as its one-image loop; checked on a prefix, ``nimarb_loop_rel_diff``).
  ``nimarb_t100_s`` = n_test x (s_test at depth 5000 + n_train x its per-image cost).
- ``fast``: ours, fast solver, all n_test x n_train scores, fit included.
- ``cg``: CG (the reference) on the ``n_agree`` agreement test images; ``t100_cg_s``
  extrapolated linearly to n_test.
- ``lissa``: our LiSSA on the agreement test images (curvature and depth as configured).
- ``kronfluence``: kronfluence 1.0.1 EK-FAC, factors on all training images + pairwise scores.
- ``small``: a trained 3,702-parameter conv net of the same shape on a CIFAR subset, exact
  influence from the explicit damped GGN / Hessian; Pearson of fast and kronfluence vs exact.
Agreement (Spearman over all training images, top-10 overlap) is computed from the cached
score matrices at the end.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from influence_over_inference.engine.hashing import file_sha256
from influence_over_inference.engine.io import atomic_torch_save
from influence_over_inference.study import nimarb_reference as nr
from influence_over_inference.study.checkpoints import load_checkpoint
from influence_over_inference.study.data import load_cifar10

log = logging.getLogger("bench")

STAGES = ("epoch", "nimarb_same", "ours_same", "nimarb_own", "fast", "cg", "lissa", "score", "kronfluence", "small")
AGREE_STAGES = ("nimarb_own", "cg", "lissa")  # s_test vectors scored together by the "score" stage


@dataclass
class BenchConfig:
    checkpoint: str = "data/cifar_net.pt"  # the real trained model
    n_test: int = 100  # test images of the "users' question" (the first n_test of the test split)
    n_agree: int = 5  # of those, the first n_agree get CG, LiSSA and nimarb scores (agreement)
    n_train: int | None = None  # training images scored (None: all 50,000)
    damping: float = 0.01  # lambda for every solver (on top of the training weight decay)
    # one test image, same LiSSA settings (nimarb vs ours): Koh & Liang's Hessian recursion
    same_batch: int = 100  # minibatch per recursion step
    same_scale: float = 500.0  # LiSSA scale (must exceed the minibatch curvature's top eigenvalue)
    same_depth: int = 5000  # recursion depth the timing stands for
    timing_depth: int = 100  # steps actually run to time one s_test (extrapolated to the depth)
    nimarb_train_measured: int = 5000  # training images nimarb's one-at-a-time scoring is timed on
    # nimarb at its own settings (its defaults; batch 4 as in the PyTorch tutorial it builds on)
    nimarb_batch: int = nr.NIMARB_BATCH_SIZE
    nimarb_scale: float = nr.NIMARB_SCALE
    nimarb_damp: float = nr.NIMARB_DAMP
    nimarb_depth: int = nr.NIMARB_DEPTH
    # the reference and the agreement runs (curvature "ggn": the fast solver's, PSD)
    curvature: str = "ggn"  # curvature of CG, LiSSA (agreement) and the exact small-model reference
    # CGSettings overrides: GGN over a fixed 1,000-image subsample (the fast solver's 500 are its
    # first half: same seeded permutation), solved to a tight tolerance
    cg: dict = field(default_factory=lambda: {"n_samples": 1000, "tol": 1e-4, "max_iter": 400, "max_factor_mb": 3000.0})
    cg_cached_factor: bool = False  # True: a bench-side fast-solver-preconditioned CG (faster) instead of the engine's CG
    # FastSettings overrides: the engine's default n_samples=2000 needs a 5 GB factor here
    fast: dict = field(default_factory=lambda: {"n_samples": 500, "rank": 500})
    lissa_depth: int = 200  # LiSSA depth in the agreement run (5000 would take hours here; see notes)
    lissa_batch: int = 100
    lissa_scale: float | None = None  # None: 1.5 x the largest minibatch eigenvalue (power iteration)
    kron_batch: int = 512  # kronfluence per-device batch size (factors and training gradients)
    # the small-model accuracy check
    small_channels: tuple = (4, 4)  # Net(channels, hidden): 3,702 parameters
    small_hidden: tuple = (24, 16)
    small_n_train: int = 2000  # CIFAR training images the tiny net is trained on (and scored)
    small_epochs: int = 30
    small_n_test: int = 20  # test images whose Pearson is averaged
    small_dampings: tuple = (0.01, 0.5)  # the first is the headline value
    seed: int = 0
    threads: int = 1  # torch CPU threads per stage: on this shared 2-core machine 2 threads under
    #                   contention ran 2-6x slower than 1 (measured); every method gets the same

    def __post_init__(self):
        if not 1 <= self.n_agree <= self.n_test:
            raise ValueError(f"n_agree must be in [1, n_test={self.n_test}], got {self.n_agree}")
        if not 1 <= self.timing_depth <= self.same_depth:
            raise ValueError("timing_depth must be in [1, same_depth]")
        if self.damping <= 0:
            raise ValueError("damping must be > 0")

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(n_test=4, n_agree=2, n_train=1000, same_depth=200, timing_depth=20, nimarb_train_measured=100,
                   nimarb_depth=200, lissa_depth=5, cg={"n_samples": 200, "tol": 1e-4, "max_iter": 400, "max_factor_mb": 3000.0},
                   fast={"n_samples": 200, "rank": 100},
                   kron_batch=250, small_n_train=300, small_epochs=3, small_n_test=3)


# ----------------------------------------------------------------------------- common setup

def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux


def _load(cfg: BenchConfig):
    data = load_cifar10(root=str(ROOT / "data"))
    model, meta = load_checkpoint(ROOT / cfg.checkpoint)
    wd = float(meta.get("recipe", {}).get("weight_decay", 0.0))
    train = random_subset(data.train, cfg.n_train, cfg.seed)  # all 50,000 unless --quick
    return data, model.eval(), wd, train


def random_subset(split, n: int | None, seed: int):
    """A seeded random subset of ``n`` images (all if None), in index order. Not ``split.subset(n)``:
    that takes the first n, and the folder source is ordered by class (the first 5,000 are airplanes)."""
    from influence_over_inference.study.data import CIFAR10Split

    if n is None or n >= len(split):
        return split
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return CIFAR10Split(split.images[idx], split.labels[idx], [split.names[i] for i in idx.tolist()])


def _test(data, cfg, n):
    return data.test.tensors(torch.arange(n))


def _scores_for(model, s_vectors, train, solver_like):
    """Our streamed scores (K, n) for given s_test vectors (project sign, 1/n included)."""
    from influence_over_inference.engine.scores import influence

    x0 = torch.zeros(len(s_vectors), 3, 32, 32)
    y0 = torch.zeros(len(s_vectors), dtype=torch.long)
    return influence(model, x0, y0, train, solver_like, stest=s_vectors)


def _lissa_like(model, train, wd):
    """A fitted (matrix-free, instant) solver, for the streaming scorer's bookkeeping."""
    from influence_over_inference.engine.solvers.registry import make_solver

    return make_solver("lissa").fit(model, train, weight_decay=wd)


# ----------------------------------------------------------------------------- stages

def stage_epoch(cfg, data, model, wd, train, out):
    from influence_over_inference.study.training import TrainConfig
    from influence_over_inference.study.training import train as train_model

    tc = TrainConfig(epochs=1, device="cpu", threads=cfg.threads)
    start = time.perf_counter()
    result = train_model(train, tc, progress=True)
    # epoch_s: the training loop of one epoch (as TrainResult reports it); epoch_call_s adds setup
    return {"epoch_s": result.history[0].seconds, "epoch_call_s": time.perf_counter() - start,
            "epoch_recipe": asdict(tc)}


def stage_nimarb_same(cfg, data, model, wd, train, out):
    x, y = _test(data, cfg, 1)
    tx, ty = train.tensors()
    gen = torch.Generator().manual_seed(cfg.seed)
    feed = nr.MinibatchFeed(tx, ty, nr.draw_minibatches(len(ty), cfg.same_batch, cfg.timing_depth, gen))
    damp = cfg.damping / cfg.same_scale
    cost, _, _ = nr.measure_nimarb_cost(model, x[0], y[0], tx, ty, feed, damp, cfg.same_scale,
                                        cfg.timing_depth, cfg.nimarb_train_measured)
    s_test_s = cost.s_test_s * cfg.same_depth / cfg.timing_depth
    n = len(ty)
    return {"nimarb_s_test_timed_s": cost.s_test_s, "nimarb_s_test_s": s_test_s,
            "nimarb_per_train_image_s": cost.per_train_image_s, "nimarb_train_measured": cost.n_train_measured,
            "nimarb_s_per_test": s_test_s + cost.per_train_image_s * n,
            "settings": {"curvature": "hessian", "batch": cfg.same_batch, "scale": cfg.same_scale, "damp": damp,
                         "damping": cfg.damping, "depth": cfg.same_depth, "timed_depth": cfg.timing_depth, "r": 1}}


def stage_ours_same(cfg, data, model, wd, train, out):
    from influence_over_inference.engine.scores import influence, s_test
    from influence_over_inference.engine.solvers.registry import make_solver

    x, y = _test(data, cfg, 1)
    solver = make_solver("lissa", curvature="hessian", damping=cfg.damping, scale=cfg.same_scale,
                         depth=cfg.timing_depth, batch_size=cfg.same_batch, seed=cfg.seed)
    t0 = time.perf_counter()
    solver.fit(model, train, weight_decay=wd)
    s = s_test(model, x, y, solver)
    t_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = influence(model, x, y, train, solver, stest=s, progress=True)
    t_scores = time.perf_counter() - t0
    s_test_s = t_s * cfg.same_depth / cfg.timing_depth
    return {"ours_s_test_timed_s": t_s, "ours_s_test_s": s_test_s, "ours_scoring_s": t_scores,
            "ours_s_per_test": s_test_s + t_scores, "finite": bool(torch.isfinite(scores).all())}


def stage_nimarb_own(cfg, data, model, wd, train, out):
    x, y = _test(data, cfg, cfg.n_agree)
    tx, ty = train.tensors()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    vecs, seconds = [], []
    for i in range(cfg.n_agree):
        steps = min(cfg.timing_depth, cfg.nimarb_depth)
        feed = nr.MinibatchFeed(tx, ty, nr.draw_minibatches(len(ty), cfg.nimarb_batch, steps, gen))
        v, t = nr.timed(nr.nimarb_s_test, model, x[i], y[i], feed, cfg.nimarb_damp, cfg.nimarb_scale, steps)
        vecs.append(v)
        seconds.append(t * cfg.nimarb_depth / steps)
        log.info("nimarb s_test %d/%d: %.1f s for %d steps", i + 1, cfg.n_agree, t, steps)
    s = torch.stack(vecs)  # (K, P); scored over all training images by the "score" stage
    # its own one-image loop on a prefix, to check the streamed scores reproduce its numbers
    m = min(200, len(ty))
    theirs = nr.nimarb_scores(model, x[0], y[0], tx[:m], ty[:m], vecs[0])
    loop = torch.as_tensor(nr.to_project_sign(theirs.influences, n_scored=m, n_train=len(ty)))
    ours = _scores_for(model, s[:1], (tx[:m], ty[:m]), _lissa_like(model, train, wd))[0] * m / len(ty)
    rel = float((loop - ours.double()).norm() / ours.double().norm())
    atomic_torch_save(s, out / "nimarb_own_stest.pt")
    return {"nimarb_own_s_test_s": float(np.mean(seconds)), "nimarb_loop_rel_diff": rel,
            "settings": {"curvature": "hessian", "batch": cfg.nimarb_batch, "scale": cfg.nimarb_scale,
                         "damp": cfg.nimarb_damp, "depth": cfg.nimarb_depth,
                         "timed_depth": min(cfg.timing_depth, cfg.nimarb_depth), "r": 1}}


def stage_fast(cfg, data, model, wd, train, out):
    from influence_over_inference.engine.scores import influence, s_test
    from influence_over_inference.engine.solvers.registry import make_solver

    x, y = _test(data, cfg, cfg.n_test)
    t0 = time.perf_counter()
    solver = make_solver("fast", damping=cfg.damping, **cfg.fast).fit(model, train, weight_decay=wd)
    t_fit = time.perf_counter() - t0
    s = s_test(model, x, y, solver)
    t_s = time.perf_counter() - t0 - t_fit
    scores = influence(model, x, y, train, solver, stest=s, progress=True)
    total = time.perf_counter() - t0
    atomic_torch_save(scores.float(), out / "fast.pt")
    atomic_torch_save(solver.state_dict(), out / "fast_state.pt")  # the CG reference's preconditioner
    return {"t100_fast_s": total, "fast_fit_s": t_fit, "fast_s_test_s": t_s, "fast_scoring_s": total - t_fit - t_s,
            "fast_settings": solver.describe()}


class FactorGGN:
    """The damped GGN of a fixed training subsample, ``(R^T R / m + d I) v``, from factor rows
    R (m*C, P) computed once (the engine's :func:`ggn_factor`), float32 rows, float64 results."""

    def __init__(self, model, x, damping: float, chunk: int = 100):
        from influence_over_inference.engine.curvature import ggn_factor

        m = len(x)
        rows = None
        for start in range(0, m, chunk):
            r = ggn_factor(model, x[start : start + chunk])  # (B*C, P)
            if rows is None:
                per = r.shape[0] // len(x[start : start + chunk])
                rows = torch.empty(m * per, r.shape[1], dtype=r.dtype)
            rows[start * per : start * per + len(r)] = r
        self.rows, self.m, self.damping = rows, m, damping

    def __call__(self, v: torch.Tensor) -> torch.Tensor:  # (K, P) float64 -> (K, P) float64
        v32 = v.to(self.rows.dtype)
        return ((v32 @ self.rows.T) @ self.rows).double() / self.m + self.damping * v


def reference_pcg(apply, b: torch.Tensor, precondition, tol: float, max_iter: int):
    """Preconditioned conjugate gradient for ``A s = b`` (rows of b (K, P)), float64 recurrences.

    The answer does not depend on the preconditioner (only the number of iterations does).
    Returns ``(s, relative residuals per iteration (max over rows))``.
    """
    b = b.double()
    x = torch.zeros_like(b)
    r = b.clone()
    z = precondition(r)
    p = z.clone()
    rz = (r * z).sum(1)
    bnorm = b.norm(dim=1)
    residuals = [1.0]
    for _ in range(max_iter):
        ap = apply(p)
        alpha = rz / (p * ap).sum(1)
        x += alpha[:, None] * p
        r -= alpha[:, None] * ap
        rel = float((r.norm(dim=1) / bnorm).max())
        residuals.append(rel)
        if rel <= tol:
            break
        z = precondition(r)
        rz_new = (r * z).sum(1)
        p = z + (rz_new / rz)[:, None] * p
        rz = rz_new
    return x, residuals


def stage_cg(cfg, data, model, wd, train, out):
    """The reference: the GGN of a fixed seeded subsample of cfg.cg["n_samples"] training images
    (the engine's CGSolver subsample) + (wd + lambda) I, solved by CG to cfg.cg["tol"].

    ``cg_cached_factor``: products from the subsample's factor rows computed once, and CG
    preconditioned by the fast solver (fitted in the "fast" stage, state cached), float64
    recurrences; otherwise the engine's own CGSolver as it is.
    """
    from influence_over_inference.engine.gradients import grad_z
    from influence_over_inference.engine.scores import s_test
    from influence_over_inference.engine.solvers.registry import make_solver

    x, y = _test(data, cfg, cfg.n_agree)
    t0 = time.perf_counter()
    settings = {"curvature": cfg.curvature, "damping": cfg.damping, **cfg.cg}
    engine_cg = make_solver("cg", **settings).fit(model, train, weight_decay=wd)  # picks the subsample
    res = {"cg_settings": {**engine_cg.describe(), "cached_factor": cfg.cg_cached_factor}}
    if cfg.cg_cached_factor:
        if cfg.curvature != "ggn":
            raise ValueError("the cached-factor reference serves GGN products only")
        op = FactorGGN(model, engine_cg._x, engine_cg.total_damping)
        res["cg_fit_s"] = time.perf_counter() - t0
        fast = make_solver("fast", damping=cfg.damping, **cfg.fast)
        state = torch.load(out / "fast_state.pt", weights_only=True) if (out / "fast_state.pt").exists() else None
        fast.fit(model, train, weight_decay=wd, state=state)
        g = grad_z(model, x, y)  # (K, P)
        s, residuals = reference_pcg(op, g, lambda r: fast.inverse_hvp(r.float()).double(),
                                     cfg.cg["tol"], cfg.cg["max_iter"])
        # check: the true residual of the answer, recomputed
        true_rel = float(((op(s) - g.double()).norm(dim=1) / g.double().norm(dim=1)).max())
        res["cg_true_residual"] = true_rel
        s = s.float()
    else:
        s = s_test(model, x, y, engine_cg)
        residuals = engine_cg.residuals
    atomic_torch_save(s, out / "cg_stest.pt")
    res.update({"cg_s_test_s": time.perf_counter() - t0, "cg_iterations": len(residuals) - 1,
                "cg_final_residual": residuals[-1], "cg_residuals": residuals})
    return res


def stage_lissa(cfg, data, model, wd, train, out):
    from influence_over_inference.engine.scores import s_test
    from influence_over_inference.engine.solvers.lissa import LiSSADivergenceError
    from influence_over_inference.engine.solvers.registry import make_solver

    x, y = _test(data, cfg, cfg.n_agree)
    t0 = time.perf_counter()
    res = {}
    scale = cfg.lissa_scale
    if scale is None:  # 1.5 x the largest minibatch eigenvalue found (power iteration, 5 minibatches)
        probe = make_solver("lissa", curvature=cfg.curvature, damping=cfg.damping, batch_size=cfg.lissa_batch)
        probe.fit(model, train, weight_decay=wd)
        gen = torch.Generator().manual_seed(cfg.seed + 7)
        tops = []
        for _ in range(5):
            idx = torch.randperm(len(train), generator=gen)[: cfg.lissa_batch]
            bx, by = train.tensors(idx)
            tops.append(probe.largest_eigenvalue(bx, by, steps=20))
        scale = float(f"{1.5 * max(tops):.2g}")
        res["lissa_minibatch_top_eigenvalues"] = tops
    for _attempt in range(3):
        solver = make_solver("lissa", curvature=cfg.curvature, damping=cfg.damping, scale=scale,
                             depth=cfg.lissa_depth, batch_size=cfg.lissa_batch, seed=cfg.seed)
        solver.fit(model, train, weight_decay=wd)
        try:
            s = s_test(model, x, y, solver)
            break
        except LiSSADivergenceError as error:
            log.warning("LiSSA diverged at scale %g (%s); doubling it", scale, error)
            res.setdefault("lissa_diverged_at_scales", []).append(scale)
            scale *= 2
    else:
        raise RuntimeError("LiSSA diverged three times")
    atomic_torch_save(s, out / "lissa_stest.pt")
    return {**res, "lissa_s_test_s": time.perf_counter() - t0, "lissa_settings": solver.describe()}


def stage_score(cfg, data, model, wd, train, out):
    """Score all training images against the agreement stages' s_test vectors in one stream."""
    parts = {name: torch.load(out / f"{name}_stest.pt", weights_only=True) for name in AGREE_STAGES
             if (out / f"{name}_stest.pt").exists()}
    stacked = torch.cat(list(parts.values()))
    t0 = time.perf_counter()
    scores = _scores_for(model, stacked.to(torch.float32), train, _lissa_like(model, train, wd))
    stream_s = time.perf_counter() - t0
    start = 0
    for name, vecs in parts.items():
        atomic_torch_save(scores[start : start + len(vecs)].float(), out / f"{name}.pt")
        start += len(vecs)
    return {"stream_s": stream_s, "scored": {k: len(v) for k, v in parts.items()}}


def _kron_task():
    from kronfluence.task import Task

    class ClassificationTask(Task):
        """Summed cross-entropy; the measurement is the test loss (as our scores')."""

        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:  # the true Fisher: labels drawn from the model's own predictions
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1).flatten()
            return torch.nn.functional.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return torch.nn.functional.cross_entropy(model(x), y, reduction="sum")

    return ClassificationTask()


def kronfluence_scores(model, train_x, train_y, test_x, test_y, damping, out_dir, batch=512):
    """kronfluence EK-FAC pairwise scores (n_test, n_train) and the seconds of each phase.

    kronfluence's damping is added to its (E)K-FAC eigenvalues of the per-example Fisher; pass
    weight_decay + lambda to match our (C + wd I + lambda I). Its scores are
    ``g_test^T (F + damping I)^{-1} g_train`` without our 1/n.
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from torch.utils.data import TensorDataset

    task = _kron_task()
    kmodel = prepare_model(copy.deepcopy(model).eval(), task)
    analyzer = Analyzer("bench", kmodel, task, cpu=True, disable_tqdm=False, output_dir=str(out_dir))
    train_ds, test_ds = TensorDataset(train_x, train_y), TensorDataset(test_x, test_y)
    torch.manual_seed(0)  # kronfluence samples Fisher labels with the global RNG
    t0 = time.perf_counter()
    analyzer.fit_all_factors("ekfac", train_ds, per_device_batch_size=batch,
                             factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
    t_fit = time.perf_counter() - t0
    analyzer.compute_pairwise_scores("pairwise", "ekfac", test_ds, train_ds,
                                     per_device_query_batch_size=len(test_ds),
                                     per_device_train_batch_size=batch,
                                     score_args=ScoreArguments(damping_factor=damping),
                                     overwrite_output_dir=True)
    scores = analyzer.load_pairwise_scores("pairwise")["all_modules"]  # (n_test, n_train)
    total = time.perf_counter() - t0
    return scores.float(), {"kronfluence_fit_s": t_fit, "kronfluence_scores_s": total - t_fit, "kronfluence_t100_s": total}


def stage_kronfluence(cfg, data, model, wd, train, out):
    x, y = _test(data, cfg, cfg.n_test)
    tx, ty = train.tensors()
    scores, times = kronfluence_scores(model, tx, ty, x, y, wd + cfg.damping, out / "kronfluence", cfg.kron_batch)
    atomic_torch_save(scores, out / "kronfluence.pt")
    return {**times, "kronfluence_damping_factor": wd + cfg.damping}


def _pearson_rows(a, b):
    a = a.double() - a.double().mean(1, keepdim=True)
    b = b.double() - b.double().mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def explicit_ggn(model, x, chunk_size=200):
    """The explicit GGN (P, P) of the mean cross-entropy over ``x``: ``(1/n) sum_i R_i^T R_i`` with
    ``R_i`` the (C, P) rows ``sqrt(p_ic) grad L(x_i, label c)`` (exact for softmax cross-entropy)."""
    from influence_over_inference.engine.gradients import class_gradients

    ggn = None
    for start in range(0, len(x), chunk_size):
        _, rows = class_gradients(model, x[start : start + chunk_size])  # (B, C, P)
        rows = rows.reshape(-1, rows.shape[-1])
        part = rows.T @ rows
        ggn = part if ggn is None else ggn + part
    return ggn / len(x)


def stage_small(cfg, data, model, wd, train, out):
    from influence_over_inference.engine.curvature import curvature_products
    from influence_over_inference.engine.gradients import grad_z
    from influence_over_inference.engine.scores import influence
    from influence_over_inference.engine.solvers.registry import make_solver
    from influence_over_inference.study.model import Net, count_parameters
    from influence_over_inference.study.training import TrainConfig, evaluate
    from influence_over_inference.study.training import train as train_model

    torch.manual_seed(cfg.seed)
    tiny = Net(channels=tuple(cfg.small_channels), hidden=tuple(cfg.small_hidden))
    tc = TrainConfig(epochs=cfg.small_epochs, device="cpu", seed=cfg.seed, threads=cfg.threads)
    small_train = random_subset(data.train, cfg.small_n_train, cfg.seed)  # class-balanced, not the first n
    fit = train_model(small_train, tc, model=tiny, progress=True)
    tiny = fit.model.eval()
    acc = evaluate(tiny, data.test)["accuracy"]
    tx, ty = small_train.tensors()
    x, y = _test(data, cfg, cfg.small_n_test)
    tiny64 = copy.deepcopy(tiny).double()
    tx64, x64 = tx.double(), x.double()
    n = len(ty)
    res = {"small_params": count_parameters(tiny), "small_test_accuracy": acc, "small_n_train": n,
           "small_train_accuracy": fit.history[-1].accuracy, "small_train_loss": fit.history[-1].loss,
           "small_n_test": len(y), "small_weight_decay": tc.weight_decay, "small_reference": "explicit damped GGN"}
    t0 = time.perf_counter()
    ggn = explicit_ggn(tiny64, tx64)
    res["small_exact_ggn_s"] = time.perf_counter() - t0
    # the explicit GGN agrees with the engine's GGN-vector products (on a few columns)
    cols = torch.eye(len(ggn), dtype=torch.float64)[:: max(1, len(ggn) // 8)][:8]
    prod = curvature_products(tiny64, tx64, ty, cols, "ggn", chunk_size=250)
    res["small_ggn_vs_products_rel_diff"] = float((prod - cols @ ggn).norm() / prod.norm())
    g_test = grad_z(tiny64, x64, y)  # (K, P)
    g_train = grad_z(tiny64, tx64, ty)  # (n, P)
    fast = make_solver("fast", **cfg.fast).fit(tiny64, tx64, ty, weight_decay=tc.weight_decay)
    # also the engine's default fast settings (all 2,000 images in the factor here)
    fast_default = make_solver("fast").fit(tiny64, tx64, ty, weight_decay=tc.weight_decay)
    described = {"small_fast_settings": fast.describe(), "small_fast_default_settings": fast_default.describe()}
    per_damping = {}
    for lam in cfg.small_dampings:
        d = tc.weight_decay + lam
        exact = torch.linalg.solve(ggn + d * torch.eye(len(ggn), dtype=ggn.dtype), g_test.T).T  # (K, P)
        sc = {"exact": exact @ g_train.T / n}
        fast.settings.damping = lam
        sc["fast"] = influence(tiny64, x64, y, (tx64, ty), fast)
        fast_default.settings.damping = lam
        sc["fast_default"] = influence(tiny64, x64, y, (tx64, ty), fast_default)
        kron, _ = kronfluence_scores(tiny, tx, ty, x, y, d, out / f"kron_small_{lam}", batch=500)
        sc["kronfluence"] = kron.double() / n
        sc["grad_dot"] = g_test @ g_train.T / n
        row = {}
        for method in ("fast", "fast_default", "kronfluence", "grad_dot"):
            r = _pearson_rows(sc[method], sc["exact"])
            row[f"pearson_{method}_vs_exact"] = float(r.mean())
            row[f"pearson_{method}_vs_exact_min"] = float(r.min())
            row[f"spearman_{method}_vs_exact"] = float(_spearman_rows(sc[method], sc["exact"]).mean())
        per_damping[str(lam)] = row
    head = per_damping[str(cfg.small_dampings[0])]
    res.update({
        "pearson_fast_vs_exact_small": head["pearson_fast_vs_exact"],
        "pearson_kronfluence_vs_exact_small": head["pearson_kronfluence_vs_exact"],
        "small_by_damping": per_damping,
        **described,  # damping: the headline value; small_by_damping has the others
    })
    return res


# ----------------------------------------------------------------------------- running stages

def _key(cfg: BenchConfig, quick: bool) -> str:
    ck = ROOT / cfg.checkpoint
    blob = json.dumps({"ck": file_sha256(ck), "cfg": asdict(cfg), "quick": quick}, sort_keys=True, default=str)
    return ("quick-" if quick else "") + hashlib.sha256(blob.encode()).hexdigest()[:12]


def _cache_dir(cfg, quick) -> Path:
    d = ROOT / "data" / "bench" / _key(cfg, quick)
    d.mkdir(parents=True, exist_ok=True)
    return d


def _write_json(obj, path: Path):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    os.replace(tmp, path)


def run_stage(name: str, quick: bool) -> None:
    """The child process: compute one stage and write its JSON (with this process's peak RSS)."""
    torch.manual_seed(0)
    cfg = BenchConfig.quick() if quick else BenchConfig()
    torch.set_num_threads(cfg.threads)
    out = _cache_dir(cfg, quick)
    data, model, wd, train = _load(cfg)
    start = time.perf_counter()
    result = globals()[f"stage_{name}"](cfg, data, model, wd, train, out)
    result.update({"stage_wall_s": time.perf_counter() - start, "peak_rss_mb": _peak_rss_mb(),
                   "load_avg": os.getloadavg(), "threads": torch.get_num_threads(),
                   "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    _write_json(result, out / f"{name}.json")


def _spawn(name: str, quick: bool, out: Path, threads: int) -> dict:
    path = out / f"{name}.json"
    if path.exists():
        print(f"  {name:12s} cached ({path.relative_to(ROOT)})", flush=True)
        return json.loads(path.read_text())
    print(f"  {name:12s} running ...", flush=True)
    t0 = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name] + (["--quick"] if quick else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode != 0 or not path.exists():
        print(f"  {name:12s} FAILED (exit {proc.returncode}); see the output above", flush=True)
        return {"failed": True}
    print(f"  {name:12s} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(path.read_text())


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run on small numbers (a few minutes)")
    parser.add_argument("--fresh", action="store_true", help="recompute every stage (ignore the cache)")
    parser.add_argument("--only", nargs="+", choices=STAGES, help="run only these stages (others from cache)")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: one stage, in-process
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.stage:
        run_stage(args.stage, args.quick)
        return 0
    cfg = BenchConfig.quick() if args.quick else BenchConfig()
    out = _cache_dir(cfg, args.quick)
    print(f"benchmark ({'quick' if args.quick else 'full'}); cache {out.relative_to(ROOT)}", flush=True)
    stages = {}
    for name in STAGES:
        path = out / f"{name}.json"
        rerun = args.only and (name in args.only or (name == "score" and set(args.only) & set(AGREE_STAGES)))
        if args.fresh or rerun:
            path.unlink(missing_ok=True)
        if args.only and name not in args.only and not path.exists():
            continue
        stages[name] = _spawn(name, args.quick, out, cfg.threads)
    res = assemble(cfg, args.quick, out, stages)
    target = out / "engine.json" if args.quick else ROOT / "bench" / "results" / "engine.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_json(res, target)
    print()
    print_table(res)
    print(f"\nwrote {target.relative_to(ROOT)}")
    return 1 if res["failed_stages"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
