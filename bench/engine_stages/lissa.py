"""Stage ``lissa``: our LiSSA on the agreement test images (scale from power iteration, doubled on divergence)."""

from __future__ import annotations

import logging
import time

import torch

from influence_over_inference.engine.io import atomic_torch_save

from .common import _test

log = logging.getLogger("bench")

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
