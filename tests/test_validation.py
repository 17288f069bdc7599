"""Validation machinery on tiny problems: metrics against hand-computed values, the flip generator,
the convex leave-one-out, and the retrain-minus-control logic (float64, seconds)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from influence_over_inference.experiments.flipped import detection_metrics, flip_labels
from influence_over_inference.experiments.logreg import (
    fit_logreg,
    logreg_grad,
    logreg_hessian,
    logreg_influence,
    logreg_loss,
    logreg_test_losses,
    refit_without,
)
from influence_over_inference.experiments.loo_convex import ConvexLOOConfig, loo_convex
from influence_over_inference.experiments.loo_network import NetworkLOOConfig, loo_retrain_actuals
from influence_over_inference.experiments.metrics import (
    found_at,
    fraction_found,
    pearson,
    rankdata,
    roc_auc,
    spearman,
)
from influence_over_inference.experiments.retraining import (
    RetrainConfig,
    balanced_subset,
    data_order,
    retrain,
)
from influence_over_inference.experiments.store import ResultCache

EXACT = 1e-12  # float64 identities
AUTOGRAD = 1e-10  # closed form vs autograd in float64
LOO_PEARSON = 0.95  # the goal for the convex case
LOO_SLOPE_LOW, LOO_SLOPE_HIGH = 0.8, 1.25  # actual = slope * predicted: Pearson alone passes a wrong scale


def logistic_problem(n=120, d=4, c=3, n_test=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.cat([torch.randn(n, d, generator=g, dtype=torch.float64), torch.ones(n, 1, dtype=torch.float64)], 1)
    W_true = 1.5 * torch.randn(c, d + 1, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(X @ W_true.T, 1), 1, generator=g).flatten()
    X_test = torch.cat([torch.randn(n_test, d, generator=g, dtype=torch.float64),
                        torch.ones(n_test, 1, dtype=torch.float64)], 1)
    y_test = torch.arange(n_test) % c
    return X, y, X_test, y_test


# ---------------------------------------------------------------------------------------- metrics

def test_pearson_and_spearman_match_hand_computed_values():
    # x centred (-1, 0, 1), y centred (-4/3, -1/3, 5/3): r = 3 / sqrt(2 * 42/9) = 9 / sqrt(84)
    assert pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(9 / math.sqrt(84), abs=EXACT)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0, abs=EXACT)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0, abs=EXACT)
    assert list(rankdata([3.0, 1.0, 3.0, 2.0])) == [3.5, 1.0, 3.5, 2.0]
    # ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4): centred (-1.5, 0, 0, 1.5) . (-1.5, -.5, .5, 1.5) = 4.5
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5.0), abs=EXACT)
    with pytest.raises(ValueError):
        pearson([1, 2], [1, 2, 3])


def test_roc_auc_matches_pair_counting():
    # positives 0.9 and 0.7; negatives 0.8 and 0.6: pairs won 0.9>0.8, 0.9>0.6, 0.7>0.6 -> 3/4
    assert roc_auc([0.9, 0.8, 0.7, 0.6], [True, False, True, False]) == pytest.approx(0.75, abs=EXACT)
    assert roc_auc([0.5, 0.5], [True, False]) == pytest.approx(0.5, abs=EXACT)  # a tie counts 1/2
    assert roc_auc([1, 2, 3], [False, False, True]) == pytest.approx(1.0, abs=EXACT)
    rng = np.random.default_rng(0)
    s, p = rng.normal(size=200), rng.random(200) < 0.3
    pairs = np.mean([(a > b) + 0.5 * (a == b) for a in s[p] for b in s[~p]])
    assert roc_auc(s, p) == pytest.approx(pairs, abs=EXACT)
    with pytest.raises(ValueError):
        roc_auc([1, 2], [True, True])


def test_fraction_found_checks_in_score_order():
    checked, found = fraction_found([3.0, 1.0, 2.0, 0.0], [True, False, True, False])
    assert np.allclose(checked, [0, 0.25, 0.5, 0.75, 1.0])
    assert np.allclose(found, [0, 0.5, 1.0, 1.0, 1.0])
    assert found_at(checked, found, 0.25) == 0.5
    assert found_at(checked, found, 0.5) == 1.0
    metrics = detection_metrics({"s": np.array([3.0, 1.0, 2.0, 0.0])}, np.array([True, False, True, False]))
    assert metrics["s"]["auc"] == pytest.approx(1.0) and metrics["s"]["found_at_20"] == 0.0


# ---------------------------------------------------------------------------------- flip generator

def test_flip_labels_exactly_ten_percent_never_the_true_class_reproducible():
    labels = torch.arange(1000) % 10
    state = torch.random.get_rng_state()
    new, flipped = flip_labels(labels, 0.1, 10, torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert int(flipped.sum()) == 100
    assert bool((new[flipped] != labels[flipped]).all())
    assert torch.equal(new[~flipped], labels[~flipped])
    assert set(new[flipped].tolist()) == set(range(10))  # every other class is reachable
    again, flipped_again = flip_labels(labels, 0.1, 10, torch.Generator().manual_seed(0))
    assert torch.equal(again, new) and torch.equal(flipped_again, flipped)
    other, _ = flip_labels(labels, 0.1, 10, torch.Generator().manual_seed(1))
    assert not torch.equal(other, new)
    assert int(flip_labels(labels[:15], 0.1, 10, torch.Generator().manual_seed(0))[1].sum()) == 2  # round(1.5)
    with pytest.raises(ValueError):
        flip_labels(labels, 1.5, 10, torch.Generator())


# ------------------------------------------------------------------------------ convex leave-one-out

def test_logreg_gradient_and_hessian_equal_autograd():
    X, y, _, _ = logistic_problem()
    W = 0.3 * torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    wd = 0.01
    g_auto = torch.func.grad(lambda w: logreg_loss(w, X, y, wd))(W)
    assert torch.allclose(logreg_grad(W, X, y, wd), g_auto, atol=AUTOGRAD, rtol=0)
    H_auto = torch.autograd.functional.hessian(lambda w: logreg_loss(w.reshape(3, 5), X, y, wd), W.flatten())
    assert torch.allclose(logreg_hessian(W, X, wd, chunk=37), H_auto, atol=AUTOGRAD, rtol=0)  # chunking invariant


def test_refit_without_reaches_the_leave_one_out_optimum():
    X, y, _, _ = logistic_problem()
    wd = 0.01
    W, info = fit_logreg(X, y, wd, torch.zeros(3, 5, dtype=torch.float64))
    assert info["grad_max"] < 1e-12
    H = logreg_hessian(W, X, wd)
    W_j, info_j = refit_without(X, y, wd, W, torch.linalg.cholesky(H), [7], tol=1e-13)
    w = torch.full((len(y),), 1.0 / len(y), dtype=torch.float64)
    w[7] = 0
    assert float(logreg_grad(W_j, X, y, wd, weights=w).abs().max()) < 1e-13
    assert info_j["iterations"] < 20


def test_convex_leave_one_out_matches_influence():
    X, y, X_test, y_test = logistic_problem()
    out = loo_convex(X, y, X_test, y_test, 0.01, torch.zeros(3, 5, dtype=torch.float64),
                     ConvexLOOConfig(test_indices=(0, 1, 2), top_k=20), progress=False)
    for entry in out["test"]:
        assert entry["pearson"] >= LOO_PEARSON
        predicted, actual = np.asarray(entry["predicted"]), np.asarray(entry["actual"])
        slope = float((predicted * actual).sum() / (predicted * predicted).sum())
        assert LOO_SLOPE_LOW <= slope <= LOO_SLOPE_HIGH, slope
        assert len(entry["removed"]) == 20
        assert np.sign(entry["predicted"][0]) == np.sign(entry["actual"][0])  # the sign of the largest


def test_convex_leave_one_out_resumes_from_cache(tmp_path):
    X, y, X_test, y_test = logistic_problem()
    cfg = ConvexLOOConfig(test_indices=(0,), top_k=5)
    cache = ResultCache(tmp_path / "c.json", {"s": 1})
    first = loo_convex(X, y, X_test[:1], y_test[:1], 0.01, torch.zeros(3, 5, dtype=torch.float64), cfg, cache, False)
    assert len(json.loads((tmp_path / "c.json").read_text())["entries"]) == 5
    cache = ResultCache(tmp_path / "c.json", {"s": 1})
    for key in list(cache.entries):
        cache.entries[key]["actual"] = 123.0  # a resumed run must read the cache, not refit
    again = loo_convex(X, y, X_test[:1], y_test[:1], 0.01, torch.zeros(3, 5, dtype=torch.float64), cfg, cache, False)
    assert again["test"][0]["actual"] == [123.0] * 5 and first["test"][0]["actual"] != again["test"][0]["actual"]
    assert ResultCache(tmp_path / "c.json", {"s": 2}).entries == {}  # other settings: not reused


# ---------------------------------------------------------------------- retraining and the control

def test_data_order_is_seeded_permutations():
    order = data_order(10, steps=7, batch_size=3, generator=torch.Generator().manual_seed(0))
    assert order.shape == (7, 3)
    flat = order.flatten()
    assert sorted(flat[:10].tolist()) == list(range(10)) and sorted(flat[10:20].tolist()) == list(range(10))
    assert torch.equal(order, data_order(10, 7, 3, torch.Generator().manual_seed(0)))


def test_retrain_is_weighted_sgd_on_the_given_minibatches():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    w = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    cfg = RetrainConfig(steps=1, batch_size=3, lr=0.1, momentum=0.9, weight_decay=0.01)
    order = torch.tensor([[0, 1, 2]])
    out = retrain(model, x, y, w, cfg, order)
    W0 = torch.cat([model.weight, model.bias[:, None]], 1).detach()
    xb = torch.cat([x[:3], torch.ones(3, 1, dtype=torch.float64)], 1)
    # one step: W1 = W0 - lr (sum_b w_b grad CE_b / B + wd W0), momentum buffer starts at the gradient
    grad = logreg_grad(W0, xb, y[:3], 0.0, weights=w[:3] / 3) + 0.01 * W0
    W1 = torch.cat([out.weight, out.bias[:, None]], 1).detach()
    assert torch.allclose(W1, W0 - 0.1 * grad, atol=EXACT, rtol=0)
    assert torch.equal(model.weight, W0[:, :4])  # the original model is not modified


def test_removing_an_image_that_is_never_drawn_equals_the_control():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.arange(8) % 3
    cfg = RetrainConfig(steps=5, batch_size=2, lr=0.1)
    order = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 0], [1, 2]])  # image 7 never drawn
    control = retrain(model, x, y, torch.ones(8, dtype=torch.float64), cfg, order)
    w = torch.ones(8, dtype=torch.float64)
    w[7] = 0
    assert torch.equal(retrain(model, x, y, w, cfg, order).weight, control.weight)
    w[7], w[3] = 1, 0
    assert not torch.equal(retrain(model, x, y, w, cfg, order).weight, control.weight)


def test_retrain_minus_control_predicts_leave_one_out_on_logistic_regression(tmp_path):
    """The network protocol on a convex model: start at the optimum, retrain long enough, subtract the
    control; influence with the exact Hessian predicts the differences."""
    X, y, X_test, y_test = logistic_problem(n=60)
    wd = 0.05
    W, _ = fit_logreg(X, y, wd, torch.zeros(3, 5, dtype=torch.float64), tol=1e-14)
    model = nn.Linear(4, 3).double()
    with torch.no_grad():
        model.weight.copy_(W[:, :4])
        model.bias.copy_(W[:, 4])
    scores = logreg_influence(W, X, y, X_test, y_test, logreg_hessian(W, X, wd))
    top = torch.argsort(scores[0].abs(), descending=True)[:8].tolist()
    cfg = RetrainConfig(steps=300, batch_size=60, lr=0.5, momentum=0.9, weight_decay=wd)  # full batch
    cache = ResultCache(tmp_path / "runs.json", {"s": 1})
    control, losses = loo_retrain_actuals(model, X[:, :4], y, X_test[:, :4], y_test, top, cfg, cache, progress=False)
    assert np.allclose(control, logreg_test_losses(W, X_test, y_test).numpy(), atol=1e-10)  # at the optimum
    actual = [losses[j][0] - control[0] for j in top]
    assert pearson(scores[0, top].numpy(), actual) >= LOO_PEARSON
    assert set(json.loads((tmp_path / "runs.json").read_text())["entries"]) == {"control", *map(str, top)}


def test_balanced_subset_and_configs():
    labels = torch.tensor([0, 1, 0, 2, 1, 2, 0, 1, 2])
    assert balanced_subset(labels, 2).tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError):
        balanced_subset(labels, 4)
    with pytest.raises(ValueError):
        NetworkLOOConfig(select_by="exact")
    with pytest.raises(ValueError):
        RetrainConfig(lr=0)
    assert RetrainConfig(lr=0.01, steps=400, momentum=0.9).horizon == pytest.approx(40.0)
    assert NetworkLOOConfig(retrain={"steps": 10}).retrain.steps == 10


# ----------------------------------------------------------------- the experiments end to end, tiny

def tiny_data(n_train_per_class=4, n_test=12, seed=0):
    from influence_over_inference.study.data import CIFAR10Data, CIFAR10Split

    g = torch.Generator().manual_seed(seed)
    n = 10 * n_train_per_class
    train = CIFAR10Split(torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8),
                         torch.arange(n) % 10, [f"t{i}" for i in range(n)])
    test = CIFAR10Split(torch.randint(0, 256, (n_test, 32, 32, 3), generator=g, dtype=torch.uint8),
                        torch.arange(n_test) % 10, [f"s{i}" for i in range(n_test)])
    return CIFAR10Data(train, test, source="tiny-random")


def test_experiments_run_end_to_end_cache_and_summarize(tmp_path):
    from influence_over_inference.experiments.flipped import FlippedConfig, run_flipped
    from influence_over_inference.experiments.loo_network import run_loo_network
    from influence_over_inference.experiments.sign import SignConfig, run_sign
    from influence_over_inference.experiments.summary import summarize

    data = tiny_data()
    retrain_cfg = RetrainConfig(steps=3, batch_size=8)
    fast = {"rank": 20, "n_samples": 10, "chunk_size": 10}
    net_cfg = NetworkLOOConfig(n_per_class=3, train_epochs=1, test_indices=(0, 1), top_k=3, solvers=("cg", "fast"),
                               solver_settings={"cg": {"max_iter": 3, "tol": 1e-3}, "fast": fast}, retrain=retrain_cfg)
    net = run_loo_network(data, net_cfg, cache_dir=tmp_path, progress=False)
    assert len(net["test"]) == 2 and set(net["test"][0]["pearson"]) == {"cg", "fast"}
    assert len(net["test"][0]["actual"]) == 3
    again = run_loo_network(data, net_cfg, cache_dir=tmp_path, progress=False)  # second call: the cached result
    assert again == json.loads(json.dumps(net))
    sign = run_sign(data, SignConfig(n_test=2, n_remove=3, solver_settings=fast, n_per_class=3, train_epochs=1,
                                     retrain=retrain_cfg), cache_dir=tmp_path, progress=False)
    assert sign["n_test"] == 2 and len(sign["per_image"]) == 2
    flip = run_flipped(data, FlippedConfig(n_per_class=4, epochs=1, solver_settings={"damping": 0.01, **fast}),
                       cache_dir=tmp_path, progress=False)
    assert flip["n_flipped"] == 4 and set(flip["metrics"]) == {"self_influence", "training_loss", "random",
                                                                   "self_influence_last_layer", "gradient_norm",
                                                                   "self_influence_relatif", "curvature_ratio"}
    assert flip["settings"]["solver_described"]["rank"] == 20  # the resolved settings are recorded
    agree = flip["spearman_with_self_influence"]
    assert set(agree) == {"training_loss", "self_influence_last_layer", "gradient_norm", "self_influence_relatif",
                          "curvature_ratio"} and all(-1 <= v <= 1 for v in agree.values())
    from influence_over_inference.experiments.metrics import spearman

    scores = np.load(next(tmp_path.glob("flipped-curves-*.npz")))
    assert agree["gradient_norm"] == pytest.approx(spearman(scores["score_gradient_norm"], scores["score_self_influence"]))
    cached = run_flipped(data, FlippedConfig(n_per_class=4, epochs=1, solver_settings={"damping": 0.01, **fast}),
                         cache_dir=tmp_path, progress=False)
    assert cached["spearman_with_self_influence"] == pytest.approx(agree)
    entry = next(tmp_path.glob("flipped-result-*.json"))  # an entry written before the field: from the kept scores
    entry.write_text(json.dumps({k: v for k, v in json.loads(entry.read_text()).items()
                                 if k != "spearman_with_self_influence"}))
    older = run_flipped(data, FlippedConfig(n_per_class=4, epochs=1, solver_settings={"damping": 0.01, **fast}),
                        cache_dir=tmp_path, progress=False)
    assert older["spearman_with_self_influence"] == pytest.approx(agree)
    summary = summarize({"loo_network": net, "sign": sign, "flipped": flip}, tmp_path / "v.json", tmp_path / "v.npz")
    assert set(summary["flipped_variants"]) == {"gradient_norm", "self_influence_relatif", "curvature_ratio"}
    assert summary["flipped_spearman_with_self_influence"] == pytest.approx(agree)
    for key in ("loo_network_pearson", "loo_network_spearman", "flipped_found_at_10", "flipped_found_at_20",
                "flipped_auc", "loss_found_at_20", "sign_harmful_removed_delta", "sign_helpful_removed_delta",
                "minutes", "data_source", "n_train"):
        assert key in summary
    arrays = np.load(tmp_path / "v.npz")
    assert "loo_network_predicted_cg_1" in arrays and arrays["flipped_random_found"].shape == (1001,)


def test_parallel_workers_share_runs_through_their_cache_files(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.arange(8) % 3
    cfg = RetrainConfig(steps=4, batch_size=4, lr=0.1)
    a, b = ResultCache(tmp_path / "a.json", {"s": 1}), ResultCache(tmp_path / "b.json", {"s": 1})
    _, from_b = loo_retrain_actuals(model, x, y, x[:2], y[:2], [5, 6], cfg, b, progress=False, partners=[a.path])
    b.put(6, [123.0, 456.0])  # a marker: the other worker must take this run from b's file, not recompute it
    control, from_a = loo_retrain_actuals(model, x, y, x[:2], y[:2], [4, 5, 6], cfg, a, progress=False,
                                          partners=[b.path])
    assert list(from_a[6]) == [123.0, 456.0] and np.array_equal(from_a[5], from_b[5])
    assert set(json.loads(a.path.read_text())["entries"]) == {"control", "4", "5", "6"}
    assert ResultCache(tmp_path / "c.json", {"s": 2}).entries == {}


def test_self_influence_variants_match_the_engine_and_a_plain_loop():
    """One gradient pass gives the engine's self-influence and its variants (experiments/flipped.py), any solver."""
    from engine_models import blobs, conv

    from influence_over_inference.engine.gradients import grad_z
    from influence_over_inference.engine.scores import self_influence
    from influence_over_inference.engine.solvers import make_solver
    from influence_over_inference.experiments.flipped import self_influence_variants

    torch.manual_seed(0)
    model = conv()
    x, y = blobs(30, (3, 8, 8), 4, seed=0)
    for name, settings in (("exact", {"damping": 0.01}), ("fast", {"rank": 20, "n_samples": 30, "chunk_size": 10})):
        solver = make_solver(name, **settings).fit(model, x, y, weight_decay=1e-3)
        v = self_influence_variants(model, (x, y), solver, 30, chunk_size=7, progress=False)
        np.testing.assert_allclose(v["self_influence"], self_influence(model, (x, y), solver).numpy(), rtol=1e-9)
        for j in (0, 17, 29):
            g = grad_z(model, x[j : j + 1], y[j : j + 1])[0]
            h = solver.inverse_hvp(g[None])[0]
            np.testing.assert_allclose(v["gradient_norm"][j], float(g @ g) / 30, rtol=1e-10)
            np.testing.assert_allclose(v["self_influence_relatif"][j], float(g @ h) / float(h.norm()), rtol=1e-10)
            np.testing.assert_allclose(v["curvature_ratio"][j], float(g @ h) / float(g @ g), rtol=1e-10)


def test_older_experiments_pin_one_fast_fit():
    """The leave-one-out, sign and perturbation figures were measured with one fit: a rerun must reproduce
    them, whatever the engine's default ``n_fits`` becomes."""
    from influence_over_inference.engine.solvers.fast import FastSettings
    from influence_over_inference.experiments.perturbation import PerturbationConfig
    from influence_over_inference.experiments.sign import SignConfig

    for settings in (NetworkLOOConfig().solver_settings["fast"], SignConfig().solver_settings,
                     PerturbationConfig().solver_settings):
        assert FastSettings(**settings).n_fits == 1
        assert (settings["rank"], settings["n_samples"]) == (500, 500)
