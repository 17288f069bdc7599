"""The EK-FAC solver against exact answers (float64, tiny models): exact where the Gauss-Newton block is a
Kronecker product, its eigenvalues the explicit GGN's diagonal in its eigenbasis, its inverse the explicit
block-diagonal matrix's, sampled labels the expected ones in the mean, independent of the chunking."""

from __future__ import annotations

import pytest
import torch
from engine_models import blobs, dead_relu_net, layer_norm_net, logistic, trained_conv
from test_solvers import WD, explicit_ggn, problem, rel

from influence_over_inference.engine.gradients import grad_z
from influence_over_inference.engine.params import select_parameters
from influence_over_inference.engine.solvers.ekfac import EKFACSettings
from influence_over_inference.engine.solvers.registry import make_solver

EXACT_REL = 1e-8  # where EK-FAC is exact, and against its own explicit matrix
SAMPLED_REL = 0.05  # sampled labels on 400 copies of each image against the expected labels
DAMPING = 0.1


def _layer_index(model, layers=None) -> dict[str, torch.Tensor]:
    """Per layer, the flat positions of its (out, in [+1]) matrix entries: weight columns, then the bias."""
    params = select_parameters(model, layers)
    offsets, start = {}, 0
    for name, p in params.items():
        offsets[name] = torch.arange(start, start + p.numel())
        start += p.numel()
    out = {}
    for name, p in params.items():
        m, _, attr = name.rpartition(".")
        if attr == "weight":
            w = offsets[name].reshape(p.shape[0], -1)
            b = offsets.get(f"{m}.bias")
            out[m] = w if b is None else torch.cat([w, b[:, None]], dim=1)
    return out


def _explicit_ekfac(solver, model) -> torch.Tensor:
    """The solver's curvature as an explicit (P, P) matrix: per layer ``(Q_S (x) Q_A) diag(Lambda) (Q_S (x) Q_A)^T``."""
    index = _layer_index(model)
    p = sum(len(i.reshape(-1)) for i in index.values())
    matrix = torch.zeros(p, p, dtype=torch.float64)
    for m, idx in index.items():
        q = torch.kron(solver.q_s[m], solver.q_a[m])  # rows: (out, in) entries row-major
        flat = idx.reshape(-1)
        matrix[flat[:, None], flat[None, :]] = q @ torch.diag(solver.eigenvalues[m].reshape(-1)) @ q.T
    return matrix


