"""Per-sample gradients: vectorised == a plain per-example loop, chunk-size invariance, layer
selection, the Gauss-Newton factor rows, and clear errors for bad input (float64, tiny models)."""

from __future__ import annotations

import re

import pytest
import torch
from engine_models import DTYPE, blobs, conv, layer_norm_net, logistic, mlp
from torch import nn

from influence_over_inference.engine.gradients import class_gradients, grad_z, iter_grad_z
from influence_over_inference.engine.params import (
    count_selected,
    flatten_params,
    select_parameters,
    unflatten_params,
)

EXACT = 1e-10  # float64 agreement of two ways to compute the same numbers


def loop_grads(model, x, y, layers=None):
    """The plain per-example loop: one backward pass per example."""
    params = select_parameters(model, layers)
    named = dict(model.named_parameters())
    rows = []
    for xi, yi in zip(x, y, strict=True):
        loss = nn.functional.cross_entropy(model(xi[None]), yi[None])
        grads = torch.autograd.grad(loss, [named[k] for k in params])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


CASES = [
    ("logistic", logistic, (5,), 3),
    ("mlp", mlp, (6,), 3),
    ("conv", conv, (3, 8, 8), 4),
]


@pytest.mark.parametrize("name,make,shape,c", CASES)
@pytest.mark.parametrize("method", ["vmap", "hooks"])
def test_vectorised_equals_loop(name, make, shape, c, method):
    torch.manual_seed(0)
    model = make().eval()
    x, y = blobs(12, shape, c, seed=1)
    g = grad_z(model, x, y, method=method)
    assert g.shape == (12, count_selected(model))
    assert torch.allclose(g, loop_grads(model, x, y), atol=EXACT, rtol=0)


def test_chunk_size_invariance_and_streaming():
    model = conv().eval()
    x, y = blobs(23, (3, 8, 8), 4, seed=2)
    full = grad_z(model, x, y, chunk_size=100)
    for chunk in (1, 5, 7):
        assert torch.allclose(grad_z(model, x, y, chunk_size=chunk), full, atol=EXACT, rtol=0)
    streamed = torch.cat([g for _, g in iter_grad_z(model, (x, y), chunk_size=6, dtype=DTYPE)])
    assert torch.allclose(streamed, full, atol=EXACT, rtol=0)
    starts = [s for s, _ in iter_grad_z(model, (x, y), chunk_size=6)]
    assert starts == [0, 6, 12, 18]


def test_layer_selection_picks_the_right_columns():
    model = conv().eval()
    x, y = blobs(5, (3, 8, 8), 4, seed=3)
    full = unflatten_params(grad_z(model, x, y), select_parameters(model))
    only = grad_z(model, x, y, layers=["fc2", "conv1.bias"])
    expect = torch.cat([full[k].reshape(5, -1) for k in ("conv1.bias", "fc2.weight", "fc2.bias")], dim=1)
    assert torch.allclose(only, expect, atol=EXACT, rtol=0)
    assert torch.allclose(only, loop_grads(model, x, y, ["fc2", "conv1.bias"]), atol=EXACT, rtol=0)


def test_flatten_roundtrip():
    params = select_parameters(mlp())
    flat = flatten_params(params)
    back = unflatten_params(flat, params)
    assert all(torch.equal(back[k], params[k]) for k in params)
    with pytest.raises(ValueError, match="entries"):
        unflatten_params(flat[:-1], params)


@pytest.mark.parametrize("name,make,shape,c", CASES)
def test_class_gradients_factor_the_gauss_newton_matrix(name, make, shape, c):
    """rows^T rows == J^T (diag(p) - p p^T) J per example; the row of the true label / sqrt(p_y) == grad_z."""
    model = make().eval()
    x, y = blobs(4, shape, c, seed=4)
    probs, rows = class_gradients(model, x)  # (B, C), (B, C, P)
    params = select_parameters(model)
    for i in range(len(x)):
        def logits(flat, i=i):
            return torch.func.functional_call(model, unflatten_params(flat, params), (x[i : i + 1],))[0]

        jac = torch.autograd.functional.jacobian(logits, flatten_params(params))  # (C, P)
        p = probs[i]
        ggn = jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac
        assert torch.allclose(rows[i].T @ rows[i], ggn, atol=EXACT, rtol=0)
    g = grad_z(model, x, y)
    own = rows[torch.arange(len(y)), y] / probs[torch.arange(len(y)), y, None].sqrt()
    assert torch.allclose(own, g, atol=1e-8, rtol=0)


