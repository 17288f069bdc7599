"""Perturbation influence: the map is minus the input gradient of the exact influence score (finite
differences, float64), does not depend on the chunk size, and predicts retraining with a perturbed
training image on a convex model (sign and size); the engine's method and clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from engine_models import DTYPE, UserSplit, blobs, conv, fit, logistic, mlp, trained_conv
from torch import nn

from influence_over_inference.engine.influence_engine import InfluenceEngine
from influence_over_inference.engine.perturbation import perturbation_influence, predicted_change
from influence_over_inference.engine.scores import influence, s_test
from influence_over_inference.engine.solvers.registry import make_solver

WD = 1e-2
FD_STEP = 1e-5  # central differences: truncation error ~ FD_STEP**2, rounding ~ 1e-16 / FD_STEP
FD_REL_ERR = 1e-6  # the bound on |map - finite difference| / |map|
EXACT = 1e-12  # same numbers by another route (chunking, the engine's method)
RETRAIN_REL = 0.1  # predicted vs actual test-loss change after refitting with a perturbed image (first order in 1/n)


def fd_rel_err(model, x, y, solver, stest, j, layers=None):
    """Relative error of the map of training image j against central differences of the exact score."""
    n = len(x)
    maps = perturbation_influence(model, stest, x[j : j + 1], y[j : j + 1], n, layers)[:, 0]  # (K, ...)
    fd = torch.zeros_like(maps)
    flat = x[j].reshape(-1)
    for i in range(flat.numel()):
        scores = []
        for sign in (1, -1):
            xp = x.clone()
            xp[j].view(-1)[i] += sign * FD_STEP
            scores.append(influence(model, None, None, (xp, y), solver, stest=stest)[:, j])
        fd.reshape(len(fd), -1)[:, i] = -(scores[0] - scores[1]) / (2 * FD_STEP)
    return float((maps - fd).norm() / maps.norm())


@pytest.mark.parametrize("make", ["mlp", "conv"])
def test_map_is_minus_the_input_gradient_of_the_exact_score(make):
    if make == "mlp":
        torch.manual_seed(0)
        x, y = blobs(60, (6,), 3, seed=0, noise=1.5)
        model = fit(mlp(), x, y, WD, steps=300)
        xt, yt = blobs(3, (6,), 3, seed=1, noise=1.5)
    else:
        model, x, y = trained_conv(n=120)
        xt, yt = blobs(3, (3, 8, 8), 4, seed=1, noise=2.0)
    solver = make_solver("exact", damping=0.01).fit(model, x, y, weight_decay=WD)
    stest = s_test(model, xt, yt, solver)  # (3, P): several test images at once
    for j in (0, 7):
        assert fd_rel_err(model, x, y, solver, stest, j) <= FD_REL_ERR


def test_map_of_selected_layers_matches_finite_differences():
    model, x, y = trained_conv(n=120)
    xt, yt = blobs(2, (3, 8, 8), 4, seed=1, noise=2.0)
    solver = make_solver("exact", damping=0.01).fit(model, x, y, weight_decay=WD, layers=["conv2", "fc2"])
    stest = s_test(model, xt, yt, solver)
    assert fd_rel_err(model, x, y, solver, stest, 4, layers=["conv2", "fc2"]) <= FD_REL_ERR  # image 3: dead ReLUs, map 0


def test_maps_do_not_depend_on_the_chunk_size_and_keep_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(conv(), nn.BatchNorm1d(4)).to(DTYPE)  # BatchNorm: eval mode makes images independent
    x, y = blobs(23, (3, 8, 8), 4, seed=2)
    stest = torch.randn(2, sum(p.numel() for p in model.parameters()), dtype=DTYPE)
    model.train()
    whole = perturbation_influence(model, stest, x, y, 100, chunk_size=23)
    assert model.training  # restored
    for chunk in (1, 5):
        assert torch.allclose(perturbation_influence(model, stest, x, y, 100, chunk_size=chunk), whole, rtol=0, atol=EXACT)
    assert whole.shape == (2, 23, 3, 8, 8) and whole.abs().max() > 0


def test_moving_along_the_map_raises_the_retrained_test_loss_as_predicted():
    """Convex model, exact Hessian, no damping: replace x_j by x_j + delta, refit, compare."""
    torch.manual_seed(0)
    x, y = blobs(80, (5,), 3, seed=0, noise=1.5)
    xt, yt = blobs(40, (5,), 3, seed=1, noise=1.5)
    model = fit(logistic(), x, y, WD, steps=500, tol=1e-14)
    with torch.no_grad():
        t = int(nn.functional.cross_entropy(model(xt), yt, reduction="none").argsort()[-5])
        base = float(nn.functional.cross_entropy(model(xt[t : t + 1]), yt[t : t + 1]))
    solver = make_solver("exact", curvature="hessian", damping=0.0).fit(model, x, y, weight_decay=WD)
    scores = influence(model, xt[t : t + 1], yt[t : t + 1], (x, y), solver)[0]
    maps = perturbation_influence(model, s_test(model, xt[t : t + 1], yt[t : t + 1], solver), x, y, len(x))[0]
    for j in scores.abs().argsort(descending=True)[:3].tolist():
        for step in (0.3, -0.3):
            delta = torch.zeros_like(x)
            delta[j] = step * maps[j] / maps[j].norm()
            predicted = float(predicted_change(maps[None], delta)[0, j])
            refit = fit(copy.deepcopy(model), x + delta, y, WD, steps=500, tol=1e-14)
            with torch.no_grad():
                actual = float(nn.functional.cross_entropy(refit(xt[t : t + 1]), yt[t : t + 1])) - base
            assert (actual > 0) == (step > 0)  # along +map the test loss rises
            assert abs(actual - predicted) <= RETRAIN_REL * abs(predicted)


def test_engine_method_equals_the_function_and_bad_inputs_raise():
    model, x, y = trained_conv(n=60)
    xt, yt = blobs(2, (3, 8, 8), 4, seed=1, noise=2.0)
    engine = InfluenceEngine(model, (x, y), make_solver("exact", damping=0.01), weight_decay=WD, cache_dir=None)
    maps = engine.perturbation(xt, yt, [4, 9])
    direct = perturbation_influence(model, engine.s_test(xt, yt), x[[4, 9]], y[[4, 9]], len(x))
    assert maps.shape == (2, 2, 3, 8, 8)
    assert torch.allclose(maps, direct, rtol=0, atol=EXACT)
    with pytest.raises(ValueError, match="stest must have shape"):
        perturbation_influence(model, torch.zeros(1, 5, dtype=DTYPE), x[:2], y[:2], len(x))
    with pytest.raises(ValueError, match="n_train"):
        perturbation_influence(model, engine.s_test(xt, yt), x[:2], y[:2], 0)
    with pytest.raises(ValueError, match="must match"):
        predicted_change(maps, torch.zeros(3, 3, 8, 8))


def test_engine_maps_of_chosen_layers_for_indices_of_any_integer_type():
    import numpy as np

    model, x, y = trained_conv(n=60)
    xt, yt = blobs(2, (3, 8, 8), 4, seed=1, noise=2.0)
    layers = ["fc2"]
    engine = InfluenceEngine(model, UserSplit(x, y), make_solver("exact", damping=0.01), weight_decay=WD, layers=layers,
                             cache_dir=None)
    direct = perturbation_influence(model, engine.s_test(xt, yt), x[[4, 9]], y[[4, 9]], len(x), layers)
    assert not torch.allclose(direct, perturbation_influence(model, s_test(model, xt, yt, make_solver("exact", damping=0.01).fit(
        model, x, y, weight_decay=WD)), x[[4, 9]], y[[4, 9]], len(x)), rtol=0, atol=1e-6)  # the layers matter
    for indices in ([4, 9], np.array([4, 9], dtype=np.uint8), torch.tensor([[4], [9]], dtype=torch.int32)):
        assert torch.allclose(engine.perturbation(xt, yt, indices), direct, rtol=0, atol=EXACT)
