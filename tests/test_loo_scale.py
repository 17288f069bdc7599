"""Predicted vs actual leave-one-out on logistic regression: the scale, not only the correlation.

Pearson alone passes a score off by a constant factor (a missing 1/n, repetitions summed); the
least-squares slope of actual on predicted must lie in [LOO_SLOPE_LOW, LOO_SLOPE_HIGH] (float64,
exact Hessian, L-BFGS refits to convergence)."""

from __future__ import annotations

import copy

import torch
from engine_models import blobs, fit, logistic
from torch import nn

from influence_over_inference.engine.scores import influence
from influence_over_inference.engine.solvers.registry import make_solver

WD = 1e-2
LOO_SLOPE_LOW, LOO_SLOPE_HIGH = 0.8, 1.25  # actual = slope * predicted; 1 when the scale is right
LOO_PEARSON = 0.95
N_TRAIN = 400  # large enough that one removal is a small step (first order holds)


def test_predicted_leave_one_out_has_the_right_scale():
    torch.manual_seed(0)
    x, y = blobs(N_TRAIN, (5,), 3, seed=0, noise=1.5)
    xt, yt = blobs(40, (5,), 3, seed=1, noise=1.5)
    model = fit(logistic(), x, y, WD, steps=500)
    with torch.no_grad():
        losses = nn.functional.cross_entropy(model(xt), yt, reduction="none")
    t = int(losses.argsort()[-5])
    xt, yt = xt[t : t + 1], yt[t : t + 1]
    solver = make_solver("exact", curvature="hessian", damping=0.0).fit(model, x, y, weight_decay=WD)
    scores = influence(model, xt, yt, (x, y), solver)[0]
    with torch.no_grad():
        base = float(nn.functional.cross_entropy(model(xt), yt))
    top = scores.abs().argsort(descending=True)[:15]
    actual = []
    for j in top:
        keep = torch.ones(len(x), dtype=torch.bool)
        keep[j] = False
        m = fit(copy.deepcopy(model), x[keep], y[keep], WD, steps=500, tol=1e-14)
        with torch.no_grad():
            actual.append(float(nn.functional.cross_entropy(m(xt), yt)) - base)
    actual = torch.tensor(actual, dtype=torch.float64)
    predicted = scores[top]
    slope = float((predicted * actual).sum() / (predicted * predicted).sum())
    r = float(torch.corrcoef(torch.stack([predicted, actual]))[0, 1])
    assert r >= LOO_PEARSON, r
    assert LOO_SLOPE_LOW <= slope <= LOO_SLOPE_HIGH, (slope, predicted, actual)
