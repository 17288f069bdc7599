"""Inverse-HVP solvers against exact answers (float64, tiny models, random data): the exact solver
equals a direct solve of the explicitly built Hessian/GGN, CG agrees with it, LiSSA converges
with sensible settings and fails loudly at a too-small scale, and the fast solver is exact at
full rank and close to exact on a trained tiny conv net."""

from __future__ import annotations

import pytest
import torch
from engine_models import (  # noqa: I001
    blobs,
    conv,
    dead_relu_net,
    fit,
    layer_norm_net,
    logistic,
    mlp,
    trained_conv,
)
from torch import nn

from influence_over_inference.engine.curvature import curvature_matrix, curvature_products
from influence_over_inference.engine.gradients import grad_z
from influence_over_inference.engine.params import (
    flatten_params,
    select_parameters,
    unflatten_params,
)
from influence_over_inference.engine.solvers.cg import CGSettings
from influence_over_inference.engine.solvers.fast import FastSolver
from influence_over_inference.engine.solvers.lissa import LiSSADivergenceError, LiSSASettings
from influence_over_inference.engine.solvers.registry import make_solver

EXACT_REL = 1e-8  # exact solver vs a direct solve of the explicit matrix (the bound)
CG_REL = 1e-6  # CG vs exact
LISSA_COSINE = 0.99  # LiSSA vs exact, per vector
LISSA_REL = 0.05  # LiSSA vs exact, relative error of the whole answer (cosine alone hides a factor)
WD = 1e-3


def explicit_hessian(model, x, y):
    """The Hessian (P, P) of the mean cross-entropy, by torch.autograd.functional.hessian."""
    params = select_parameters(model)

    def loss(flat):
        out = torch.func.functional_call(model, unflatten_params(flat, params), (x,))
        return nn.functional.cross_entropy(out, y)

    return torch.autograd.functional.hessian(loss, flatten_params(params))


def explicit_ggn(model, x, y):
    params = select_parameters(model)

    def logits(flat):
        return torch.func.functional_call(model, unflatten_params(flat, params), (x,))

    jac = torch.autograd.functional.jacobian(logits, flatten_params(params))  # (B, C, P)
    p = torch.softmax(model(x), dim=1)
    h_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("bcp,bcd,bdq->pq", jac, h_out, jac) / len(x)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def problem(kind, n=60, seed=0):
    torch.manual_seed(seed)
    if kind == "logistic":
        model, (x, y) = logistic(), blobs(n, (5,), 3, seed=seed)
    elif kind == "mlp":
        model, (x, y) = mlp(), blobs(n, (6,), 3, seed=seed)
    else:
        model, (x, y) = conv(), blobs(n, (3, 8, 8), 4, seed=seed)
    fit(model, x, y, WD, steps=30)
    return model.eval(), x, y


@pytest.fixture(scope="module", params=["logistic", "mlp", "conv"])
def small(request):
    model, x, y = problem(request.param)
    v = grad_z(model, x[:4], y[:4])
    return request.param, model, x, y, v


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_curvature_products_match_explicit_matrices(small, curvature):
    _, model, x, y, v = small
    reference = explicit_hessian(model, x, y) if curvature == "hessian" else explicit_ggn(model, x, y)
    assert rel(curvature_products(model, x, y, v, curvature, chunk_size=17), v @ reference) < 1e-10  # few vectors: autograd loop
    many = torch.randn(7, v.shape[1], dtype=v.dtype, generator=torch.Generator().manual_seed(0))
    assert rel(curvature_products(model, x, y, many, curvature, chunk_size=17), many @ reference) < 1e-10  # vmap / factor rows
    assert rel(curvature_matrix(model, x, y, curvature, chunk_size=25), reference) < 1e-10


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_exact_equals_direct_solve(small, curvature):
    _, model, x, y, v = small
    damping = 0.1
    c = explicit_hessian(model, x, y) if curvature == "hessian" else explicit_ggn(model, x, y)
    direct = torch.linalg.solve(c + (WD + damping) * torch.eye(len(c), dtype=c.dtype), v.T).T
    exact = make_solver("exact", curvature=curvature, damping=damping).fit(model, x, y, weight_decay=WD)
    assert rel(exact.inverse_hvp(v), direct) < EXACT_REL


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_cg_agrees_with_exact(small, curvature):
    name, model, x, y, v = small
    damping = 0.1
    exact = make_solver("exact", curvature=curvature, damping=damping).fit(model, x, y, weight_decay=WD)
    lowest = float(torch.linalg.eigvalsh(exact.matrix)[0])
    if lowest <= 0:  # an indefinite damped Hessian: CG needs positive definiteness, so damp more
        damping += -lowest + 0.05
        exact = make_solver("exact", curvature=curvature, damping=damping).fit(model, x, y, weight_decay=WD)
    cg = make_solver("cg", curvature=curvature, damping=damping, tol=1e-10, max_iter=400).fit(model, x, y, weight_decay=WD)
    assert rel(cg.inverse_hvp(v), exact.inverse_hvp(v)) < CG_REL
    assert cg.residuals[-1] <= 1e-10 < cg.residuals[0]


