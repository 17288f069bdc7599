"""Stage ``small``: a trained 3,702-parameter conv net, exact influence from the explicit damped GGN; Pearson of fast and kronfluence against it."""

from __future__ import annotations

import copy
import logging
import time

import torch

from .assemble import _spearman_rows
from .common import _test, random_subset
from .kronfluence import kronfluence_scores

log = logging.getLogger("bench")

def _pearson_rows(a, b):
    a = a.double() - a.double().mean(1, keepdim=True)
    b = b.double() - b.double().mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def explicit_ggn(model, x, chunk_size=200):
    """The explicit GGN (P, P) of the mean cross-entropy over ``x``: ``(1/n) sum_i R_i^T R_i`` with
    ``R_i`` the (C, P) rows ``sqrt(p_ic) grad L(x_i, label c)`` (exact for softmax cross-entropy)."""
    from influence_over_inference.engine.gradients import class_gradients

    ggn = None
    for start in range(0, len(x), chunk_size):
        _, rows = class_gradients(model, x[start : start + chunk_size])  # (B, C, P)
        rows = rows.reshape(-1, rows.shape[-1])
        part = rows.T @ rows
        ggn = part if ggn is None else ggn + part
    return ggn / len(x)


def stage_small(cfg, data, model, wd, train, out):
    from influence_over_inference.engine.curvature import curvature_products
    from influence_over_inference.engine.gradients import grad_z
    from influence_over_inference.engine.scores import influence
    from influence_over_inference.engine.solvers.registry import make_solver
    from influence_over_inference.study.model import Net, count_parameters
    from influence_over_inference.study.training import TrainConfig, evaluate
    from influence_over_inference.study.training import train as train_model

    torch.manual_seed(cfg.seed)
    tiny = Net(channels=tuple(cfg.small_channels), hidden=tuple(cfg.small_hidden))
    tc = TrainConfig(epochs=cfg.small_epochs, device="cpu", seed=cfg.seed, threads=cfg.threads)
    small_train = random_subset(data.train, cfg.small_n_train, cfg.seed)  # class-balanced, not the first n
    fit = train_model(small_train, tc, model=tiny, progress=True)
    tiny = fit.model.eval()
    acc = evaluate(tiny, data.test)["accuracy"]
    tx, ty = small_train.tensors()
    x, y = _test(data, cfg, cfg.small_n_test)
    tiny64 = copy.deepcopy(tiny).double()
    tx64, x64 = tx.double(), x.double()
    n = len(ty)
    res = {"small_params": count_parameters(tiny), "small_test_accuracy": acc, "small_n_train": n,
           "small_train_accuracy": fit.history[-1].accuracy, "small_train_loss": fit.history[-1].loss,
           "small_n_test": len(y), "small_weight_decay": tc.weight_decay, "small_reference": "explicit damped GGN"}
    t0 = time.perf_counter()
    ggn = explicit_ggn(tiny64, tx64)
    res["small_exact_ggn_s"] = time.perf_counter() - t0
    # the explicit GGN agrees with the engine's GGN-vector products (on a few columns)
    cols = torch.eye(len(ggn), dtype=torch.float64)[:: max(1, len(ggn) // 8)][:8]
    prod = curvature_products(tiny64, tx64, ty, cols, "ggn", chunk_size=250)
    res["small_ggn_vs_products_rel_diff"] = float((prod - cols @ ggn).norm() / prod.norm())
    g_test = grad_z(tiny64, x64, y)  # (K, P)
    g_train = grad_z(tiny64, tx64, ty)  # (n, P)
    fast = make_solver("fast", **cfg.fast).fit(tiny64, tx64, ty, weight_decay=tc.weight_decay)
    # also the engine's default fast settings (all 2,000 images in the factor here)
    fast_default = make_solver("fast").fit(tiny64, tx64, ty, weight_decay=tc.weight_decay)
    described = {"small_fast_settings": fast.describe(), "small_fast_default_settings": fast_default.describe()}
    per_damping = {}
    for lam in cfg.small_dampings:
        d = tc.weight_decay + lam
        exact = torch.linalg.solve(ggn + d * torch.eye(len(ggn), dtype=ggn.dtype), g_test.T).T  # (K, P)
        sc = {"exact": exact @ g_train.T / n}
        fast.settings.damping = lam
        sc["fast"] = influence(tiny64, x64, y, (tx64, ty), fast)
        fast_default.settings.damping = lam
        sc["fast_default"] = influence(tiny64, x64, y, (tx64, ty), fast_default)
        kron, _ = kronfluence_scores(tiny, tx, ty, x, y, d, out / f"kron_small_{lam}", batch=500)
        sc["kronfluence"] = kron.double() / n
        sc["grad_dot"] = g_test @ g_train.T / n
        row = {}
        for method in ("fast", "fast_default", "kronfluence", "grad_dot"):
            r = _pearson_rows(sc[method], sc["exact"])
            row[f"pearson_{method}_vs_exact"] = float(r.mean())
            row[f"pearson_{method}_vs_exact_min"] = float(r.min())
            row[f"spearman_{method}_vs_exact"] = float(_spearman_rows(sc[method], sc["exact"]).mean())
        per_damping[str(lam)] = row
    head = per_damping[str(cfg.small_dampings[0])]
    res.update({
        "pearson_fast_vs_exact_small": head["pearson_fast_vs_exact"],
        "pearson_kronfluence_vs_exact_small": head["pearson_kronfluence_vs_exact"],
        "small_by_damping": per_damping,
        **described,  # damping: the headline value; small_by_damping has the others
    })
    return res