def test_ekfac_is_exact_for_one_linear_layer_and_one_example():
    """One example's GGN block of a Linear layer is ``(sum_c p_c d_c d_c^T) (x) (a a^T)``: a Kronecker product."""
    torch.manual_seed(0)
    model = logistic()
    x, y = blobs(1, (5,), 3)
    v = torch.randn(4, 18, dtype=torch.float64)
    exact = make_solver("exact", curvature="ggn", damping=DAMPING).fit(model, x, y, weight_decay=WD)
    ekfac = make_solver("ekfac", labels="expected", damping=DAMPING).fit(model, x, y, weight_decay=WD)
    assert rel(ekfac.inverse_hvp(v), exact.inverse_hvp(v)) < EXACT_REL


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_ekfac_eigenvalues_are_the_explicit_ggns_diagonal_in_its_eigenbasis(kind):
    model, x, y = problem(kind)
    solver = make_solver("ekfac", labels="expected", chunk_size=13).fit(model, x, y, weight_decay=WD)
    ggn = explicit_ggn(model, x, y)
    for m, idx in _layer_index(model).items():
        flat = idx.reshape(-1)
        q = torch.kron(solver.q_s[m], solver.q_a[m])
        diagonal = torch.diagonal(q.T @ ggn[flat[:, None], flat[None, :]] @ q)
        assert rel(solver.eigenvalues[m].reshape(-1), diagonal) < EXACT_REL, m


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_ekfac_bases_diagonalise_the_layers_input_and_output_gradient_covariances(kind):
    """Q_A and Q_S against covariances built by a plain loop over examples (and, for a convolution, positions)."""
    model, x, y = problem(kind)
    solver = make_solver("ekfac", labels="expected").fit(model, x, y, weight_decay=WD)
    inputs = {}
    modules = dict(model.named_modules())
    hooks = [modules[m].register_forward_hook(lambda mod, a, out, m=m: inputs.__setitem__(m, (a[0], out)))
             for m in solver.blocks]
    logits = model(x)
    for h in hooks:
        h.remove()
    p = torch.softmax(logits, 1).detach()
    for m, (module, _) in solver.blocks.items():
        a, out = inputs[m]
        s = 0
        for c in range(p.shape[1]):
            cot = (p - torch.eye(p.shape[1], dtype=p.dtype)[c]) * p[:, c : c + 1].sqrt()
            (d,) = torch.autograd.grad(logits, out, cot, retain_graph=True)
            d = d.flatten(2).transpose(1, 2) if d.ndim == 4 else d[:, None]
            s = s + torch.einsum("bto,btp->op", d, d)
        if isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            rows = [torch.cat([a[b, :, i : i + kh, j : j + kw].reshape(-1), a.new_ones(1)])
                    for b in range(len(a)) for i in range(a.shape[2] - kh + 1) for j in range(a.shape[3] - kw + 1)]
        else:
            rows = [torch.cat([a[b], a.new_ones(1)]) for b in range(len(a))]
        rows = torch.stack(rows)
        for cov, q in ((rows.T @ rows, solver.q_a[m]), (s, solver.q_s[m])):
            rotated = q.T @ cov @ q
            off = rotated - torch.diag(torch.diagonal(rotated))
            assert float(off.norm() / cov.norm()) < EXACT_REL, m


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_ekfac_inverse_is_the_explicit_block_diagonal_matrixs(kind):
    model, x, y = problem(kind)
    solver = make_solver("ekfac", damping=DAMPING).fit(model, x, y, weight_decay=WD)
    v = grad_z(model, x[:5], y[:5])
    matrix = _explicit_ekfac(solver, model)
    direct = torch.linalg.solve(matrix + (WD + DAMPING) * torch.eye(len(matrix), dtype=matrix.dtype), v.T).T
    assert rel(solver.inverse_hvp(v), direct) < EXACT_REL
    assert rel(solver.quadratic_form(v), (direct * v).sum(1)) < EXACT_REL
    assert rel(solver.inverse_gram(v), direct @ v.T) < EXACT_REL  # V H^{-1} V^T without the rotation back


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2), ((2, 1), (0, 1), (1, 2))])
def test_ekfac_input_factor_of_a_convolution_is_unfolds(stride, padding, dilation):
    """The strided-view patches (one matrix product) against ``unfold``'s, with the bias's row and column."""
    from influence_over_inference.engine.solvers.ekfac import _input_cov

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, (3, 2), stride=stride, padding=padding, dilation=dilation).double()
    a = torch.randn(5, 3, 9, 8, dtype=torch.float64)
    patches = torch.nn.functional.unfold(a, conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                                         stride=conv.stride).transpose(1, 2).reshape(-1, 18)  # (B T, Cin kh kw)
    rows = torch.cat([patches, patches.new_ones(len(patches), 1)], 1)
    assert rel(_input_cov(conv, a, True, True), rows.T @ rows) < 1e-12
    assert rel(_input_cov(conv, a, True, False), patches.T @ patches) < 1e-12


def test_ekfac_of_chosen_layers_and_of_a_bias_alone():
    model, x, y = problem("conv")
    for layers in (["fc2"], ["conv1.bias", "fc1.weight"]):
        solver = make_solver("ekfac", labels="expected", damping=DAMPING).fit(model, x, y, weight_decay=WD, layers=layers)
        v = grad_z(model, x[:3], y[:3], layers=layers)
        assert solver.inverse_hvp(v).shape == v.shape
        assert torch.isfinite(solver.inverse_hvp(v)).all()
    one = make_solver("ekfac", labels="expected", damping=DAMPING).fit(model, x[:1], y[:1], weight_decay=WD, layers=["fc2"])
    exact = make_solver("exact", curvature="ggn", damping=DAMPING).fit(model, x[:1], y[:1], weight_decay=WD, layers=["fc2"])
    v = grad_z(model, x[:3], y[:3], layers=["fc2"])
    assert rel(one.inverse_hvp(v), exact.inverse_hvp(v)) < EXACT_REL  # one Linear layer, one example: exact