def test_cg_on_a_fixed_subsample_is_the_exact_solution_for_that_subsample():
    model, x, y = problem("mlp")
    v = grad_z(model, x[:3], y[:3])
    cg = make_solver("cg", damping=0.1, tol=1e-11, max_iter=300, n_samples=25, seed=3).fit(model, x, y, weight_decay=WD)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(3))[:25].sort().values
    exact = make_solver("exact", damping=0.1).fit(model, x[idx], y[idx], weight_decay=WD)
    assert rel(cg.inverse_hvp(v), exact.inverse_hvp(v)) < CG_REL


def test_lissa_converges_with_sensible_settings(small):
    _, model, x, y, v = small
    exact = make_solver("exact", damping=0.1).fit(model, x, y, weight_decay=WD)
    top = float(torch.linalg.eigvalsh(exact.matrix)[-1])
    lissa = make_solver("lissa", damping=0.1, scale=2 * top, depth=300, batch_size=30, repeat=2).fit(model, x, y, weight_decay=WD)
    got, want = lissa.inverse_hvp(v), exact.inverse_hvp(v)
    cos = nn.functional.cosine_similarity(got, want)
    assert cos.min() >= LISSA_COSINE, cos
    assert rel(got, want) < LISSA_REL


def test_lissa_at_too_small_scale_raises_divergence_error_not_nan():
    model, x, y = problem("mlp")
    v = grad_z(model, x[:2], y[:2])
    exact = make_solver("exact", damping=0.01).fit(model, x, y, weight_decay=WD)
    top = float(torch.linalg.eigvalsh(exact.matrix)[-1])
    lissa = make_solver("lissa", damping=0.01, scale=top / 20, depth=2000, batch_size=20).fit(model, x, y, weight_decay=WD)
    with pytest.raises(LiSSADivergenceError, match=r"scale=.* is too small.*Raise scale to about"):
        lissa.inverse_hvp(v)


def test_lissa_explicit_minibatches_equal_seeded_sampling():
    model, x, y = problem("logistic")
    v = grad_z(model, x[:3], y[:3])
    lissa = make_solver("lissa", damping=0.1, scale=20.0, depth=50, batch_size=10, seed=7).fit(model, x, y, weight_decay=WD)
    batches = lissa._batches(torch.Generator().manual_seed(7))
    explicit = lissa.inverse_hvp(v, batches=[next(batches) for _ in range(50)])
    assert torch.equal(explicit, lissa.inverse_hvp(v))
    with pytest.raises(ValueError, match="ran out"):
        lissa.inverse_hvp(v, batches=[(x[:10], y[:10])] * 3)


def test_lissa_paper_names():
    s = LiSSASettings.from_paper(damp=0.01, scale=25, depth=5000)
    assert s.damping == pytest.approx(0.25) and s.damp == pytest.approx(0.01)


def test_fast_solver_at_full_rank_on_all_examples_is_exact(small):
    _, model, x, y, v = small
    exact = make_solver("exact", curvature="ggn", damping=0.05).fit(model, x, y, weight_decay=WD)
    fast = make_solver("fast", rest="damping", damping=0.05, rank=10_000, n_samples=len(x), chunk_size=13).fit(model, x, y, weight_decay=WD)
    assert rel(fast.inverse_hvp(v), exact.inverse_hvp(v)) < EXACT_REL
    assert torch.allclose(fast.quadratic_form(v), (fast.inverse_hvp(v) * v).sum(1), rtol=1e-10)


def test_fast_solver_state_roundtrip():
    model, x, y = problem("mlp")
    v = grad_z(model, x[:3], y[:3])
    fast = make_solver("fast", rest="damping", damping=0.05, rank=20, n_samples=30).fit(model, x, y, weight_decay=WD)
    again = FastSolver(fast.settings).fit(model, x, y, weight_decay=WD, state=fast.state_dict())
    assert torch.equal(again.inverse_hvp(v), fast.inverse_hvp(v))


def test_fast_solver_averages_the_inverses_of_disjoint_fits(small):
    """n_fits: each fit at full rank on its own subsample is exact for that subsample's GGN, and the
    solver returns the mean of those inverses; quadratic forms (also from basis products) agree."""
    _, model, x, y, v = small
    fast = make_solver("fast", rest="damping", damping=0.05, rank=10_000, n_samples=15, n_fits=3, chunk_size=7).fit(model, x, y, weight_decay=WD)
    parts = fast.subsamples()
    assert [len(p) for p in parts] == [15, 15, 15] and len(torch.cat(parts).unique()) == 45  # disjoint
    exact = [make_solver("exact", curvature="ggn", damping=0.05).fit(model, x[p], y[p], weight_decay=WD) for p in parts]
    mean_inverse = sum(e.inverse_hvp(v) for e in exact) / len(exact)
    assert rel(fast.inverse_hvp(v), mean_inverse) < EXACT_REL
    quad = (mean_inverse * v).sum(1)
    assert rel(fast.quadratic_form(v), quad) < EXACT_REL
    assert rel(fast.quadratic_form_from_products(v @ fast.basis().T, (v * v).sum(1)), quad) < EXACT_REL
    again = FastSolver(fast.settings).fit(model, x, y, weight_decay=WD, state=fast.state_dict())
    assert torch.equal(again.inverse_hvp(v), fast.inverse_hvp(v))


