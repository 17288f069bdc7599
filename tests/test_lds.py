"""The LDS (linear datamodeling score): the metric against plain loops, exact influence on a convex
problem retrained on random halves, random scores at zero, and resumable retraining."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FakeData

from influence_over_inference.experiments.lds import (
    LDSConfig,
    balanced_test_indices,
    margins_and_losses,
    model_key,
    model_path,
    retrain_subsets,
    subset_mask,
)
from influence_over_inference.experiments.lds_run import compare_only, paired_comparisons
from influence_over_inference.experiments.lds_score import (
    bootstrap_ci,
    lds_per_test,
    paired_difference,
    rowwise_spearman,
)
from influence_over_inference.experiments.metrics import spearman

EXACT_CONVEX_LDS_MIN = 0.8  # measured 0.983 (seed 0; gradient dot product 0.960): exact influence ranks the halves' retrained models well
RANDOM_LDS_MAX = 0.1  # |mean LDS| of random scores over 40 test points (measured -0.027)


def test_rowwise_spearman_and_lds_match_plain_loops():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 12)), rng.normal(size=(7, 12))
    b[0] = np.round(b[0])  # ties
    loop = [spearman(a[i], b[i]) for i in range(7)]
    np.testing.assert_allclose(rowwise_spearman(a, b), loop, rtol=0, atol=1e-12)
    scores, masks, outputs = rng.normal(size=(5, 30)), rng.random((9, 30)) < 0.5, rng.normal(size=(9, 5))
    pred = [[scores[t][masks[k]].sum() for k in range(9)] for t in range(5)]
    np.testing.assert_allclose(lds_per_test(scores, masks, outputs, "margin"),
                               [spearman(pred[t], outputs[:, t]) for t in range(5)], atol=1e-12)
    np.testing.assert_allclose(lds_per_test(scores, masks, outputs, "loss"),
                               [spearman(pred[t], -outputs[:, t]) for t in range(5)], atol=1e-12)


def test_bootstrap_matches_plain_loop():
    values = np.random.default_rng(1).normal(size=50)
    rng = np.random.default_rng(3)
    means = [values[rng.integers(0, 50, size=50)].mean() for _ in range(200)]
    lo, hi = bootstrap_ci(values, n_boot=200, seed=3)
    np.testing.assert_allclose([lo, hi], np.quantile(means, [0.025, 0.975]), atol=1e-12)
    assert lo < values.mean() < hi


def test_margin_and_loss_of_logits():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
    margin, loss = margins_and_losses(logits, torch.tensor([0, 0]))
    np.testing.assert_allclose(margin[0], 2.0 - np.log(np.exp(0.0) + np.exp(-1.0)), atol=1e-12)
    np.testing.assert_allclose(loss, np.log1p(np.exp(-margin)), atol=1e-12)  # loss = softplus(-margin)


def _fit_logreg(x, y, lam, w=None):
    """Newton's method on mean logistic loss + lam/2 |w|^2 (labels +-1), float64."""
    w = np.zeros(x.shape[1]) if w is None else w.copy()
    for _ in range(30):
        p = 1 / (1 + np.exp(y * (x @ w)))  # sigmoid(-y w.x)
        grad = -(x * (y * p)[:, None]).mean(0) + lam * w
        hess = (x.T * (p * (1 - p))) @ x / len(y) + lam * np.eye(x.shape[1])
        w -= np.linalg.solve(hess, grad)
    return w, hess


def test_exact_influence_has_high_lds_on_a_convex_problem_and_random_is_near_zero():
    rng = np.random.default_rng(0)
    n, d, lam = 200, 5, 1e-2
    w_true = rng.normal(size=d)
    x = rng.normal(size=(n, d))
    y = np.where(rng.random(n) < 1 / (1 + np.exp(-x @ w_true)), 1.0, -1.0)
    xt = rng.normal(size=(40, d))
    yt = np.where(xt @ w_true > 0, 1.0, -1.0)
    w, hess = _fit_logreg(x, y, lam)
    g_train = -x * (y / (1 + np.exp(y * (x @ w))))[:, None]  # (n, d)
    g_test = -xt * (yt / (1 + np.exp(yt * (xt @ w))))[:, None]
    scores = g_test @ np.linalg.solve(hess, g_train.T) / n  # project sign: positive = helpful
    masks = np.stack([subset_mask(n, 0.5, k) for k in range(30)])
    margins = np.stack([yt * (xt @ _fit_logreg(x[m], y[m], lam, w)[0]) for m in masks])  # (S, T)
    lds = np.nanmean(lds_per_test(scores, masks, margins, "margin"))
    assert lds > EXACT_CONVEX_LDS_MIN
    assert np.nanmean(lds_per_test(-scores, masks, margins, "margin")) < -EXACT_CONVEX_LDS_MIN  # the sign matters
    random = np.random.default_rng(5).normal(size=scores.shape)
    assert abs(np.nanmean(lds_per_test(random, masks, margins, "margin"))) < RANDOM_LDS_MAX


