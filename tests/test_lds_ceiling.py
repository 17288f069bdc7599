"""The LDS's noise ceiling: the formulas against a simulation where the answer is known, replicate
models trained on the same subsets with other seeds, and the ceiling kept when a method is added."""

from __future__ import annotations

import json
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import FakeData

from influence_over_inference.experiments.lds import (
    REPLICATE_SEED_STEP,
    LDSConfig,
    balanced_test_indices,
    model_key,
    model_path,
    retrain_subsets,
    subset_mask,
)
from influence_over_inference.experiments.lds_ceiling import (
    method_against_replicates,
    retest_reliability,
)
from influence_over_inference.experiments.lds_score import lds_per_test

CEILING_TOL = 0.02  # |oracle's LDS - ceiling|, 300 subsets x 200 test points (measured 0.0053 and 0.0058; prediction 0.0016)


def test_an_oracle_reaches_the_ceiling_and_the_mean_of_two_runs_raises_it():
    """Outputs = a linear function of the subset + independent noise of the same variance (r = 0.5):
    exact scores (the oracle) reach the ceiling against one run and the higher one against two."""
    rng = np.random.default_rng(0)
    n_train, n_subsets, n_test = 400, 300, 200
    masks = rng.random((n_subsets, n_train)) < 0.5
    scores = rng.normal(size=(n_test, n_train))  # the true effect of each training point
    signal = (masks @ scores.T).astype(np.float64)  # (S, T)
    signal = (signal - signal.mean(0)) / signal.std(0)
    first, second = (signal + rng.normal(size=signal.shape) for _ in range(2))
    summary, r = retest_reliability(first, second, n_boot=50)
    assert summary["retest"] == pytest.approx((6 / np.pi) * np.arcsin(0.25), abs=CEILING_TOL)  # Spearman of r=0.5
    assert r.shape == (n_test,) and summary["n_test"] == n_test
    r_mean = summary["retest"]  # the ceilings are of the mean r (upper bounds of the per-image ceilings' mean)
    assert summary["ceiling_one"] == pytest.approx(np.sqrt(r_mean))
    assert summary["ceiling_mean2"] == pytest.approx(np.sqrt(2 * r_mean / (1 + r_mean)))
    assert summary["ceiling_one_ci"] == pytest.approx(tuple(np.sqrt(summary["retest_ci"])))
    oracle_one = np.nanmean(lds_per_test(scores, masks, first, "margin"))
    oracle_two = np.nanmean(lds_per_test(scores, masks, (first + second) / 2, "margin"))
    assert oracle_one == pytest.approx(summary["ceiling_one"], abs=CEILING_TOL)
    assert oracle_two == pytest.approx(summary["ceiling_mean2"], abs=CEILING_TOL)
    assert summary["ceiling_mean2"] > summary["ceiling_one"] + 0.05
    out, per_test = method_against_replicates(scores, masks, {"margins": first, "losses": first},
                                              {"margins": second, "losses": second}, np.arange(n_test), r, n_boot=50)
    assert out["lds_margin_original"] == pytest.approx(oracle_one)
    assert out["lds_margin_mean2"] == pytest.approx(oracle_two)
    assert out["predicted_mean2"] == pytest.approx(out["lds_margin_mean2"], abs=CEILING_TOL)
    assert set(per_test) == {"original", "replicate", "mean2"}
    assert -1 <= out["spearman_with_retest"] <= 1


def test_the_test_images_with_less_noisy_outputs_get_the_higher_lds():
    rng = np.random.default_rng(2)
    masks = rng.random((200, 300)) < 0.5
    scores = rng.normal(size=(100, 300))
    signal = masks @ scores.T
    signal = (signal - signal.mean(0)) / signal.std(0)
    noise = np.linspace(0.2, 3.0, 100)  # per test point
    first, second = (signal + noise * rng.normal(size=signal.shape) for _ in range(2))
    _, r = retest_reliability(first, second, n_boot=10)
    out, _ = method_against_replicates(scores, masks, {"margins": first, "losses": first},
                                       {"margins": second, "losses": second}, np.arange(100), r, n_boot=10)
    assert out["spearman_with_retest"] > 0.8  # measured 0.94