@pytest.mark.parametrize("span_images, groups", [(45, [[0, 1, 2]]), (30, [[0, 1], [2]])])
def test_fast_solver_merges_fits_into_spans_that_invert_their_images_ggn(small, span_images, groups):
    """span_images: consecutive fits at full rank merged into one span are exact for the GGN of all their images
    (disjoint subsamples of equal size: the mean of theirs), and the solver averages the spans' inverses."""
    _, model, x, y, v = small
    fast = make_solver("fast", rest="damping", damping=0.05, rank=10_000, n_samples=15, n_fits=3, chunk_size=7,
                       span_images=span_images).fit(model, x, y, weight_decay=WD)
    parts = fast.subsamples()
    assert fast.span_groups(3, 15) == groups and fast.n_fits == len(groups) and fast.factor_spans == [i for i, g in enumerate(groups) for _ in g]
    exact = [make_solver("exact", curvature="ggn", damping=0.05).fit(model, x[torch.cat([parts[f] for f in g])],
                                                                       y[torch.cat([parts[f] for f in g])], weight_decay=WD)
             for g in groups]
    mean_inverse = sum(e.inverse_hvp(v) for e in exact) / len(exact)
    assert rel(fast.inverse_hvp(v), mean_inverse) < EXACT_REL
    start = 0
    for width in fast.widths:  # each span's basis orthonormal (to the rounding that 1/sqrt of eigenvalues 1e-10 of the top amplifies)
        u = fast.eigenvectors[:, start : start + width]
        start += width
        assert torch.allclose(u.T @ u, torch.eye(width, dtype=u.dtype), atol=1e-7)
    again = FastSolver(fast.settings).fit(model, x, y, weight_decay=WD, state=fast.state_dict())
    assert torch.equal(again.inverse_hvp(v), fast.inverse_hvp(v))


def test_merged_spans_keep_their_top_eigenpairs_where_the_rank_cuts():
    """``merge_span`` below full rank: the top eigenvalues of the sum of two low-rank curvatures, the basis
    rows orthonormal and the mix giving them from the two inputs' rows."""
    from influence_over_inference.engine.solvers.lowrank import merge_span

    g = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(40, 8, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(40, 8, generator=g, dtype=torch.float64))
    e1, e2 = torch.logspace(1, -3, 8, dtype=torch.float64), torch.logspace(0.5, -3, 8, dtype=torch.float64)
    total = q1 @ torch.diag(e1) @ q1.T + q2 @ torch.diag(e2) @ q2.T
    rows, lam, mix = merge_span(q1.T, e1, q2.T, e2, rank=5)
    assert torch.allclose(lam, torch.linalg.eigvalsh(total).flip(0)[:5], rtol=1e-10)
    assert torch.allclose(rows @ rows.T, torch.eye(5, dtype=rows.dtype), atol=1e-12)
    assert torch.allclose(rows, mix.T @ torch.cat([q1.T, q2.T]), atol=1e-12)
    assert torch.allclose(rows @ total @ rows.T, torch.diag(lam), atol=1e-10)


def test_fast_solver_span_setting_is_in_the_cache_key_only_where_it_merges():
    assert "span_images" not in make_solver("fast").describe()  # 0: the solver before the setting, same keys
    assert make_solver("fast", span_images=1000).describe()["span_images"] == 1000
    with pytest.raises(ValueError, match=r"^span_images must be >= 0 \(at most n_samples: one span per fit\), got -1$"):
        make_solver("fast", span_images=-1)


def test_fast_solver_lays_each_fits_basis_side_by_side_whatever_their_widths(small, monkeypatch):
    """The bases go, as rows, into one preallocated matrix in fit order; a later fit with more columns than the
    first (fewer zero eigenvalues) grows it, one with fewer leaves no unused column behind."""
    _, model, x, y, _ = small
    widths = iter([1, 3, 1])  # room for 3 after the first; the second grows it; 2 columns left unused
    made = []

    def fake_fit_one(self, idx, generator):
        k = next(widths)
        made.append((torch.rand(k, dtype=torch.float64) + 1, torch.randn(k, self.n_params, dtype=torch.float64)))  # rows
        return (*made[-1], None)

    monkeypatch.setattr(FastSolver, "_fit_one", fake_fit_one)
    fast = make_solver("fast", rest="damping", n_samples=10, n_fits=3).fit(model, x, y, weight_decay=WD)
    assert fast.n_fits == 3
    assert torch.equal(fast.eigenvalues, torch.cat([e for e, _ in made]))
    assert torch.equal(fast.eigenvectors, torch.cat([u for _, u in made]).T) and fast.basis().is_contiguous()
    fits = fast.fits()  # each fit's own columns back, in fit order
    assert [u.shape[1] for u, _ in fits] == [1, 3, 1]
    assert all(torch.equal(u, rows.T) and torch.equal(e, e0) for (u, e), (e0, rows) in zip(fits, made, strict=True))


