"""Stage ``cg``: the conjugate-gradient reference on the agreement test images."""

from __future__ import annotations

import logging
import time

import torch

from influence_over_inference.engine.io import atomic_torch_save

from .common import _test

log = logging.getLogger("bench")

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
