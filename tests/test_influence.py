"""Influence scores: the sign convention tested by retraining (remove the most helpful point ->
the test loss rises), predicted vs actual leave-one-out, chunk-size invariance, self-influence,
top-k, the engine's cache, and clear errors (float64, tiny models)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import PicklePayload
from engine_models import UserSplit, blobs, fit, logistic, mlp
from torch import nn

from influence_over_inference.engine.gradients import grad_z
from influence_over_inference.engine.influence_engine import InfluenceEngine
from influence_over_inference.engine.params import pick_images
from influence_over_inference.engine.scores import influence, s_test, self_influence, top_k
from influence_over_inference.engine.solvers.registry import make_solver

WD = 1e-2
LOO_PEARSON = 0.95  # predicted vs actual leave-one-out change over the 20 most influential points
EXACT = 1e-10


@pytest.fixture(scope="module")
def convex():
    """Logistic regression trained to convergence, a test point it gets wrong, the exact-Hessian solver."""
    torch.manual_seed(0)
    x, y = blobs(80, (5,), 3, seed=0, noise=1.5)
    xt, yt = blobs(40, (5,), 3, seed=1, noise=1.5)
    model = fit(logistic(), x, y, WD, steps=500)
    with torch.no_grad():
        losses = nn.functional.cross_entropy(model(xt), yt, reduction="none")
    t = int(losses.argsort()[-5])  # a clearly mispredicted test point, not the most extreme
    solver = make_solver("exact", curvature="hessian", damping=0.0).fit(model, x, y, weight_decay=WD)
    return model, x, y, xt[t : t + 1], yt[t : t + 1], solver


def retrained_test_loss(model, x, y, xt, yt, drop):
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[drop] = False
    m = fit(copy.deepcopy(model), x[keep], y[keep], WD, steps=500, tol=1e-14)
    with torch.no_grad():
        return float(nn.functional.cross_entropy(m(xt), yt))


def test_sign_removing_helpful_raises_and_harmful_lowers_the_test_loss(convex):
    model, x, y, xt, yt, solver = convex
    scores = influence(model, xt, yt, (x, y), solver)[0]
    with torch.no_grad():
        base = float(nn.functional.cross_entropy(model(xt), yt))
    helpful, harmful = int(scores.argmax()), int(scores.argmin())
    assert scores[helpful] > 0 > scores[harmful]
    assert retrained_test_loss(model, x, y, xt, yt, helpful) > base
    assert retrained_test_loss(model, x, y, xt, yt, harmful) < base


def test_predicted_matches_actual_leave_one_out(convex):
    model, x, y, xt, yt, solver = convex
    scores = influence(model, xt, yt, (x, y), solver)[0]
    with torch.no_grad():
        base = float(nn.functional.cross_entropy(model(xt), yt))
    top = scores.abs().argsort(descending=True)[:20]
    actual = torch.tensor([retrained_test_loss(model, x, y, xt, yt, int(j)) - base for j in top], dtype=torch.float64)
    predicted = scores[top]
    r = torch.corrcoef(torch.stack([predicted, actual]))[0, 1]
    assert r >= LOO_PEARSON, (r, predicted, actual)


def test_scores_equal_the_formula_and_do_not_depend_on_chunk_size():
    torch.manual_seed(0)
    x, y = blobs(50, (6,), 3, seed=2)
    model = fit(mlp(), x, y, WD, steps=50)
    solver = make_solver("exact", damping=0.1).fit(model, x, y, weight_decay=WD)
    xt, yt = x[:3] + 0.1, y[:3]
    expect = solver.inverse_hvp(grad_z(model, xt, yt)) @ grad_z(model, x, y).T / len(x)
    for chunk in (1, 7, 50):
        assert torch.allclose(influence(model, xt, yt, (x, y), solver, chunk_size=chunk), expect, atol=EXACT, rtol=0)
    assert torch.allclose(s_test(model, xt, yt, solver) @ grad_z(model, x, y).T / len(x), expect, atol=EXACT, rtol=0)


@pytest.mark.parametrize("name", ["exact", "fast"])
def test_self_influence_is_the_diagonal_of_train_on_train_scores(name):
    torch.manual_seed(0)
    x, y = blobs(40, (6,), 3, seed=3)
    model = fit(mlp(), x, y, WD, steps=50)
    solver = make_solver(name, damping=0.1).fit(model, x, y, weight_decay=WD)
    full = influence(model, x, y, (x, y), solver)
    si = self_influence(model, (x, y), solver, chunk_size=9)
    assert torch.allclose(si, full.diagonal(), atol=EXACT, rtol=1e-9)
    assert (si > 0).all()


def test_top_k_orders_helpful_and_harmful():
    scores = torch.tensor([[0.5, -2.0, 3.0, 0.0, -0.1]], dtype=torch.float64)
    tk = top_k(scores, 2)
    assert tk.helpful.tolist() == [[2, 0]] and tk.harmful.tolist() == [[1, 4]]
    assert tk.helpful_scores.tolist() == [[3.0, 0.5]] and tk.harmful_scores.tolist() == [[-2.0, -0.1]]
    with pytest.raises(ValueError, match="k must be between 1"):
        top_k(scores, 6)


def test_engine_caches_curvature_and_scores(tmp_path):
    torch.manual_seed(0)
    x, y = blobs(40, (6,), 3, seed=4)
    model = fit(mlp(), x, y, WD, steps=50)
    checkpoint = tmp_path / "model.pt"
    torch.save(model.state_dict(), checkpoint)
    cache = tmp_path / "influence"

    def engine():
        return InfluenceEngine(model, (x, y), make_solver("fast", damping=0.1, rank=30, n_samples=20), weight_decay=WD,
                               cache_dir=cache, checkpoint=checkpoint, data_source="blobs", progress=False)

    first = engine()
    scores = first.scores(x[:2], y[:2])
    assert not first.scores_from_cache  # computed: a caller may time it
    si = first.self_influence()
    names = sorted(p.name for p in cache.iterdir())
    assert len(names) == 3 and all(n.endswith(".pt") for n in names), names  # curvature, scores, self-influence
    second = engine()
    second.solver._fit = lambda: pytest.fail("refitted although the curvature was cached")
    assert torch.equal(second.scores(x[:2], y[:2]), scores)
    assert second.scores_from_cache  # read back: the notebook says so instead of timing a file read
    assert torch.equal(second.self_influence(), si)
    third = engine()  # other test images: scores recomputed from the cached curvature, no refit
    third.solver._fit = lambda: pytest.fail("refitted although the curvature was cached")
    assert torch.allclose(third.scores(x[2:4], y[2:4]), scores.new_tensor(influence(model, x[2:4], y[2:4], (x, y), first.solver)))
    assert not third.scores_from_cache
    other = InfluenceEngine(model, (x, y), make_solver("fast", damping=0.2, rank=30, n_samples=20), weight_decay=WD,
                            cache_dir=cache, checkpoint=checkpoint, data_source="blobs", progress=False)
    assert other.cache_path("scores") != first.cache_path("scores")  # settings are part of the key


def test_bad_inputs_raise_clear_errors():
    torch.manual_seed(0)
    x, y = blobs(20, (6,), 3, seed=5)
    model = mlp().eval()
    solver = make_solver("exact", damping=0.1).fit(model, x, y, weight_decay=WD)
    with pytest.raises(ValueError, match="out of range"):
        pick_images((x, y), [3, 20])
    with pytest.raises(ValueError, match="NaN"):
        influence(model, torch.full((1, 6), float("nan"), dtype=torch.float64), y[:1], (x, y), solver)
    with pytest.raises(ValueError, match="labels must have shape"):
        s_test(model, x[:2], y[:3], solver)
    with pytest.raises(ValueError, match="fit the solver first"):
        s_test(model, x[:2], y[:2], make_solver("cg"))


def test_cli_prints_top_k_and_writes_json_and_npz(tmp_path, capsys):
    import json

    import numpy as np
    from conftest import make_image_folder

    from influence_over_inference.cli import main
    from influence_over_inference.study.checkpoints import save_checkpoint
    from influence_over_inference.study.model import Net

    folder = tmp_path / "cifar"
    make_image_folder(folder, n_train_per_class=3, n_test_per_class=1)
    torch.manual_seed(0)
    checkpoint = save_checkpoint(Net(channels=(2, 2), hidden=(8, 8)), tmp_path / "net.pt", {"recipe": {"weight_decay": 5e-4}})
    args = ["influence", "--data", str(folder), "--data-root", str(tmp_path), "--checkpoint", str(checkpoint),
            "--test-index", "0", "4", "--k", "3", "--solver", "fast", "--n-samples", "10", "--rank", "20",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "res")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "most helpful" in out and "most harmful" in out and "test image 4" in out
    report = json.loads((tmp_path / "res.json").read_text())
    assert [t["test_index"] for t in report["tests"]] == [0, 4]
    first = report["tests"][0]
    assert len(first["helpful"]) == 3 and first["helpful"][0]["score"] >= first["helpful"][-1]["score"]
    assert first["harmful"][0]["score"] <= first["harmful"][-1]["score"]
    assert {"index", "class", "name", "score"} <= set(first["helpful"][0])
    scores = np.load(tmp_path / "res.npz")["scores"]
    assert scores.shape == (2, 30)
    assert first["helpful"][0]["score"] == pytest.approx(float(scores[0].max()), rel=1e-5)
    assert main(args[:-2] + ["--out", str(tmp_path / "again")]) == 0  # from the cache
    assert np.array_equal(np.load(tmp_path / "again.npz")["scores"], scores)
    assert main(args[:7] + ["--test-index", "10"]) == 2
    assert "out of range" in capsys.readouterr().err


def _small_engine(tmp_path, progress=False, n=30):
    torch.manual_seed(0)
    x, y = blobs(n, (6,), 3, seed=4)
    model = fit(mlp(), x, y, WD, steps=30)
    checkpoint = tmp_path / "model.pt"
    tmp_path.mkdir(parents=True, exist_ok=True)
    if not checkpoint.exists():
        torch.save(model.state_dict(), checkpoint)
    engine = InfluenceEngine(model, (x, y), make_solver("fast", damping=0.1, rank=20, n_samples=10), weight_decay=WD,
                             cache_dir=tmp_path / "influence", checkpoint=checkpoint, data_source="blobs", progress=progress)
    return engine, x, y


def test_cache_key_is_the_documented_hash_whatever_the_order_of_its_parts(tmp_path):
    """Keys of entries users already have must not change silently (a format change bumps CACHE_VERSION)."""
    import hashlib
    import json

    from influence_over_inference.engine.hashing import file_sha256
    from influence_over_inference.engine.influence_engine import CACHE_VERSION

    engine, x, _ = _small_engine(tmp_path)
    parts = {"kind": "scores", "version": CACHE_VERSION, "checkpoint": file_sha256(tmp_path / "model.pt"),
             "data_source": "blobs", "n_train": len(x), "weight_decay": WD, "layers": None,
             "solver": engine.solver.describe(), "test": "0123"}
    documented = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    assert engine.cache_key("scores", {"test": "0123"}) == documented
    assert engine.cache_key("scores", {"a": 1, "b": 2}) == engine.cache_key("scores", {"b": 2, "a": 1})
    # settings that JSON cannot write (a dtype, a path) still key the entry, by their text
    assert engine.cache_key("scores", {"dtype": torch.float32}) != engine.cache_key("scores", {"dtype": torch.float64})
    assert engine.cache_key("scores", {"p": tmp_path / "a"}) != engine.cache_key("scores", {"p": tmp_path / "b"})


def test_top_k_defaults_to_ten_and_is_none_where_there_are_no_scores(tmp_path, monkeypatch):
    engine, x, y = _small_engine(tmp_path)
    assert engine.top_k(x[:2], y[:2]).helpful.shape == (2, 10)
    three = engine.top_k(x[:2], y[:2], k=3)
    assert three.helpful.shape == three.harmful.shape == (2, 3)
    monkeypatch.setattr(engine, "scores", lambda *a: None)  # another rank under torch.distributed
    assert engine.top_k(x[:2], y[:2]) is None


def test_self_influence_is_read_back_from_its_cache_entry_not_recomputed(tmp_path, monkeypatch):
    from influence_over_inference.engine import influence_engine

    first, _, _ = _small_engine(tmp_path)
    values = first.self_influence()
    second, _, _ = _small_engine(tmp_path)
    monkeypatch.setattr(influence_engine, "self_influence", lambda *a: pytest.fail("recomputed a cached self-influence"))
    assert torch.equal(second.self_influence(), values)
    # an entry of the wrong length under the right key (a damaged cache) is recomputed, not served
    path = second.cache_path("self_influence")
    torch.save({"key": second.cache_key("self_influence"), "value": {"self_influence": values[:-1]}}, path)
    monkeypatch.setattr(influence_engine, "self_influence", lambda *a: values + 1)
    assert torch.equal(_small_engine(tmp_path)[0].self_influence(), values + 1)


def test_self_influence_shows_progress_only_when_asked(tmp_path, capsys):
    quiet, _, _ = _small_engine(tmp_path / "quiet", progress=False)
    quiet.fit()
    capsys.readouterr()
    quiet.self_influence()
    assert capsys.readouterr().err == ""
    loud, _, _ = _small_engine(tmp_path / "loud", progress=True)
    loud.fit()
    capsys.readouterr()
    loud.self_influence()
    assert "self-influence" in capsys.readouterr().err


def test_scores_are_read_back_from_their_entry_keyed_by_the_test_images(tmp_path, monkeypatch):
    import hashlib

    from influence_over_inference.engine import influence_engine

    first, x, y = _small_engine(tmp_path)
    scores = first.scores(x[:2], y[:2])
    h = hashlib.sha256(x[:2].numpy().tobytes())
    h.update(y[:2].numpy().tobytes())
    assert first._test_key(x[:2], y[:2]) == {"test": h.hexdigest()[:16]}  # the documented key of a test batch
    second, _, _ = _small_engine(tmp_path)
    monkeypatch.setattr(influence_engine, "influence", lambda *a: pytest.fail("recomputed cached scores"))
    assert torch.equal(second.scores(x[:2], y[:2]), scores)
    # other test images have their own entry; a damaged entry (wrong shape under the right key) is recomputed
    monkeypatch.setattr(influence_engine, "influence", lambda model, tx, *a: torch.zeros(len(tx), len(x)))
    assert torch.equal(second.scores(x[2:5], y[2:5]), torch.zeros(3, len(x)))
    path = second.cache_path("scores", second._test_key(x[:2], y[:2]))
    torch.save({"key": second.cache_key("scores", second._test_key(x[:2], y[:2])), "value": {"scores": scores[:, :-1]}}, path)
    assert torch.equal(_small_engine(tmp_path)[0].scores(x[:2], y[:2]), torch.zeros(2, len(x)))


def test_scores_check_test_labels_against_the_models_classes_and_show_progress_only_when_asked(tmp_path, capsys):
    quiet, x, y = _small_engine(tmp_path / "quiet")
    quiet.model.config = {"n_classes": 3}  # the project's Net carries its class count
    with pytest.raises(ValueError, match=r"^test data: labels must lie in \[0, 3\), found 0\.\.3"):
        quiet.scores(x[:2], torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"^test data: labels must have shape \(2,\)"):
        quiet.scores(x[:2], y[:3])
    quiet.fit()
    capsys.readouterr()
    quiet.scores(x[:2], y[:2])
    assert capsys.readouterr().err == ""
    loud, _, _ = _small_engine(tmp_path / "loud", progress=True)
    loud.fit()
    capsys.readouterr()
    loud.scores(x[:2], y[:2])
    assert "scoring training images" in capsys.readouterr().err


def test_unusable_cache_entries_are_named_in_one_warning_and_recomputed(tmp_path, caplog, monkeypatch):
    """Another key, a damaged file, a pickle payload (refused without running it, whatever the environment
    says about torch.load's default): each is ignored with one line naming the file and why."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    engine, x, y = _small_engine(tmp_path)
    values = engine.self_influence()
    path = engine.cache_path("self_influence")

    def reread():
        caplog.clear()
        with caplog.at_level("WARNING"):
            fresh = _small_engine(tmp_path)[0]
            assert torch.allclose(fresh.self_influence(), values, rtol=1e-12, atol=0)
        return [r.getMessage() for r in caplog.records]

    torch.save({"key": "0" * 64, "value": {"self_influence": values + 1}}, path)
    assert reread() == [f"ignoring cache entry {path.name} (it was stored under another key)"]
    path.write_bytes(b"\x80\x02")  # a cut-off pickle: EOFError, whose message is empty
    assert reread() == [f"ignoring cache entry {path.name} (EOFError)"]
    marker = tmp_path / "code-ran"
    torch.save({"key": engine.cache_key("self_influence"), "value": {"self_influence": PicklePayload(marker)}}, path)
    warned = reread()
    assert len(warned) == 1 and warned[0].startswith(f"ignoring cache entry {path.name} (Weights only load failed")
    assert not marker.exists(), "reading the cache ran code from its pickle"


def test_the_engine_passes_its_progress_setting_to_the_solvers_fit(tmp_path, capsys):
    loud, _, _ = _small_engine(tmp_path, progress=True)
    capsys.readouterr()
    loud.fit()
    assert "fast solver: GGN factor" in capsys.readouterr().err


def test_engine_defaults_no_weight_decay_a_relative_cache_folder_and_the_splits_own_source(tmp_path, monkeypatch):
    engine, x, y = _small_engine(tmp_path)
    checkpoint = tmp_path / "model.pt"
    monkeypatch.chdir(tmp_path)
    plain = InfluenceEngine(engine.model, (x, y), make_solver("fast", damping=0.1, rank=20, n_samples=10), checkpoint=checkpoint)
    plain.fit()
    assert plain.solver.weight_decay == 0.0
    assert str(plain.cache_path("scores").parent) == "data/influence"  # beside the working directory's data/

    def key(train, **kw):
        return InfluenceEngine(engine.model, train, make_solver("fast", damping=0.1, rank=20, n_samples=10),
                               checkpoint=checkpoint, cache_dir=tmp_path / "c", **kw).cache_key("scores")

    assert key(UserSplit(x, y, "a")) == key((x, y), data_source="a")  # the split's own source when none is given
    assert key(UserSplit(x, y, "a")) != key(UserSplit(x, y, "b"))
    assert key((x, y)) == key((x, y), data_source="unknown")  # a pair has no source of its own


def test_cache_file_names_are_kind_solver_checkpoint_and_key(tmp_path):
    from influence_over_inference.engine.hashing import file_sha256

    engine, _, _ = _small_engine(tmp_path)
    sha = file_sha256(tmp_path / "model.pt")
    for kind, extra in (("scores", {"test": "0123"}), ("curvature", None)):
        want = f"{kind}-fast-{sha[:8]}-{engine.cache_key(kind, extra)[:16]}.pt"
        assert engine.cache_path(kind, extra) == tmp_path / "influence" / want
    assert engine.cache_key("scores") != engine.cache_key("self_influence")


def test_engine_fits_once_and_shows_progress_by_default(tmp_path, monkeypatch):
    engine, x, y = _small_engine(tmp_path)
    calls = []
    real = engine.solver.fit
    monkeypatch.setattr(engine.solver, "fit", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    engine.fit()
    engine.scores(x[:2], y[:2])
    engine.fit()
    assert calls == [1]
    assert InfluenceEngine(engine.model, (x, y), make_solver("fast"), cache_dir=None).progress is True