def test_ekfac_sampled_labels_estimate_the_expected_ones_whatever_the_chunking():
    model, x, y = problem("mlp")
    many_x, many_y = x.repeat(400, 1), y.repeat(400)
    v = grad_z(model, x[:4], y[:4])
    expected = make_solver("ekfac", labels="expected", damping=DAMPING).fit(model, x, y, weight_decay=WD)
    sampled = make_solver("ekfac", damping=DAMPING, chunk_size=1000).fit(model, many_x, many_y, weight_decay=WD)
    assert rel(sampled.inverse_hvp(v), expected.inverse_hvp(v)) < SAMPLED_REL
    rechunked = make_solver("ekfac", damping=DAMPING, chunk_size=333).fit(model, many_x, many_y, weight_decay=WD)
    assert rel(rechunked.inverse_hvp(v), sampled.inverse_hvp(v)) < 1e-10  # the same labels in any chunking
    other_seed = make_solver("ekfac", damping=DAMPING, chunk_size=1000, seed=1).fit(model, many_x, many_y, weight_decay=WD)
    assert rel(other_seed.inverse_hvp(v), sampled.inverse_hvp(v)) > 1e-6  # the seed draws other labels


def test_ekfac_state_roundtrip_and_subsample():
    model, x, y = problem("conv")
    solver = make_solver("ekfac", n_samples=30, damping=DAMPING).fit(model, x, y, weight_decay=WD)
    again = make_solver("ekfac", n_samples=30, damping=DAMPING).fit(model, x, y, weight_decay=WD, state=solver.state_dict())
    v = grad_z(model, x[:3], y[:3])
    assert torch.equal(again.inverse_hvp(v), solver.inverse_hvp(v))
    subset = make_solver("ekfac", damping=DAMPING).fit(model, x[solver_subsample(30, len(x))], y[solver_subsample(30, len(x))],
                                                        weight_decay=WD)
    assert rel(subset.q_a["conv1"].abs(), solver.q_a["conv1"].abs()) < 1e-6  # the same 30 images' factors


def solver_subsample(n: int, n_train: int, seed: int = 0) -> torch.Tensor:
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def test_ekfac_scores_track_exact_on_a_trained_conv_net_better_than_the_gradient_dot_product():
    """On the tiny trained conv net EK-FAC (block-diagonal, Kronecker-factored) tracks the explicit damped GGN
    at Pearson ~0.73 (min ~0.62): the cost of leaving out the cross-layer blocks, which the fast solver keeps
    (0.99 there at full rank), and still well above the identity curvature."""
    from test_solvers import _rowwise_pearson

    from influence_over_inference.engine.scores import influence

    model, x, y = trained_conv(n=300, seed=0, weight_decay=WD)
    xt, yt = blobs(10, (3, 8, 8), 4, seed=9, noise=2.0)
    exact = make_solver("exact", curvature="ggn", damping=DAMPING).fit(model, x, y, weight_decay=WD)
    ekfac = make_solver("ekfac", labels="expected", damping=DAMPING).fit(model, x, y, weight_decay=WD)
    reference = influence(model, xt, yt, (x, y), exact)
    pearson = _rowwise_pearson(influence(model, xt, yt, (x, y), ekfac), reference)
    dot = _rowwise_pearson(grad_z(model, xt, yt) @ grad_z(model, x, y).T, reference)
    print(f"ekfac vs exact on the trained tiny conv net: Pearson {pearson.mean():.4f} (min {pearson.min():.4f}); "
          f"gradient dot product {dot.mean():.4f}")
    assert pearson.mean() >= 0.7
    assert pearson.mean() > dot.mean() + 0.1


def test_ekfac_errors_say_what_to_do():
    model, x, y = problem("mlp")
    with pytest.raises(ValueError, match="Linear and nn.Conv2d"):
        make_solver("ekfac").fit(layer_norm_net(), x, y)
    with pytest.raises(ValueError, match="labels must be one of"):
        EKFACSettings(labels="true")
    with pytest.raises(ValueError, match="curvature='ggn'"):
        EKFACSettings(curvature="hessian")
    with pytest.raises(ValueError, match="n_samples"):
        EKFACSettings(n_samples=0)
    dead = dead_relu_net()  # no hidden unit fires: zero curvature on the second layer's weights
    xd, yd = blobs(20, (6,), 3)
    solver = make_solver("ekfac", damping=0.0).fit(dead, xd, yd, weight_decay=0.0)
    with pytest.raises(ValueError, match="weight_decay \\+ damping > 0"):
        solver.inverse_hvp(grad_z(dead, xd[:2], yd[:2]))