def test_runs_that_agree_fully_have_ceiling_one_and_shapes_are_checked():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(20, 5))
    summary, _ = retest_reliability(a, a * 3 + 1, n_boot=10)
    assert summary["retest"] == pytest.approx(1.0) and summary["ceiling_one"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one shape"):
        retest_reliability(a, a[:, :4])


def _fake_train(calls):
    from influence_over_inference.study.model import Net

    def train(split, recipe, progress=False):
        calls.append((recipe.seed, len(split)))
        torch.manual_seed(recipe.seed)
        return SimpleNamespace(model=Net())

    return train


def test_a_replicate_trains_the_same_subset_with_another_seed_and_keeps_the_original(tmp_path, monkeypatch):
    from influence_over_inference.experiments import retraining

    seen = []
    monkeypatch.setattr(retraining, "subset_split", lambda split, idx: seen.append(idx.numpy()) or split)
    data, config = FakeData(), LDSConfig(n_subsets=2, n_test=10, n_test_subset=2)
    calls = []
    retrain_subsets(data, config, tmp_path, progress=False, train_fn=_fake_train(calls))
    retrain_subsets(data, config, tmp_path, progress=False, train_fn=_fake_train(calls), replicate=1)
    assert [c[0] for c in calls] == [0, 1, REPLICATE_SEED_STEP, 1 + REPLICATE_SEED_STEP]
    assert np.array_equal(seen[0], seen[2]) and np.array_equal(seen[1], seen[3])  # the same halves
    assert np.array_equal(seen[0], np.flatnonzero(subset_mask(40, 0.5, 0)))
    key = model_key(data.source, config)
    original, replicate = (torch.load(model_path(tmp_path, key, 0, r), weights_only=True) for r in (0, 1))
    assert original["train_seed"] == 0 and replicate["train_seed"] == REPLICATE_SEED_STEP
    assert not torch.equal(original["test_logits"], replicate["test_logits"])
    calls.clear()
    retrain_subsets(data, config, tmp_path, progress=False, train_fn=_fake_train(calls), replicate=1)
    assert calls == []  # resumable: nothing retrained
    with pytest.raises(ValueError, match="replicate"):
        retrain_subsets(data, config, tmp_path, progress=False, train_fn=_fake_train(calls), replicate=-1)


def test_the_ceiling_is_added_to_the_result_and_kept_when_a_method_is_added(tmp_path, monkeypatch):
    from influence_over_inference.engine.hashing import file_sha256
    from influence_over_inference.engine.io import save_npz_atomic, write_json_atomic
    from influence_over_inference.experiments import retraining
    from influence_over_inference.experiments.lds_ceiling import run_ceiling
    from influence_over_inference.experiments.lds_run import run_lds, scores_key, scores_path
    from influence_over_inference.study.checkpoints import save_checkpoint
    from influence_over_inference.study.model import Net

    monkeypatch.setattr(retraining, "subset_split", lambda split, idx: split)
    data, config = FakeData(), LDSConfig(n_subsets=3, n_test=10, n_test_subset=2, n_boot=20)
    checkpoint = save_checkpoint(Net(), tmp_path / "net.pt", {"recipe": {"weight_decay": 5e-4}})
    sha = file_sha256(checkpoint)
    test_idx = balanced_test_indices(data.test.labels, config.n_test, config.test_seed)
    rng = np.random.default_rng(0)
    margins, losses = rng.normal(size=(3, 10)).astype(np.float32), rng.random((3, 10)).astype(np.float32)
    result = {"n_subsets": 3, "config": asdict(config), "data_source": data.source, "checkpoint_sha256": sha,
              "methods": {"grad_dot": {"computed": True, "checkpoint_sha256": sha},
                          "old": {"computed": True, "checkpoint_sha256": "another"}}}
    out, arrays, cache = tmp_path / "lds.json", tmp_path / "lds.npz", tmp_path / "lds"
    write_json_atomic(result, out)
    save_npz_atomic(arrays, test_indices=test_idx, subset_positions=np.array([1, 4]), subsets=np.arange(3),
                    margins=margins, losses=losses, grad_dot_margin=np.ones(10, np.float32))
    scores = rng.normal(size=(10, 40)).astype(np.float32)
    save_npz_atomic(scores_path(cache / "scores", "grad_dot", scores_key(sha, data.source, test_idx), np.array([1, 4])),
                    scores=scores, seconds=np.float64(1.0))
    result["methods"]["fast"] = {"computed": True, "checkpoint_sha256": sha}  # the default: set against grad_dot
    write_json_atomic(result, out)
    save_npz_atomic(scores_path(cache / "scores", "fast", scores_key(sha, data.source, test_idx), np.array([1, 4])),
                    scores=scores + rng.normal(size=scores.shape).astype(np.float32), seconds=np.float64(1.0))
    with pytest.raises(RuntimeError, match="replicate models"):  # none trained yet
        run_ceiling(data, config, cache, out, arrays)
    retrain_subsets(data, config, cache, progress=False, train_fn=_fake_train([]), replicate=1)
    r = run_ceiling(data, config, cache, out, arrays)
    c = r["noise_ceiling"]
    assert set(c["methods"]) == {"grad_dot", "fast"} and set(c["skipped"]) == {"old"}
    assert -1 <= c["retest"] <= 1 and c["methods"]["grad_dot"]["n_test"] == 10
    assert json.loads(out.read_text())["noise_ceiling"] == json.loads(json.dumps(c))
    blob = dict(np.load(arrays))
    assert blob["ceiling_replicate_margins"].shape == (3, 10) and blob["ceiling_grad_dot_vs_mean2"].shape == (10,)
    assert np.array_equal(blob["margins"], margins)  # the original runs' outputs untouched
    paired = c["paired_mean2"]["fast"]["grad_dot"]  # ours against the rest, on the mean of the two runs
    both = np.isfinite(blob["ceiling_fast_vs_mean2"]) & np.isfinite(blob["ceiling_grad_dot_vs_mean2"])
    assert paired["difference"] == pytest.approx(
        float((blob["ceiling_fast_vs_mean2"] - blob["ceiling_grad_dot_vs_mean2"])[both].mean()), abs=1e-6)
    r = run_lds(data, checkpoint, config, ("random",), cache_dir=cache, out=out, arrays=arrays)  # add a method
    assert r["noise_ceiling"]["methods"].keys() == {"grad_dot", "fast"}
    kept = dict(np.load(arrays))
    assert np.array_equal(kept["ceiling_replicate_margins"], blob["ceiling_replicate_margins"])
    assert "random_margin" in kept and "ceiling_retest_on_margins" in kept
    scores_path(cache / "scores", "grad_dot", scores_key(sha, data.source, test_idx), np.array([1, 4])).unlink()
    r = run_lds(data, checkpoint, config, ("grad_dot",), cache_dir=cache, out=out, arrays=arrays)  # rescored
    assert "grad_dot" not in r["noise_ceiling"]["methods"]  # its ceiling rows were stale
    assert "ceiling_grad_dot_vs_mean2" not in dict(np.load(arrays))