def test_fast_basis_sums_the_classes_of_each_samples_outer_rows_before_the_products():
    """``_basis`` equals ``rows^T coef`` with the Linear-weight rows ``g[i, c] a[i]^T`` built one by
    one, for a subset of the samples and more columns than one block of 64."""
    from influence_over_inference.engine.solvers.lowrank import _basis

    gen = torch.Generator().manual_seed(0)
    m, n_classes, n_out, n_in, k = 7, 3, 4, 5, 70
    g = torch.randn(m, n_classes, n_out, generator=gen, dtype=torch.float64)
    a = torch.randn(m, n_in, generator=gen, dtype=torch.float64)
    other = torch.randn(m, n_classes, 6, generator=gen, dtype=torch.float64)
    coef = torch.randn(m * n_classes, k, generator=gen, dtype=torch.float64)
    mine = torch.tensor([1, 4, 5])
    parts = {"fc.weight": ("outer", g, a), "other": ("rows", other)}
    got = _basis(parts, coef, mine).T
    rows = torch.cat([(g[:, :, :, None] * a[:, None, None, :]).reshape(m, n_classes, -1), other], dim=2)  # (m, C, P)
    picked = (mine[:, None] * n_classes + torch.arange(n_classes)).reshape(-1)
    expected = rows.reshape(m * n_classes, -1)[picked].T @ coef[picked]
    assert got.shape == (n_out * n_in + 6, k) and got.T.is_contiguous()
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_fast_basis_products_take_the_gradients_products_with_the_basis_without_their_linear_rows():
    """``basis_products`` (a kernel against each fit's factor rows for the Linear weights, the basis rows
    for the rest) equals ``grad_z @ basis().T`` and the squared norms; self-influence is the same by
    either route; it survives the cache round trip; a fit whose factor costs more than it saves keeps none."""
    from influence_over_inference.engine.scores import self_influence

    model, x, y = problem("conv")
    fast = make_solver("fast", rest="damping", damping=0.05, rank=12, n_samples=8, n_fits=3).fit(model, x, y, weight_decay=WD)
    assert fast.basis_products_ready() and len(fast.factors) == 3
    g = grad_z(model, x[:9], y[:9])
    dots, sqnorms = fast.basis_products(x[:9], y[:9])
    assert rel(dots, g @ fast.basis().T) < EXACT_REL and rel(sqnorms, (g * g).sum(1)) < EXACT_REL
    again = FastSolver(fast.settings).fit(model, x, y, weight_decay=WD, state=fast.state_dict())
    assert torch.equal(again.basis_products(x[:9], y[:9])[0], dots)
    by_products = self_influence(model, (x, y), fast, chunk_size=7)
    fast.factors = None  # as a cache entry written before the factors were kept
    assert not fast.basis_products_ready() and fast.basis_products(x, y) is None
    assert rel(by_products, self_influence(model, (x, y), fast, chunk_size=7)) < EXACT_REL
    whole = make_solver("fast", rest="damping", damping=0.05, rank=12, n_samples=len(x)).fit(model, x, y, weight_decay=WD)
    assert whole.factors is None and "factors" not in whole.state_dict()  # 60 x 4 factor rows: the basis is cheaper


def test_fast_solver_subsamples_shrink_to_fit_a_small_training_set():
    model, x, y = problem("mlp", n=40)
    fast = make_solver("fast", rest="damping", damping=0.05, rank=20, n_samples=30, n_fits=4).fit(model, x, y, weight_decay=WD)
    assert [len(p) for p in fast.subsamples()] == [10] * 4 and fast.n_fits == 4
    whole = make_solver("fast", rest="damping", damping=0.05, rank=20, n_samples=40, n_fits=4).fit(model, x, y, weight_decay=WD)
    assert whole.n_fits == 1  # the whole set: one (exact-curvature) fit, not four identical ones


def test_fast_solver_exact_eigh_option_matches_the_full_eigendecomposition():
    model, x, y = problem("conv")
    v = grad_z(model, x[:3], y[:3])
    exact_eigh = make_solver("fast", rest="damping", damping=0.05, rank=12, n_samples=60, eigh_iters=0).fit(model, x, y, weight_decay=WD)
    evals = torch.linalg.eigvalsh(explicit_ggn(model, x, y)).flip(0)[:12]
    assert torch.allclose(exact_eigh.eigenvalues, evals, rtol=1e-8)
    randomized = make_solver("fast", rest="damping", damping=0.05, rank=12, n_samples=60, eigh_iters=1).fit(model, x, y, weight_decay=WD)
    assert rel(randomized.inverse_hvp(v), exact_eigh.inverse_hvp(v)) > 1e-6  # one iteration is visibly inexact
    assert {"n_fits", "eigh_iters"} <= set(exact_eigh.describe())  # part of every cache key