def test_retraining_resumes_without_retraining_finished_subsets(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from influence_over_inference.experiments import retraining
    from influence_over_inference.study.model import Net

    monkeypatch.setattr(retraining, "subset_split", lambda split, idx: split)
    data, config = FakeData(), LDSConfig(n_subsets=4, n_test=10, n_test_subset=2)
    calls = []

    def fake_train(split, recipe, progress=False):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run is killed while training the third model
        calls.append(recipe.seed)
        torch.manual_seed(recipe.seed)
        return SimpleNamespace(model=Net())

    with pytest.raises(KeyboardInterrupt):
        retrain_subsets(data, config, tmp_path, progress=False, train_fn=fake_train)
    key = model_key(data.source, config)
    assert [model_path(tmp_path, key, s).exists() for s in range(4)] == [True, True, False, False]
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written
    first = model_path(tmp_path, key, 0).stat().st_mtime_ns
    calls.clear()
    retrain_subsets(data, config, tmp_path, progress=False, train_fn=fake_train)
    assert calls == [2, 3]  # only the subsets not finished were trained
    assert model_path(tmp_path, key, 0).stat().st_mtime_ns == first


def test_test_images_are_class_balanced_and_subsets_are_halves():
    labels = torch.arange(1000) % 10
    idx = balanced_test_indices(labels, 50, seed=0)
    assert np.bincount(labels[idx].numpy(), minlength=10).tolist() == [5] * 10
    assert subset_mask(1000, 0.5, 3).sum() == 500
    assert not np.array_equal(subset_mask(1000, 0.5, 3), subset_mask(1000, 0.5, 4))


def test_adding_a_method_reuses_the_stored_subset_outputs_and_keeps_the_other_methods(tmp_path):
    """The subset models are gone: ``--methods X`` scores X against results/lds.npz, retrains nothing, keeps the rest."""
    import json
    from dataclasses import asdict

    from influence_over_inference.engine.io import save_npz_atomic, write_json_atomic
    from influence_over_inference.experiments.lds_run import run_lds
    from influence_over_inference.study.checkpoints import save_checkpoint
    from influence_over_inference.study.model import Net

    data, config = FakeData(), LDSConfig(n_subsets=3, n_test=10, n_test_subset=2, n_boot=20)
    checkpoint = save_checkpoint(Net(), tmp_path / "net.pt", {"recipe": {"weight_decay": 5e-4}})
    test_idx = balanced_test_indices(data.test.labels, config.n_test, config.test_seed)
    rng = np.random.default_rng(0)
    margins, losses = rng.normal(size=(3, 10)).astype(np.float32), rng.random((3, 10)).astype(np.float32)
    old = {"n_subsets": 3, "config": asdict(config), "data_source": data.source, "minutes": 7.0,
           "methods": {"fast": {"lds_margin": 0.5, "computed": True}}}
    write_json_atomic(old, tmp_path / "lds.json")
    save_npz_atomic(tmp_path / "lds.npz", test_indices=test_idx, subset_positions=np.array([1, 4]),
                    subsets=np.arange(3), margins=margins, losses=losses, fast_margin=np.ones(10, np.float32))
    r = run_lds(data, checkpoint, config, ("random",), cache_dir=tmp_path / "lds", out=tmp_path / "lds.json",
                arrays=tmp_path / "lds.npz")
    assert r["methods"]["fast"] == old["methods"]["fast"]  # untouched
    assert r["methods"]["random"]["computed"] and r["methods"]["random"]["n_test"] == 10
    from influence_over_inference.engine.hashing import file_sha256

    sha = file_sha256(checkpoint)  # which checkpoint each method's scores came from: "fast" came from an unrecorded one
    assert r["checkpoint_sha256"] == r["methods"]["random"]["checkpoint_sha256"] == sha
    assert r["methods_from_other_checkpoints"] == ["fast"]
    assert json.loads((tmp_path / "lds.json").read_text()) == r
    blob = np.load(tmp_path / "lds.npz")
    assert np.array_equal(blob["margins"], margins) and np.array_equal(blob["fast_margin"], np.ones(10))
    assert blob["random_margin"].shape == (10,)
    assert not list((tmp_path / "lds").glob("subset-*.pt"))  # no model was trained
    with pytest.raises(RuntimeError, match="train them first"):  # another config: the stored outputs don't apply
        run_lds(data, checkpoint, LDSConfig(n_subsets=3, n_test=10, n_test_subset=2, alpha=0.4), ("random",),
                cache_dir=tmp_path / "lds", out=tmp_path / "lds.json", arrays=tmp_path / "lds.npz")


def test_a_fast_ensemble_averages_its_members_and_caches_each(tmp_path):
    """fast_ens<k>: the checkpoint plus k-1 models of the default recipe (other seeds), scores averaged."""
    from test_validation import tiny_data

    from influence_over_inference.experiments import lds_methods as m
    from influence_over_inference.study.checkpoints import save_checkpoint
    from influence_over_inference.study.model import Net

    data = tiny_data(n_train_per_class=2, n_test=4)
    torch.manual_seed(0)
    checkpoint = save_checkpoint(Net(), tmp_path / "net.pt", {"recipe": {"weight_decay": 5e-4}})
    paths = m.ensemble_members(data, checkpoint, 2, tmp_path / "ens")
    assert len(paths) == 2 and paths[0] == checkpoint and paths[1].exists()
    x, y = data.test.tensors()
    scores, described = m.fast_ensemble_scores(paths, 5e-4, data.train, x, y, tmp_path / "scores")
    members = [np.load(p)["scores"] for p in sorted((tmp_path / "scores").glob("fast-member-*.npz"))]
    assert described["n_models"] == 2 and len(members) == 2 and scores.shape == (4, 20)
    np.testing.assert_allclose(scores, (members[0].astype(np.float64) + members[1]) / 2, rtol=1e-6)
    assert m.ensemble_members(data, checkpoint, 2, tmp_path / "ens") == paths  # cached: not retrained


def test_minutes_count_the_subset_models_and_each_method_once():
    from influence_over_inference.experiments.lds_run import total_minutes

    result = {"n_subsets": 50, "subset_model_minutes_mean": 1.2, "methods": {
        "fast": {"computed": True, "seconds": 120.0, "settings": {}},
        "fast_v1": {"computed": True, "seconds": 120.0, "settings": {"same_as": "fast"}},  # the same scores: not twice
        "trak_1": {"computed": False, "reason": "failed"},
        "random": {"computed": True, "seconds": 60.0}}}
    assert total_minutes(result) == pytest.approx(50 * 1.2 + 3.0)


def test_a_new_default_is_a_new_scores_cache_entry():
    from influence_over_inference.experiments.lds_run import _solver_key

    assert _solver_key("fast") != _solver_key("fast_v1")  # a new default is not served the old default's scores
    assert _solver_key("grad_dot") == ""
    assert _solver_key("fast_ens5") == _solver_key("fast")  # an ensemble's scores move with the default too
    assert _solver_key("fast_v1_ens5") == _solver_key("fast_v1")


def test_trak_runs_on_the_cpu_for_one_model_and_an_ensemble(tmp_path):
    """traker 0.3.2's two CPU traps (no experiments.json; the projector freed before scoring) stay avoided."""
    from test_validation import tiny_data

    from influence_over_inference.experiments.lds_methods import trak_scores
    from influence_over_inference.study.model import Net

    data = tiny_data(n_train_per_class=12, n_test=3)
    torch.manual_seed(0)
    a, b = Net(channels=(2, 2), hidden=(8, 8)), Net(channels=(2, 2), hidden=(8, 8))
    x, y = data.test.tensors()
    one, described = trak_scores(a, data.train, x, y, tmp_path / "trak", proj_dim=16, batch=50)
    assert one.shape == (3, 120) and np.isfinite(one).all() and described["n_models"] == 1
    again, _ = trak_scores(a, data.train, x, y, tmp_path / "trak", proj_dim=16, batch=50)  # a used save_dir
    np.testing.assert_allclose(again, one, rtol=1e-5, atol=1e-7)
    two, described = trak_scores([a, b], data.train, x, y, tmp_path / "trak", proj_dim=16, batch=50)
    assert two.shape == (3, 120) and np.isfinite(two).all() and described["n_models"] == 2


def test_a_paired_difference_is_the_mean_difference_with_a_narrower_interval_than_apart():
    rng = np.random.default_rng(1)
    shared = rng.normal(0, 1, 300)  # what both methods get right or wrong on each image
    a, b = shared + 0.05 + rng.normal(0, 0.05, 300), shared + rng.normal(0, 0.05, 300)
    a[3], b[7] = np.nan, np.nan  # an image either did not score is left out
    diff, (lo, hi), n = paired_difference(a, b, n_boot=2000)
    keep = np.isfinite(a) & np.isfinite(b)
    assert n == 298 and diff == pytest.approx((a[keep] - b[keep]).mean(), abs=1e-12)
    assert lo < diff < hi and lo > 0  # 0.05 apart, found apart
    lo_a, hi_a = bootstrap_ci(a, 2000)
    assert hi - lo < (hi_a - lo_a) / 5  # the shared part cancels: apart, the intervals overlap entirely
    with pytest.raises(ValueError, match="one length"):
        paired_difference(a, b[:10])


def _paired_result():
    rng = np.random.default_rng(2)
    per_test = {f"{name}_margin": rng.normal(mean, 0.01, 40 if name not in ("cg",) else 8)
                for name, mean in [("fast", 0.10), ("grad_dot", 0.02), ("kron", 0.12), ("cg", 0.30), ("old", 0.5),
                                   ("fast_ens3", 0.2), ("trak_3", 0.1), ("trak_1", 0.0)]}
    per_test["subset_positions"] = np.arange(0, 40, 5)
    sha = {"checkpoint_sha256": "new"}
    methods = {name: {"computed": True, "n_models": int(name[-1]) if name[-1].isdigit() else 1, **sha}
               for name in ("fast", "grad_dot", "kron", "cg", "fast_ens3", "trak_3", "trak_1")}
    methods["old"] = {"computed": True, "n_models": 1, "checkpoint_sha256": "earlier"}
    methods["lissa"] = {"computed": False, "reason": "failed"}
    return {"default_solver": "fast", "checkpoint_sha256": "new", "methods": methods, "config": {"n_boot": 500}}, per_test


def test_paired_comparisons_set_ours_against_methods_with_as_many_models_from_the_same_checkpoint():
    result, per_test = _paired_result()
    paired = paired_comparisons(result, per_test, n_boot=500)
    assert set(paired) == {"fast", "fast_ens3"}
    assert set(paired["fast"]) == {"grad_dot", "kron", "cg", "trak_1"}  # not the earlier checkpoint's, nor lissa, nor ensembles
    assert set(paired["fast_ens3"]) == {"trak_3"}
    g = paired["fast"]["grad_dot"]
    assert g["on"] == "all" and g["n_test"] == 40
    assert g["difference"] == pytest.approx((per_test["fast_margin"] - per_test["grad_dot_margin"]).mean())
    assert g["ci"][0] > 0 and paired["fast"]["kron"]["ci"][1] < 0  # ahead of one, behind the other
    c = paired["fast"]["cg"]  # a slow method: only on the subset, ours taken on the same images
    assert c["on"] == "subset" and c["n_test"] == 8
    assert c["difference"] == pytest.approx((per_test["fast_margin"][::5] - per_test["cg_margin"]).mean())


def test_compare_only_rewrites_the_comparisons_and_keeps_everything_else(tmp_path):
    import json

    from influence_over_inference.cli import main

    result, per_test = _paired_result()
    result["minutes"] = 12.5
    out, arrays = tmp_path / "lds.json", tmp_path / "lds.npz"
    out.write_text(json.dumps(result))
    np.savez(arrays, **per_test)
    main(["validate", "lds", "--compare-only", "--out", str(out), "--arrays", str(arrays)])  # no data and no checkpoint needed
    written = json.loads(out.read_text())
    assert written["minutes"] == 12.5 and written["methods"] == result["methods"]
    assert written["methods_from_other_checkpoints"] == ["old"]
    assert written["paired"] == json.loads(json.dumps(paired_comparisons(result, per_test, 500)))
    with pytest.raises(FileNotFoundError, match="run `validate lds` first"):
        compare_only(tmp_path / "none.json", arrays)