def test_bad_inputs_raise_clear_errors():
    model = mlp().eval()
    x, y = blobs(4, (6,), 3)
    bad = x.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        grad_z(model, bad, y)
    with pytest.raises(ValueError, match="labels must have shape"):
        grad_z(model, x, y[:3])
    with pytest.raises(ValueError, match="batch"):
        grad_z(model, x[0, 0], y[:1])
    with pytest.raises(ValueError, match="matches no parameter"):
        grad_z(model, x, y, layers=["fc9"])
    with pytest.raises(ValueError, match="hooks"):
        grad_z(nn.Sequential(nn.Flatten(), nn.Linear(6, 3), nn.LayerNorm(3)).to(DTYPE), x, y, method="hooks")
    with pytest.raises(ValueError, match="chunk_size"):
        grad_z(model, x, y, chunk_size=0)


def test_models_with_other_layers_fall_back_to_vmap():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.LayerNorm(4), nn.Linear(4, 3)).to(DTYPE).eval()
    x, y = blobs(5, (6,), 3, seed=5)
    assert torch.allclose(grad_z(model, x, y), loop_grads(model, x, y), atol=EXACT, rtol=0)


@pytest.mark.parametrize("kw", [dict(), dict(stride=2), dict(padding=2, dilation=2), dict(padding=(1, 0), stride=(1, 2))])
def test_conv_per_sample_gradients_with_stride_padding_dilation(kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, **kw), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)).to(DTYPE)
    x, y = blobs(5, (3, 9, 9), 3, seed=6)
    model(x)  # materialise the lazy layer
    model.eval()
    assert torch.allclose(grad_z(model, x, y, method="hooks"), loop_grads(model, x, y), atol=EXACT, rtol=0)


@pytest.mark.parametrize("name,make,shape,c", CASES)
def test_grad_dot_equals_materialised_products(name, make, shape, c):
    from influence_over_inference.engine.gradients import grad_dot

    torch.manual_seed(0)
    model = make().eval()
    x, y = blobs(11, shape, c, seed=7)
    v = torch.randn(4, count_selected(model), dtype=DTYPE)
    g = loop_grads(model, x, y)
    dots, norms = grad_dot(model, x, y, v, chunk_size=4)
    assert torch.allclose(dots, g @ v.T, atol=EXACT, rtol=0)
    assert torch.allclose(norms, (g * g).sum(1), atol=EXACT, rtol=0)


@pytest.mark.parametrize("make,layers", [(conv, ["fc2", "conv1.bias"]), (layer_norm_net, None),
                                         (layer_norm_net, ["2", "4.weight"])])
def test_grad_dot_with_chosen_layers_and_on_models_the_hooks_cannot_take(make, layers):
    from influence_over_inference.engine.gradients import grad_dot

    torch.manual_seed(0)
    model = make().eval()
    shape = (3, 8, 8) if make is conv else (6,)
    x, y = blobs(9, shape, 3, seed=8)
    g = loop_grads(model, x, y, layers)
    v = torch.randn(3, g.shape[1], dtype=DTYPE)
    dots, norms = grad_dot(model, x, y, v, layers=layers, chunk_size=4)
    assert dots.shape == (9, 3) and norms.shape == (9,)
    assert torch.allclose(dots, g @ v.T, atol=EXACT, rtol=0)
    assert torch.allclose(norms, (g * g).sum(1), atol=EXACT, rtol=0)
    assert not model.training