# -- the fast solver with EK-FAC for the rest of the spectrum (FastSettings.rest = "ekfac") ----------------------------

@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_hybrid_at_full_rank_on_all_examples_is_exact(kind):
    """A fit on all examples at full rank spans the GGN's range; the rest is its null space (softmax's shift of the
    last layer's rows), where EK-FAC's curvature is zero as well: the exact GGN solve."""
    model, x, y = problem(kind)
    v = grad_z(model, x[:4], y[:4])
    exact = make_solver("exact", curvature="ggn", damping=DAMPING).fit(model, x, y, weight_decay=WD)
    hybrid = make_solver("fast", rest="ekfac", damping=DAMPING, rank=10_000, n_samples=len(x)).fit(model, x, y, weight_decay=WD)
    assert hybrid.eigenvectors.shape[1] == torch.linalg.matrix_rank(explicit_ggn(model, x, y))  # the whole range
    assert rel(hybrid.inverse_hvp(v), exact.inverse_hvp(v)) < EXACT_REL
    assert rel(hybrid.quadratic_form(v), exact.quadratic_form(v)) < EXACT_REL


@pytest.mark.parametrize("span_images", [0, 40])
def test_hybrid_is_the_sampled_ggn_on_each_span_and_compressed_ekfac_elsewhere_averaged_over_fits(span_images):
    """Against explicit matrices: per span ``U (E+d)^-1 U^T + A^-1 - A^-1 U (U^T A^-1 U)^-1 U^T A^-1``, the mean over
    spans (one per fit, or two fits merged into the first of two spans)."""
    model, x, y = problem("conv")
    v = grad_z(model, x[:5], y[:5])
    hybrid = make_solver("fast", rest="ekfac", damping=DAMPING, rank=12, n_samples=20, n_fits=3,
                         span_images=span_images).fit(model, x, y, weight_decay=WD)
    assert len(hybrid.widths) == (3 if span_images == 0 else 2)
    d = WD + DAMPING
    a = _explicit_ekfac(hybrid.rest_solver, model)
    a_inv = torch.linalg.inv(a + d * torch.eye(len(a), dtype=a.dtype))
    mean, start = 0, 0
    for width in hybrid.widths:
        u, e = hybrid.eigenvectors[:, start : start + width], hybrid.eigenvalues[start : start + width]
        start += width
        mean = mean + u @ torch.diag(1 / (e + d)) @ u.T + a_inv - a_inv @ u @ torch.linalg.inv(u.T @ a_inv @ u) @ u.T @ a_inv
    mean = mean / len(hybrid.widths)
    assert rel(hybrid.inverse_hvp(v), v @ mean) < EXACT_REL
    assert rel(hybrid.quadratic_form(v), ((v @ mean) * v).sum(1)) < EXACT_REL
    if span_images == 0:
        u = hybrid.eigenvectors[:, : hybrid.widths[0]]  # on a fit's span that fit's term is the sampled GGN's inverse
        one = make_solver("fast", rest="ekfac", damping=DAMPING, rank=12, n_samples=20, n_fits=1).fit(model, x, y, weight_decay=WD)
        assert rel(one.inverse_hvp(u.T), (u / (hybrid.eigenvalues[: hybrid.widths[0]] + d)).T) < EXACT_REL
    assert hybrid.basis() is None  # quadratic forms need EK-FAC solves, not only the basis products


