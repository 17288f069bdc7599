"""bench/fast_design_cnn.py: the per-fit pieces the design sweep caches rebuild the fast solver's inverse exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from engine_models import blobs, conv, fit

from influence_over_inference.engine.gradients import grad_z
from influence_over_inference.engine.solvers.fast import FastSolver

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import fast_design_cnn  # noqa: E402

WD = 1e-3


def test_the_sweeps_per_fit_pieces_rebuild_the_solvers_s_test_and_lds_predictions(tmp_path):
    """What the sweep keeps of each fit (eigenvalues, products with the basis, per-damping corrections)
    gives, averaged over fits, the solver's own inverse: a sweep row is the solver those settings make."""
    torch.manual_seed(0)
    model, (x, y) = conv(), blobs(40, (3, 8, 8), 4, seed=3)
    fit(model, x, y, WD, steps=30)
    model.eval()
    solver = FastSolver(damping=0.1, rank=12, n_samples=10, n_fits=2, rest="damping").fit(model, x, y, weight_decay=WD)
    g = grad_z(model, x[:3], y[:3])
    gs = torch.randn(2, g.shape[1], dtype=g.dtype)  # two subsets' summed training gradients
    pieces = [fast_design_cnn.fit_products(solver, 10, 0, f, g, g, gs, tmp_path) for f in range(2)]
    total = WD + 0.1
    rebuilt = g / total + sum(p["corr"]["0.1"] for p in pieces) / 2
    want = solver.inverse_hvp(g)
    assert float((rebuilt - want).norm() / want.norm()) < 1e-10
    lds_part = sum((p["a_lds"] * (1 / (p["evals"] + total) - 1 / total)) @ p["b"] for p in pieces) / 2  # (T, S)
    assert torch.allclose(lds_part, want @ gs.T - g @ gs.T / total, rtol=1e-9, atol=1e-12)
    again = fast_design_cnn.fit_products(solver, 10, 0, 1, g, g, gs, tmp_path)  # read back from its cache
    assert torch.equal(again["evals"], pieces[1]["evals"]) and torch.equal(again["corr"]["0.1"], pieces[1]["corr"]["0.1"])


def test_merged_spans_are_the_eigenpairs_of_the_fits_mean_curvature_and_the_solver_inverts_it():
    """bench/merged_spans.py: merging fits one at a time keeps the top eigenpairs of their mean low-rank
    curvature (exactly where nothing is dropped, the top ones where the rank is cut), and a fast solver given
    one merged span inverts that mean curvature plus damping (``rest="damping"``)."""
    import merged_spans

    g = torch.Generator().manual_seed(0)
    fits = []
    for _ in range(3):
        u, _ = torch.linalg.qr(torch.randn(30, 6, generator=g, dtype=torch.float64))
        fits.append((u, torch.logspace(1, -2, 6, dtype=torch.float64) * (1 + torch.rand(6, generator=g, dtype=torch.float64))))
    mean = sum(u @ torch.diag(e) @ u.T for u, e in fits) / 3
    q, lam = merged_spans.merge_spans(fits, rank=18)
    assert torch.allclose(q.T @ q, torch.eye(len(lam), dtype=q.dtype), atol=1e-12)
    assert torch.allclose(q @ torch.diag(lam) @ q.T, mean, atol=1e-12)
    top = torch.linalg.eigvalsh(mean).flip(0)
    _, cut = merged_spans.merge_spans(fits, rank=6)
    assert len(cut) == 6 and torch.allclose(cut[:3], top[:3], rtol=0.05) and bool((cut <= top[:6] + 1e-12).all())
    assert [len(e) for _, e in merged_spans.grouped(fits, 3, 6)] == [6, 6, 6]
    with pytest.raises(ValueError, match="^3 fits do not split into 2 equal groups$"):
        merged_spans.grouped(fits, 2, 6)

    torch.manual_seed(0)
    model, (x, y) = conv(), blobs(40, (3, 8, 8), 4, seed=3)
    fit(model, x, y, WD, steps=30)
    model = model.double().eval()
    solver = FastSolver(damping=0.1, rank=12, n_samples=10, n_fits=3, rest="damping").fit(model, x.double(), y, weight_decay=WD)
    fits = [(u.clone(), e.clone()) for u, e in solver.fits()]
    mean = sum(u @ torch.diag(e) @ u.T for u, e in fits) / 3
    merged_spans.set_spans(solver, merged_spans.grouped(fits, 1, rank=36))
    v = grad_z(model, x[:3].double(), y[:3])
    want = torch.linalg.solve(mean + (WD + 0.1) * torch.eye(len(mean), dtype=mean.dtype), v.T).T
    assert solver.n_fits == 1 and torch.allclose(solver.inverse_hvp(v), want, rtol=1e-8, atol=1e-12)