def test_grad_dot_bad_vectors_and_labels_say_what_is_wrong():
    from influence_over_inference.engine.gradients import grad_dot

    model = mlp().eval()
    x, y = blobs(4, (6,), 3, seed=9)
    p = count_selected(model)
    v = torch.randn(2, p, dtype=DTYPE)
    with pytest.raises(ValueError, match=rf"vectors must have shape \(K, {p}\), got \({p},\)"):
        grad_dot(model, x, y, v[0])
    with pytest.raises(ValueError, match=rf"vectors must have shape \(K, {p}\), got \(2, {p + 1}\)"):
        grad_dot(model, x, y, torch.randn(2, p + 1, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"^grad_dot: labels must have shape \(4,\)"):
        grad_dot(model, x, y[:3], v)


def test_iter_grad_z_is_silent_by_default_and_names_its_bar_when_asked(capsys):
    model = mlp().eval()
    x, y = blobs(6, (6,), 3, seed=10)
    assert len(list(iter_grad_z(model, (x, y), chunk_size=4))) == 2
    assert capsys.readouterr().err == ""
    list(iter_grad_z(model, (x, y), chunk_size=4, progress=True))
    assert re.search(r"(^|\r)training gradients: ", capsys.readouterr().err)  # the bar's own name, as written


@pytest.mark.parametrize("layers", [None, ["2", "4.bias"]])
def test_class_gradients_on_a_model_the_hooks_cannot_take(layers):
    """Row [i, c] = sqrt(p_ic) * grad L(x_i, label c), through the Jacobian route (a LayerNorm net)."""
    torch.manual_seed(0)
    model = layer_norm_net().eval()
    x, _ = blobs(5, (6,), 3, seed=21)
    probs, rows = class_gradients(model, x, layers)
    assert torch.allclose(probs, torch.softmax(model(x), 1), atol=EXACT, rtol=0)
    for c in range(3):
        want = loop_grads(model, x, torch.full((5,), c), layers) * probs[:, c : c + 1].sqrt()
        assert torch.allclose(rows[:, c], want, atol=EXACT, rtol=0)


def test_grad_z_of_no_images_and_bad_inputs_name_the_function():
    model = mlp().eval()
    x, y = blobs(3, (6,), 3, seed=22)
    assert grad_z(model, x[:0], y[:0]).shape == (0, count_selected(model))
    assert grad_z(model, x[:0], y[:0], layers=["3"]).shape == (0, 27)
    with pytest.raises(ValueError, match=r"^grad_z: labels must have shape \(3,\)"):
        grad_z(model, x, y[:2])
    with pytest.raises(ValueError, match=r"^class_gradients: expected a batch"):
        class_gradients(model, x[0])


def test_grad_z_routes_take_the_chosen_layers_and_bad_methods_say_what_to_use():
    torch.manual_seed(0)
    model = conv().eval()
    x, y = blobs(5, (3, 8, 8), 4, seed=23)
    for method in ("vmap", "hooks", "auto"):
        assert torch.allclose(grad_z(model, x, y, ["fc1", "conv2.weight"], method=method),
                              loop_grads(model, x, y, ["fc1", "conv2.weight"]), atol=EXACT, rtol=0)
    with pytest.raises(ValueError, match=r"^method must be 'auto', 'hooks' or 'vmap', got 'fast'$"):
        grad_z(model, x, y, method="fast")
    with pytest.raises(ValueError, match=r"^method='hooks' needs every chosen parameter to be the weight or bias of an "
                                         r"nn\.Linear or a plain nn\.Conv2d; use method='vmap'$"):
        grad_z(layer_norm_net().eval(), *blobs(3, (6,), 3, seed=24), method="hooks")


@pytest.mark.parametrize("kw", [dict(), dict(stride=2), dict(padding=2, dilation=2), dict(padding=(1, 0), stride=(1, 2))])
def test_class_gradient_parts_stack_every_class_into_one_conv_call_and_match_the_jacobian(kw):
    """The per-class rows of a convolution (all classes in one grouped convolution) equal sqrt(p_c) J^T (p - e_c)."""
    from influence_over_inference.engine.gradients import logits_jacobian
    from influence_over_inference.engine.hooks import class_gradient_parts

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, **kw), nn.ReLU(), nn.Conv2d(4, 2, 2, stride=kw.get("stride", 1)),
                          nn.Flatten(), nn.LazyLinear(3)).to(DTYPE)
    x, _ = blobs(5, (3, 9, 9), 3, seed=11)
    model(x)
    model.eval()
    probs, parts = class_gradient_parts(model, x)
    logits, jac = logits_jacobian(model, x)
    p = torch.softmax(logits, 1)
    want = torch.einsum("bcl,blp->bcp", (p[:, None, :] - torch.eye(3, dtype=DTYPE)) * p.sqrt()[:, :, None], jac)
    got = torch.cat([t[0] if kind == "rows" else (t[0][:, :, :, None] * t[1][:, None, None, :]).flatten(2)
                     for kind, *t in parts.values()], dim=2)
    assert torch.allclose(probs, p, atol=EXACT, rtol=0)
    assert torch.allclose(got, want, atol=EXACT, rtol=0)