def test_solver_errors_are_clear():
    model, x, y = problem("logistic")
    with pytest.raises(ValueError, match="unknown solver 'newton'"):
        make_solver("newton")
    with pytest.raises(ValueError, match="no setting"):
        make_solver("cg", depth=3)
    with pytest.raises(ValueError, match="curvature"):
        make_solver("exact", curvature="fisher")
    with pytest.raises(ValueError, match="damping"):
        CGSettings(damping=-1)
    with pytest.raises(ValueError, match="scale"):
        LiSSASettings(scale=0)
    solver = make_solver("exact")
    with pytest.raises(RuntimeError, match="call fit"):
        solver.inverse_hvp(torch.zeros(1, 18, dtype=torch.float64))
    solver.fit(model, x, y, weight_decay=WD)
    with pytest.raises(ValueError, match=r"shape \(K, 18\)"):
        solver.inverse_hvp(torch.zeros(2, 17, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        solver.inverse_hvp(torch.full((1, 18), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="weight_decay"):
        make_solver("exact").fit(model, x, y, weight_decay=-1.0)


FAST_PEARSON = 0.97  # fast vs exact GGN influence, trained tiny conv net (measured 0.99+, see below)
FAST_SPEARMAN = 0.95


def _rowwise_pearson(a, b):
    return torch.stack([torch.corrcoef(torch.stack([u, v]))[0, 1] for u, v in zip(a, b, strict=True)])


def test_fast_solver_scores_track_exact_on_a_trained_conv_net():
    """A tiny conv net trained to convergence (curvature matters: the gradient dot product scores
    poorly here), the fast solver fitted on all its training images at rank 150 of 350.

    This checks the low-rank-plus-damping algebra on a trained net. Fitted on a subsample (100
    of 300 images) the same net gives Pearson ~0.5 only: the fast solver's accuracy depends on
    how well ``n_samples`` images cover the curvature (measured on the CIFAR-trained
    3,702-parameter LeNet in bench/fast_design.py, and against CG on the real model in bench/engine.py).
    """
    from influence_over_inference.engine.scores import influence

    model, x, y = trained_conv(n=300, seed=0, weight_decay=WD)
    xt, yt = blobs(10, (3, 8, 8), 4, seed=9, noise=2.0)
    damping = 0.01
    exact = make_solver("exact", curvature="ggn", damping=damping).fit(model, x, y, weight_decay=WD)
    fast = make_solver("fast", rest="damping", damping=damping, rank=150, n_samples=len(x)).fit(model, x, y, weight_decay=WD)
    reference = influence(model, xt, yt, (x, y), exact)
    scores = influence(model, xt, yt, (x, y), fast)
    rank = lambda t: t.argsort(1).argsort(1).double()  # noqa: E731
    pearson = _rowwise_pearson(scores, reference)
    spearman = _rowwise_pearson(rank(scores), rank(reference))
    g_test, g_train = grad_z(model, xt, yt), grad_z(model, x, y)
    dot = _rowwise_pearson(g_test @ g_train.T, reference)
    print(f"fast vs exact: Pearson {pearson.mean():.4f} (min {pearson.min():.4f}), Spearman {spearman.mean():.4f}; "
          f"gradient dot product: Pearson {dot.mean():.4f}")
    assert pearson.mean() >= FAST_PEARSON and spearman.mean() >= FAST_SPEARMAN
    assert dot.mean() < 0.8  # curvature matters on this net


def test_fast_solver_on_a_model_without_the_hook_path_is_exact_at_full_rank():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).to(torch.float64)
    x, y = blobs(30, (6,), 3, seed=0)
    fit(model, x, y, WD, steps=30)
    v = grad_z(model, x[:3], y[:3])
    exact = make_solver("exact", damping=0.05).fit(model, x, y, weight_decay=WD)
    fast = make_solver("fast", rest="damping", damping=0.05, rank=1000, n_samples=30).fit(model, x, y, weight_decay=WD)
    assert rel(fast.inverse_hvp(v), exact.inverse_hvp(v)) < EXACT_REL


def test_randomized_top_eigenpairs_match_eigh():
    from influence_over_inference.engine.solvers.lowrank import top_eigh

    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(300, 300, generator=gen, dtype=torch.float64))
    spectrum = 10.0 ** torch.linspace(2, -6, 300, dtype=torch.float64)  # fast decay, like a GGN's
    matrix = (q * spectrum) @ q.T
    evals, evecs = top_eigh(matrix, 40, torch.Generator().manual_seed(1))
    assert torch.allclose(evals[:20], spectrum[:20], rtol=1e-6)
    projector = evecs[:, :20] @ evecs[:, :20].T
    assert torch.allclose(projector, q[:, :20] @ q[:, :20].T, atol=1e-4)


def test_fast_state_loads_in_the_models_dtype_and_without_n_fits_means_one_fit():
    """A cached fit serves a model of another dtype (the cache holds what the fit made) and a state written
    before ``n_fits`` was stored is one fit."""
    import copy

    torch.manual_seed(0)
    x, y = blobs(40, (6,), 3, seed=11)
    model = fit(mlp(), x, y, WD, steps=30)
    one = FastSolver(rest="damping", damping=0.1, rank=15, n_samples=20, n_fits=1).fit(model, x, y, weight_decay=WD)
    v = torch.randn(2, one.n_params, dtype=torch.float64)
    legacy = {k: t for k, t in one.state_dict().items() if k != "n_fits"}
    again = FastSolver(one.settings).fit(model, x, y, weight_decay=WD, state=legacy)
    assert again.n_fits == 1
    assert torch.allclose(again.inverse_hvp(v), one.inverse_hvp(v), rtol=1e-12, atol=0)
    model32 = copy.deepcopy(model).float()
    served = FastSolver(one.settings).fit(model32, x.float(), y, weight_decay=WD, state=one.state_dict())
    assert served.eigenvalues.dtype == served.eigenvectors.dtype == torch.float32
    assert served.inverse_hvp(v.float()).dtype == torch.float32


def test_cg_holds_the_ggn_factor_exactly_when_it_fits_its_memory_cap():
    """The factor (n C P floats) is kept when its size is at most ``max_factor_mb`` (each iteration is then two
    matmuls), also for chosen layers of a model the hooks cannot take whole; else products are streamed."""
    torch.manual_seed(0)
    x, y = blobs(30, (6,), 3, seed=12)
    model = fit(layer_norm_net(), x, y, WD, steps=30)
    layers = ["1", "4"]  # the two Linear layers
    p = sum(t.numel() for n, t in model.named_parameters() if n.split(".")[0] in layers)
    size_mb = 30 * 3 * p * 8 / 2**20
    v = torch.randn(2, p, dtype=torch.float64)
    exact = make_solver("exact", damping=0.1).fit(model, x, y, weight_decay=WD, layers=layers).inverse_hvp(v)
    for cap, held in ((size_mb, True), (size_mb * (1 - 1e-9), False)):
        cg = make_solver("cg", damping=0.1, tol=1e-12, max_iter=200, max_factor_mb=cap).fit(model, x, y, weight_decay=WD, layers=layers)
        assert cg.residuals == []  # nothing solved yet
        assert (cg._factor is not None) == held
        if held:
            assert cg._factor.shape == (30 * 3, p)
        assert torch.allclose(cg.inverse_hvp(v), exact, rtol=1e-8, atol=1e-10)
    streamed = make_solver("cg", curvature="hessian", damping=0.1, max_factor_mb=1e9).fit(model, x, y, weight_decay=WD, layers=layers)
    assert streamed._factor is None  # only the GGN has a factor


def test_logits_jacobian_of_chosen_layers_and_its_input_check():
    from influence_over_inference.engine.gradients import logits_jacobian

    torch.manual_seed(0)
    model = mlp().eval()
    x, _ = blobs(4, (6,), 3, seed=13)
    named = dict(model.named_parameters())
    logits, jac = logits_jacobian(model, x, layers=["3"])
    assert torch.allclose(logits, model(x), atol=1e-12, rtol=0)
    for b in range(4):
        for c in range(3):
            rows = torch.autograd.grad(model(x[b : b + 1])[0, c], [named["3.weight"], named["3.bias"]])
            assert torch.allclose(jac[b, c], torch.cat([r.reshape(-1) for r in rows]), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match=r"^logits_jacobian: expected a batch"):
        logits_jacobian(model, x[0, 0])


def test_cg_warns_once_naming_the_curvature_when_it_meets_zero_curvature(caplog):
    torch.manual_seed(0)
    x, y = blobs(20, (6,), 3, seed=14)
    model = dead_relu_net(dead=1)
    cg = make_solver("cg", curvature="hessian", damping=0.0, max_iter=3).fit(model, x, y, weight_decay=0.0)
    b = torch.zeros(1, cg.n_params, dtype=torch.float64)
    b[0, 6 * 5 + 5] = 1.0  # the second Linear's weight from the dead unit
    with caplog.at_level("WARNING"):
        out = cg.inverse_hvp(b)
    warned = [r.getMessage() for r in caplog.records if "non-positive curvature" in r.getMessage()]
    assert warned == ["CG met a direction of non-positive curvature at iteration 0: the damped hessian is "
                      "indefinite; raise damping or use curvature='ggn'"]
    assert torch.isfinite(out).all()  # no division by the zero curvature


def test_cg_is_silent_on_a_positive_definite_problem_and_solves_tiny_and_float32_vectors(caplog):
    """No warning when every direction has positive curvature; the tolerance is relative (a vector of norm
    1e-8 is solved like any other); a float32 model gets float32 rows and products in its dtype."""
    import copy

    torch.manual_seed(0)
    x, y = blobs(30, (6,), 3, seed=15)
    model = fit(mlp(), x, y, WD, steps=30)
    exact = make_solver("exact", damping=0.1).fit(model, x, y, weight_decay=WD)
    v = torch.randn(2, exact.n_params, dtype=torch.float64)
    for max_factor_mb in (2048.0, 0.0):  # the held factor and the streamed products
        cg = make_solver("cg", damping=0.1, tol=1e-10, max_iter=300, max_factor_mb=max_factor_mb).fit(model, x, y, weight_decay=WD)
        with caplog.at_level("WARNING"):
            tiny = cg.inverse_hvp(1e-8 * v)
        assert not [r for r in caplog.records if r.levelname == "WARNING"]
        assert torch.allclose(tiny, 1e-8 * exact.inverse_hvp(v), rtol=1e-7, atol=0)
        assert cg.apply(v.float()).dtype == torch.float32  # rows come back in the caller's dtype
        model32 = copy.deepcopy(model).float()
        cg32 = make_solver("cg", curvature="hessian", damping=0.1, tol=1e-6, max_iter=300, max_factor_mb=max_factor_mb
                           ).fit(model32, x.float(), y, weight_decay=WD)
        out32 = cg32.inverse_hvp(v.float())
        assert out32.dtype == torch.float32
        hess = make_solver("exact", curvature="hessian", damping=0.1).fit(model, x, y, weight_decay=WD).inverse_hvp(v)
        assert torch.allclose(out32.double(), hess, rtol=1e-3, atol=1e-4)


def test_fast_subsamples_are_disjoint_down_to_one_example_and_too_few_examples_say_so(caplog):
    torch.manual_seed(0)
    x, y = blobs(5, (6,), 3, seed=16)
    model = mlp().eval()
    with caplog.at_level("WARNING"):
        solver = FastSolver(rest="damping", damping=0.1, rank=3, n_samples=3, n_fits=4).fit(model, x, y, weight_decay=WD)
    subs = solver.subsamples()
    assert [len(s) for s in subs] == [1, 1, 1, 1] and len(set(torch.cat(subs).tolist())) == 4
    assert [r.getMessage() for r in caplog.records] == [
        "fast solver: 5 training examples hold 4 disjoint subsamples of 1, not 3"] * 2  # fit, then the call above
    caplog.clear()
    with caplog.at_level("WARNING"):
        FastSolver(rest="damping", damping=0.1, rank=3, n_samples=2, n_fits=2).fit(model, x[:4], y[:4], weight_decay=WD)
    assert caplog.records == []  # 4 examples hold 2 subsamples of 2: nothing to warn about
    with pytest.raises(ValueError, match=r"^n_fits=8 disjoint subsamples need at least 8 training examples, got 5$"):
        FastSolver(rest="damping", damping=0.1, rank=3, n_samples=3, n_fits=8).fit(model, x, y, weight_decay=WD)


def test_fast_fit_is_seeded_and_needs_positive_total_damping():
    torch.manual_seed(0)
    x, y = blobs(40, (6,), 3, seed=17)
    model = fit(mlp(), x, y, WD, steps=30)
    fits = []
    for global_seed in (1, 2):  # the randomized eigensolver draws from the solver's seed, not the global generator
        torch.manual_seed(global_seed)
        fits.append(FastSolver(rest="damping", damping=0.1, rank=8, n_samples=10, n_fits=3, eigh_iters=1).fit(model, x, y, weight_decay=WD))
    assert torch.equal(fits[0].eigenvalues, fits[1].eigenvalues) and torch.equal(fits[0].eigenvectors, fits[1].eigenvectors)
    undamped = FastSolver(rest="damping", damping=0.0, rank=8, n_samples=10, n_fits=1).fit(model, x, y, weight_decay=0.0)
    with pytest.raises(ValueError, match=r"^the fast solver needs weight_decay \+ damping > 0 \(the rest of the spectrum is treated as 0\)$"):
        undamped.inverse_hvp(torch.ones(1, undamped.n_params, dtype=torch.float64))


def test_fast_with_more_factor_rows_than_parameters_drops_the_null_eigenvalues():
    """60 factor rows of an 18-parameter model: the Gram matrix has rank <= 18, and its numerically zero
    eigenvalues must not enter the basis (1 / sqrt(e) would blow rounding noise up)."""
    torch.manual_seed(0)
    x, y = blobs(20, (5,), 3, seed=18)
    model = fit(logistic(), x, y, WD, steps=50)
    fast = FastSolver(rest="damping", damping=0.1, rank=60, n_samples=20, eigh_iters=0).fit(model, x, y, weight_decay=WD)
    assert len(fast.eigenvalues) <= 18
    exact = make_solver("exact", damping=0.1).fit(model, x, y, weight_decay=WD)
    v = torch.randn(3, 18, dtype=torch.float64)
    assert torch.allclose(fast.inverse_hvp(v), exact.inverse_hvp(v), rtol=1e-8, atol=1e-10)


def test_fast_on_a_layer_without_curvature_is_the_damped_identity():
    """Every hidden unit dead: the first layer's GGN is exactly zero, no eigenpair survives, and the inverse
    is ``v / (weight_decay + damping)``."""
    torch.manual_seed(0)
    x, y = blobs(20, (6,), 3, seed=19)
    dead = dead_relu_net(h=4)
    fast = FastSolver(rest="damping", damping=0.1, rank=5, n_samples=10, n_fits=2).fit(dead, x, y, weight_decay=WD, layers=["1"])
    assert fast.eigenvalues.shape == (0,) and fast.eigenvectors.shape == (28, 0)
    v = torch.randn(2, 28, dtype=torch.float64)
    assert torch.allclose(fast.inverse_hvp(v), v / (WD + 0.1), rtol=1e-14, atol=0)


def test_top_eigh_is_a_full_eigh_up_to_a_third_of_the_size_and_seeded_beyond():
    from influence_over_inference.engine.solvers.lowrank import top_eigh

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(61, 61, generator=gen, dtype=torch.float64)
    matrix = a @ a.T / 61  # PSD, slowly decaying spectrum: 4 subspace iterations are not exact
    full = torch.linalg.eigvalsh(matrix[:60, :60]).flip(0)[:20]
    evals, evecs = top_eigh(matrix[:60, :60], 20, torch.Generator().manual_seed(1))
    assert torch.allclose(evals, full, rtol=1e-12, atol=0)  # rank 20 of 60: a third, the full eigh
    assert torch.allclose(evecs.T @ matrix[:60, :60] @ evecs, torch.diag(full), atol=1e-12)
    approx, _ = top_eigh(matrix, 20, torch.Generator().manual_seed(1))  # rank 20 of 61: randomized
    again, _ = top_eigh(matrix, 20, torch.Generator().manual_seed(1))
    exact61 = torch.linalg.eigvalsh(matrix).flip(0)[:20]
    assert torch.equal(approx, again) and not torch.allclose(approx, exact61, rtol=1e-9, atol=0)
    assert torch.allclose(approx, exact61, rtol=0.2, atol=0)
    # 3 * 20 < 70 <= 4 * 20: randomized too
    b = torch.randn(70, 70, generator=gen, dtype=torch.float64)
    m70 = b @ b.T / 70
    assert not torch.allclose(top_eigh(m70, 20, torch.Generator().manual_seed(1))[0],
                              torch.linalg.eigvalsh(m70).flip(0)[:20], rtol=1e-9, atol=0)


def test_fast_settings_accept_one_and_refuse_zero_with_a_message_that_says_what_to_set():
    from influence_over_inference.engine.solvers.fast import FastSettings

    FastSettings(rank=1, n_samples=1, chunk_size=1, n_fits=1, eigh_iters=0)  # the smallest valid settings
    for field in ("rank", "n_samples", "chunk_size", "n_fits"):
        with pytest.raises(ValueError, match=r"^rank, n_samples, n_fits and chunk_size must be >= 1$"):
            FastSettings(**{field: 0})
    with pytest.raises(ValueError, match=r"^eigh_iters must be >= 0 \(0 = exact eigh\), got -1$"):
        FastSettings(eigh_iters=-1)
    with pytest.raises(ValueError, match=r"^the fast solver uses the Gauss-Newton curvature; set curvature='ggn'$"):
        FastSettings(curvature="hessian")


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_curvature_of_chosen_layers_is_the_block_of_the_full_matrix(curvature):
    """Few vectors (the autograd loop), many (vmap or factor rows) and the explicit matrix, for layers chosen;
    the default curvature is the GGN."""
    model, x, y = problem("mlp")
    full = explicit_hessian(model, x, y) if curvature == "hessian" else explicit_ggn(model, x, y)
    n1 = sum(t.numel() for n, t in model.named_parameters() if n.startswith("1."))
    block = full[n1:, n1:]  # the second Linear ("3")
    for k in (2, 9):
        v = torch.randn(k, block.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(k))
        assert rel(curvature_products(model, x, y, v, curvature, layers=["3"], chunk_size=17), v @ block) < 1e-10
    assert rel(curvature_matrix(model, x, y, curvature, layers=["3"], chunk_size=25), block) < 1e-10
    if curvature == "ggn":
        assert rel(curvature_matrix(model, x, y), full) < 1e-10


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_curvature_products_on_a_model_the_hooks_cannot_take(curvature):
    """A LayerNorm net: the GGN goes through jvp / vjp (no factor rows), for all parameters and for layers."""
    torch.manual_seed(0)
    x, y = blobs(23, (6,), 3, seed=20)
    model = fit(layer_norm_net(), x, y, WD, steps=30).eval()
    full = explicit_hessian(model, x, y) if curvature == "hessian" else explicit_ggn(model, x, y)
    many = torch.randn(6, full.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert rel(curvature_products(model, x, y, many, curvature, chunk_size=10), many @ full) < 1e-10
    n1 = 6 * 5 + 5
    block = full[n1 : n1 + 10, n1 : n1 + 10]  # the LayerNorm ("2")
    assert rel(curvature_products(model, x, y, many[:, :10], curvature, layers=["2"], chunk_size=10), many[:, :10] @ block) < 1e-10
    if curvature == "ggn":
        assert rel(curvature_products(model, x, y, many), many @ full) < 1e-10  # the default curvature


def test_unknown_curvature_names_the_choices():
    model, x, y = problem("logistic")
    with pytest.raises(ValueError, match=r"^curvature must be one of \('ggn', 'hessian'\), got 'fisher'$"):
        curvature_products(model, x, y, torch.zeros(1, 18, dtype=torch.float64), "fisher")


@pytest.mark.parametrize("layers", [None, ["2", "4"]])
def test_fast_on_a_model_the_hooks_cannot_take_equals_exact_at_full_rank(layers, caplog, capsys):
    """The per-class gradient rows route (a LayerNorm net): one fit on all examples at full rank is the exact
    damped GGN inverse; its progress bar counts chunks, and is silent unless asked."""
    torch.manual_seed(0)
    x, y = blobs(12, (6,), 3, seed=25)
    model = fit(layer_norm_net(), x, y, WD, steps=30).eval()
    fast = FastSolver(rest="damping", damping=0.1, rank=36, n_samples=12, eigh_iters=0, chunk_size=5).fit(model, x, y, weight_decay=WD, layers=layers)
    assert capsys.readouterr().err == ""
    exact = make_solver("exact", damping=0.1).fit(model, x, y, weight_decay=WD, layers=layers)
    v = torch.randn(2, exact.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(fast.inverse_hvp(v), exact.inverse_hvp(v), rtol=1e-8, atol=1e-10)
    FastSolver(rest="damping", damping=0.1, rank=36, n_samples=12, chunk_size=5).fit(model, x, y, weight_decay=WD, layers=layers, progress=True)
    err = capsys.readouterr().err
    assert "fast solver: GGN factor" in err and "chunk" in err


def test_cg_says_when_it_holds_the_factor(caplog):
    model, x, y = problem("mlp")
    with caplog.at_level("INFO", logger="influence_over_inference.engine.solvers.cg"):
        make_solver("cg", damping=0.1).fit(model, x, y, weight_decay=WD)
    size = len(x) * 3 * sum(p.numel() for p in model.parameters()) * 8 / 2**20
    assert [r.getMessage() for r in caplog.records] == [f"CG holds the GGN factor of {len(x)} examples ({size:.0f} MB)"]