@pytest.mark.parametrize("span_images", [0, 16])
def test_hybrid_self_influence_takes_the_bases_products_without_the_linear_weight_rows(span_images):
    """``self_influence`` with the hybrid: ``U^T g`` from :meth:`basis_products` (the kernel route), one product
    with the bases and one EK-FAC solve from the gradients: the same values as the quadratic form of the
    gradients, whatever the chunk size, with one span per fit or fits merged into spans."""
    from influence_over_inference.engine.scores import self_influence

    model, x, y = problem("conv")
    hybrid = make_solver("fast", rest="ekfac", damping=DAMPING, rank=12, n_samples=8, n_fits=3,
                         span_images=span_images).fit(model, x, y, weight_decay=WD)
    assert hybrid.basis_products_ready() and hybrid.factors  # the fits kept their factor rows
    expect = hybrid.quadratic_form(grad_z(model, x, y)) / len(x)
    calls = []
    products = hybrid.basis_products
    hybrid.basis_products = lambda xs, ys: calls.append(len(xs)) or products(xs, ys)
    for chunk in (7, 64):
        calls.clear()
        assert rel(self_influence(model, (x, y), hybrid, chunk_size=chunk), expect) < EXACT_REL
        assert sum(calls) == len(x)  # every example went through the kernel route
    dots = products(x[:4], y[:4])[0]
    assert rel(dots, grad_z(model, x[:4], y[:4]) @ hybrid.eigenvectors) < EXACT_REL
    g = grad_z(model, x[:4], y[:4])
    assert rel(hybrid.quadratic_form_with_products(g, dots), hybrid.quadratic_form(g)) < EXACT_REL
    plain = make_solver("fast", rest="damping", damping=DAMPING, rank=12, n_samples=8, n_fits=3).fit(model, x, y, weight_decay=WD)
    assert rel(plain.quadratic_form_with_products(g, g @ plain.eigenvectors), plain.quadratic_form(g)) < EXACT_REL


def test_hybrid_state_roundtrip_and_damping_change():
    model, x, y = problem("conv")
    v = grad_z(model, x[:3], y[:3])
    hybrid = make_solver("fast", rest="ekfac", damping=DAMPING, rank=12, n_samples=20, n_fits=2).fit(model, x, y, weight_decay=WD)
    again = make_solver("fast", rest="ekfac", damping=DAMPING, rank=12, n_samples=20, n_fits=2).fit(
        model, x, y, weight_decay=WD, state=hybrid.state_dict())
    assert rel(again.inverse_hvp(v), hybrid.inverse_hvp(v)) < 1e-12
    other = make_solver("fast", rest="ekfac", damping=0.02, rank=12, n_samples=20, n_fits=2).fit(model, x, y, weight_decay=WD)
    hybrid.settings.damping = 0.02  # the damping is read at solve time (the sweeps rely on it)
    assert rel(hybrid.inverse_hvp(v), other.inverse_hvp(v)) < EXACT_REL
    plain = make_solver("fast", rest="damping", damping=DAMPING, rank=12, n_samples=20, n_fits=2).fit(model, x, y, weight_decay=WD)
    with pytest.raises(ValueError, match="no EK-FAC factors"):
        make_solver("fast", rest="ekfac", damping=DAMPING, rank=12, n_samples=20, n_fits=2).fit(
            model, x, y, weight_decay=WD, state=plain.state_dict())
    with pytest.raises(ValueError, match="rest must be one of"):
        make_solver("fast", rest="kfac")


def test_hybrid_on_a_model_ekfac_cannot_take_is_the_fast_solver_with_zero_rest_and_says_so(caplog):
    torch.manual_seed(0)
    model = layer_norm_net()
    x, y = blobs(30, (6,), 3)
    v = grad_z(model, x[:3], y[:3])
    with caplog.at_level("WARNING"):
        hybrid = make_solver("fast", damping=DAMPING, rank=8, n_samples=10, n_fits=2).fit(model, x, y, weight_decay=WD)
    assert "EK-FAC takes only nn.Linear and nn.Conv2d" in caplog.text
    plain = make_solver("fast", rest="damping", damping=DAMPING, rank=8, n_samples=10, n_fits=2).fit(model, x, y, weight_decay=WD)
    assert torch.equal(hybrid.inverse_hvp(v), plain.inverse_hvp(v))
    again = make_solver("fast", damping=DAMPING, rank=8, n_samples=10, n_fits=2).fit(model, x, y, weight_decay=WD,
                                                                                      state=hybrid.state_dict())
    assert torch.equal(again.inverse_hvp(v), plain.inverse_hvp(v))
