"""Stages ``nimarb_same``, ``ours_same`` and ``nimarb_own``: nimarb's package against our LiSSA at the same settings, and nimarb at its own."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from influence_over_inference.engine.io import atomic_torch_save
from influence_over_inference.study import nimarb_reference as nr

from .common import _lissa_like, _scores_for, _test

log = logging.getLogger("bench")

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
