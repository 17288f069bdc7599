"""Stage ``fast``: our fast solver, all ``n_test x n_train`` scores, fit included."""

from __future__ import annotations

import logging
import time

from influence_over_inference.engine.io import atomic_torch_save

from .common import _test

log = logging.getLogger("bench")

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
