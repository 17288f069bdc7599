"""Tests that kill the one-line bugs an audit found the suite let through (issue 15), each
asserting what a user would notice: a checkpoint that runs code when loaded, LiSSA returning NaN
or a factor-``repeat`` answer instead of failing or converging, stale cached scores served for
another model or recipe, the ``influence`` command ignoring the checkpoint's weight decay, and the
sign experiment removing the wrong images (float64, tiny models, seconds)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from conftest import PicklePayload
from engine_models import blobs, fit, logistic, mlp

from influence_over_inference.commands.influence import _weight_decay
from influence_over_inference.engine.gradients import grad_z
from influence_over_inference.engine.influence_engine import InfluenceEngine
from influence_over_inference.engine.solvers.lissa import LiSSADivergenceError
from influence_over_inference.engine.solvers.registry import make_solver
from influence_over_inference.experiments.sign import removal_lists
from influence_over_inference.study.checkpoints import FORMAT, CheckpointError, load_checkpoint
from influence_over_inference.study.model import Net

WD = 1e-3
LISSA_REL = 0.05  # LiSSA (converged, 3 repetitions) vs exact, relative error of the whole vector


def test_checkpoint_loader_refuses_a_pickle_payload_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    net = Net(channels=(2, 2), hidden=(4, 4))
    torch.save({"format": FORMAT, "version": 1, "architecture": "Net", "config": net.config,
                "state_dict": net.state_dict(), "metadata": {"x": PicklePayload(marker)}}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects|not a readable PyTorch checkpoint"):
        load_checkpoint(path)
    assert not marker.exists(), "loading the checkpoint ran code from its pickle"


def _lissa_problem(n=40):
    torch.manual_seed(0)
    x, y = blobs(n, (5,), 3, seed=0)
    model = fit(logistic(), x, y, WD, steps=50)
    return model, x, y, grad_z(model, x[:2], y[:2])


def test_lissa_reports_nan_as_divergence_instead_of_returning_it():
    model, x, y, v = _lissa_problem()
    lissa = make_solver("lissa", damping=0.1, scale=50.0, depth=20, batch_size=10).fit(model, x, y, weight_decay=WD)
    bad = x[:10].clone()
    bad[0, 0] = float("nan")  # a NaN never exceeds the norm limit: only the finiteness check sees it
    with pytest.raises(LiSSADivergenceError):
        lissa.inverse_hvp(v, batches=[(bad, y[:10])] * 20)


def test_lissa_detects_divergence_early_not_only_at_the_last_step():
    model, x, y, v = _lissa_problem()
    exact = make_solver("exact", damping=0.01).fit(model, x, y, weight_decay=WD)
    top = float(torch.linalg.eigvalsh(exact.matrix)[-1])
    depth = 5000
    lissa = make_solver("lissa", damping=0.01, scale=top / 20, depth=depth, batch_size=20, check_every=10)
    lissa.fit(model, x, y, weight_decay=WD)
    with pytest.raises(LiSSADivergenceError) as info:
        lissa.inverse_hvp(v)
    step = int(re.search(r"diverged at step (\d+)", str(info.value)).group(1))
    assert step < depth // 10, f"divergence noticed only at step {step} of {depth}"


def test_lissa_repetitions_are_averaged_relative_error_not_only_cosine():
    model, x, y, v = _lissa_problem()
    exact = make_solver("exact", damping=0.1).fit(model, x, y, weight_decay=WD)
    top = float(torch.linalg.eigvalsh(exact.matrix)[-1])
    want = exact.inverse_hvp(v)
    for repeat in (1, 3):
        lissa = make_solver("lissa", damping=0.1, scale=2 * top, depth=400, batch_size=40, repeat=repeat)
        got = lissa.fit(model, x, y, weight_decay=WD).inverse_hvp(v)
        assert float((got - want).norm() / want.norm()) < LISSA_REL, repeat


def _engine(model, x, y, checkpoint, cache, **over):
    kw = dict(solver=make_solver("fast", damping=0.1, rank=30, n_samples=20), weight_decay=WD, layers=None,
              data_source="blobs")
    kw.update(over)
    return InfluenceEngine(model, (x, y), kw.pop("solver"), cache_dir=cache, checkpoint=checkpoint, progress=False, **kw)


def test_cache_key_changes_with_each_component(tmp_path):
    torch.manual_seed(0)
    x, y = blobs(30, (6,), 3, seed=4)
    model = mlp().eval()
    ckpt = tmp_path / "a.pt"
    torch.save(model.state_dict(), ckpt)
    cache = tmp_path / "influence"
    base = _engine(model, x, y, ckpt, cache)
    key = base.cache_path("scores", {"test": "t"})
    assert key == _engine(model, x, y, ckpt, cache).cache_path("scores", {"test": "t"})  # deterministic
    other_ckpt = tmp_path / "b.pt"
    torch.save({k: v + 1 for k, v in model.state_dict().items()}, other_ckpt)
    variants = {
        "checkpoint bytes": _engine(model, x, y, other_ckpt, cache),
        "data identity": _engine(model, x, y, ckpt, cache, data_source="other"),
        "n_train": _engine(model, x[:29], y[:29], ckpt, cache),
        "weight decay": _engine(model, x, y, ckpt, cache, weight_decay=2 * WD),
        "damping": _engine(model, x, y, ckpt, cache, solver=make_solver("fast", damping=0.2, rank=30, n_samples=20)),
        "solver settings": _engine(model, x, y, ckpt, cache, solver=make_solver("fast", damping=0.1, rank=31, n_samples=20)),
        "solver": _engine(model, x, y, ckpt, cache, solver=make_solver("exact", damping=0.1)),
        "layers": _engine(model, x, y, ckpt, cache, layers=["1"]),
    }
    for what, engine in variants.items():
        assert engine.cache_path("scores", {"test": "t"}) != key, f"{what} is not part of the cache key"
    assert base.cache_path("scores", {"test": "u"}) != key, "the test images are not part of the cache key"
    assert base.cache_path("curvature") != base.cache_path("self_influence")
    assert key.parent == cache and key.name.startswith("scores-fast-")


def test_cached_scores_are_not_served_for_another_weight_decay(tmp_path):
    torch.manual_seed(0)
    x, y = blobs(30, (6,), 3, seed=4)
    model = fit(mlp(), x, y, WD, steps=30)
    ckpt = tmp_path / "a.pt"
    torch.save(model.state_dict(), ckpt)
    exact = dict(solver=make_solver("exact", damping=0.0))
    first = _engine(model, x, y, ckpt, tmp_path / "c", weight_decay=0.01, **exact).scores(x[:2], y[:2])
    exact = dict(solver=make_solver("exact", damping=0.0))
    second = _engine(model, x, y, ckpt, tmp_path / "c", weight_decay=1.0, **exact).scores(x[:2], y[:2])
    assert not torch.allclose(first, second), "scores for weight decay 0.01 served for weight decay 1"


@pytest.mark.parametrize("meta,want", [({"recipe": {"weight_decay": 5e-4}}, 5e-4), ({"weight_decay": 0.25}, 0.25),
                                       ({}, 0.0)])
def test_influence_command_uses_the_checkpoints_weight_decay(meta, want):
    assert _weight_decay(SimpleNamespace(weight_decay=None), meta) == want
    assert _weight_decay(SimpleNamespace(weight_decay=0.125), meta) == 0.125  # the flag wins
    with pytest.raises(ValueError, match="must be >= 0"):
        _weight_decay(SimpleNamespace(weight_decay=-1.0), meta)


def test_influence_command_passes_the_checkpoints_weight_decay_to_the_engine(tmp_path, monkeypatch):
    from conftest import make_image_folder

    import influence_over_inference.commands.influence as command
    from influence_over_inference.cli import main
    from influence_over_inference.study.checkpoints import save_checkpoint

    seen = []
    real = command.InfluenceEngine

    def spy(*args, **kw):
        seen.append(kw["weight_decay"])
        return real(*args, **kw)

    monkeypatch.setattr(command, "InfluenceEngine", spy)
    folder = tmp_path / "cifar"
    make_image_folder(folder, n_train_per_class=2, n_test_per_class=1)
    torch.manual_seed(0)
    ckpt = save_checkpoint(Net(channels=(2, 2), hidden=(4, 4)), tmp_path / "net.pt", {"recipe": {"weight_decay": 0.0375}})
    args = ["influence", "--data", str(folder), "--data-root", str(tmp_path), "--checkpoint", str(ckpt),
            "--test-index", "0", "--k", "2", "--solver", "fast", "--n-samples", "5", "--rank", "5", "--no-cache",
            "--out", str(tmp_path / "res")]
    assert main(args) == 0
    assert seen == [0.0375]


def test_sign_lists_point_in_the_right_direction():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 50, generator=gen, dtype=torch.float64)
    harmful, helpful = removal_lists(scores, 5)
    assert harmful.shape == helpful.shape == (3, 5)
    for k in range(3):
        h, p = scores[k, harmful[k]], scores[k, helpful[k]]
        assert torch.equal(h, scores[k].sort().values[:5]), "harmful = the five most negative scores, most negative first"
        assert torch.equal(p, scores[k].sort(descending=True).values[:5]), "helpful = the five most positive, largest first"
        assert h.max() < 0 < p.min()
