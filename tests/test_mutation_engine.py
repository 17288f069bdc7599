"""Engine checks added while mutation testing (issue 15): behaviour the other tests left loose.

Each test asserts what a user would see change: scores and self-influence on an image split with
chosen layers (float64), progress bars only when asked, top-k at its edges, the solvers' settings
validated edge by edge with their messages, the exact solver's damped solve, state and LU path, CG
on both curvature paths row by row with its warnings, LiSSA's full-batch fixed point, its
minibatches and its divergence advice (tiny models, seconds)."""

from __future__ import annotations

import hashlib
import math
import re

import pytest
import torch
from engine_models import blobs, dead_relu_net, fit, logistic, mlp

from influence_over_inference.engine.hashing import file_sha256
from influence_over_inference.engine.scores import influence, self_influence, top_k
from influence_over_inference.engine.solvers.cg import CGSettings
from influence_over_inference.engine.solvers.exact import (
    ExactSettings,
    ExactSolver,
    exact_memory_bytes,
)
from influence_over_inference.engine.solvers.lissa import LiSSADivergenceError, LiSSASettings
from influence_over_inference.engine.solvers.registry import make_solver
from influence_over_inference.study.data import CIFAR10Split
from influence_over_inference.study.model import Net


def test_file_sha256_is_the_files_sha256_prefix(tmp_path):
    path = tmp_path / "f.bin"
    data = bytes(range(256)) * 5000  # > one 1 MiB read block
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()[:16]
    assert file_sha256(path, length=40) == hashlib.sha256(data).hexdigest()[:40]


# -- scores: self-influence and influence on an image split, chosen layers, float64, progress -----

WD = 1e-2
EXACT = 1e-10  # float64: the same numbers by two routes


def _split_problem(n=12):
    gen = torch.Generator().manual_seed(0)
    split = CIFAR10Split(torch.randint(0, 256, (n, 32, 32, 3), generator=gen, dtype=torch.uint8),
                         torch.arange(n) % 10, [f"x/{i}.png" for i in range(n)])
    torch.manual_seed(0)
    model = Net(channels=(2, 2), hidden=(4, 3)).double().eval()
    x, y = split.tensors()
    return split, model, x.double(), y


def test_self_influence_on_a_split_with_chosen_layers_is_the_diagonal_in_float64():
    split, model, x, y = _split_problem()
    for name, over in (("exact", {}), ("fast", {}), ("fast", {"rest": "damping"}), ("ekfac", {})):
        solver = make_solver(name, damping=0.1, **over).fit(model, x, y, weight_decay=WD, layers=["fc2", "fc3"])
        full = influence(model, x, y, split, solver, chunk_size=5)  # the split's uint8 images, cast to float64
        assert full.dtype == torch.float64 and full.shape == (12, 12)
        assert torch.allclose(full, influence(model, x, y, (x, y), solver), atol=EXACT, rtol=0)
        si = self_influence(model, split, solver, chunk_size=5)
        assert si.shape == (12,) and torch.allclose(si, full.diagonal(), atol=EXACT, rtol=1e-9), name
    fast = make_solver("fast", damping=0.1, rest="damping").fit(model, x, y, weight_decay=WD)

    def per_example(vectors):
        raise AssertionError("the fast solver's self-influence (rest='damping') must use its closed form, not per-example solves")

    fast.quadratic_form = per_example
    assert self_influence(model, split, fast).shape == (12,)


def test_scores_show_progress_only_when_asked(capsys):
    split, model, x, y = _split_problem()
    solver = make_solver("exact", damping=0.1).fit(model, x, y, weight_decay=WD)
    influence(model, x[:2], y[:2], split, solver)
    self_influence(model, split, solver)
    assert capsys.readouterr().err == ""
    influence(model, x[:2], y[:2], split, solver, progress=True)
    assert "scoring training images:" in capsys.readouterr().err  # tqdm: "<desc>: "
    self_influence(model, split, solver, progress=True)
    assert "self-influence:" in capsys.readouterr().err
    make_solver("exact").fit(model, x, y)
    assert capsys.readouterr().err == ""
    make_solver("exact").fit(model, x, y, progress=True)
    assert "exact solver: curvature:" in capsys.readouterr().err


# -- solvers: the shared interface and the exact solver, setting by setting ---------------------

def _logistic_problem():
    torch.manual_seed(0)
    x, y = blobs(30, (5,), 3, seed=0)
    return fit(logistic(), x, y, WD, steps=30).eval(), x, y  # 18 parameters


def test_solver_settings_are_validated_and_merged():
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"damping must be a finite number >= 0, got"):
            ExactSettings(damping=bad)
    with pytest.raises(ValueError, match=r"curvature must be one of \('ggn', 'hessian'\), got 'fisher'"):
        ExactSettings(curvature="fisher")
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        ExactSettings(chunk_size=0)
    with pytest.raises(ValueError, match="max_params must be >= 1 or None, got 0"):
        ExactSettings(max_params=0)
    assert ExactSettings(damping=0.0, max_params=None, chunk_size=1).max_params is None  # the edges are allowed
    assert ExactSettings(max_params=1).max_params == 1
    solver = ExactSolver(ExactSettings(damping=0.5, chunk_size=7), damping=0.25)
    assert (solver.settings.damping, solver.settings.chunk_size) == (0.25, 7)
    assert ExactSolver(damping=0.125).settings.damping == 0.125
    with pytest.raises(ValueError, match="ExactSolver takes ExactSettings, got CGSettings"):
        ExactSolver(CGSettings())
    assert solver.describe() == {"solver": "exact", "curvature": "ggn", "damping": 0.25, "chunk_size": 7,
                                 "max_params": 20_000}


def test_fit_checks_its_inputs_and_solves_the_damped_system():
    model, x, y = _logistic_problem()
    model.train()
    exact = make_solver("exact", damping=0.3, chunk_size=7).fit(model, x, y, weight_decay=0.2)
    assert not model.training and exact.total_damping == pytest.approx(0.5)
    assert exact.n_train == 30 and exact.n_params == 18
    want = torch.linalg.solve(exact.curvature + 0.5 * torch.eye(18, dtype=torch.float64), torch.ones(18, 2, dtype=torch.float64)).T
    assert torch.allclose(exact.inverse_hvp(torch.ones(2, 18, dtype=torch.float64)), want, atol=EXACT, rtol=0)
    one = exact.inverse_hvp(torch.ones(18, dtype=torch.float64))  # one vector: a (1, P) answer
    assert one.shape == (1, 18) and torch.allclose(one[0], want[0], atol=EXACT, rtol=0)
    v = torch.randn(3, 18, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(exact.quadratic_form(v), (exact.inverse_hvp(v) * v).sum(1), atol=EXACT, rtol=0)
    with pytest.raises(NotImplementedError, match="ExactSolver has no basis; use quadratic_form"):
        exact.quadratic_form_from_products(v, v[:, 0])
    assert exact.basis() is None
    whole = make_solver("exact", damping=0.3, chunk_size=1000).fit(model, x, y, weight_decay=0.2)
    assert torch.allclose(whole.matrix, exact.matrix, atol=EXACT, rtol=0)  # chunk size changes nothing
    split = make_solver("exact", damping=0.3).fit(model, (x, y), weight_decay=0.2)  # (x, y) as one argument
    assert torch.allclose(split.matrix, exact.matrix, atol=EXACT, rtol=0)
    assert make_solver("exact").fit(model, x, y).weight_decay == 0.0
    with pytest.raises(ValueError, match=r"training data: labels must have shape \(30,\), got \(29,\)"):
        make_solver("exact").fit(model, x, y[:29])
    with pytest.raises(ValueError, match="^the training set is empty$"):
        make_solver("exact").fit(model, x[:0], y[:0])
    with pytest.raises(ValueError, match="weight_decay must be >= 0, got nan"):
        make_solver("exact").fit(model, x, y, weight_decay=float("nan"))
    with pytest.raises(RuntimeError, match=r"ExactSolver: call fit\(model, train_x, train_y, weight_decay\) first"):
        make_solver("exact").quadratic_form(v)
    with pytest.raises(ValueError, match=r"vectors must have shape \(K, 18\) \(one row per test gradient\), got \(2, 3, 18\)"):
        exact.inverse_hvp(torch.zeros(2, 3, 18, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^vectors contain NaN or inf; check the test inputs and the model's loss$"):
        exact.inverse_hvp(torch.full((1, 18), float("inf"), dtype=torch.float64))


def test_exact_solver_state_lu_path_and_size_limit(caplog):
    caplog.set_level("INFO", logger="influence_over_inference.engine.solvers.exact")
    model, x, y = _logistic_problem()
    exact = make_solver("exact", damping=0.3).fit(model, x, y, weight_decay=0.2)
    assert exact._chol is not None and caplog.messages == []  # positive definite: Cholesky, nothing logged
    state = exact.state_dict()
    assert set(state) == {"curvature"}
    assert torch.allclose(state["curvature"] + 0.5 * torch.eye(18, dtype=torch.float64), exact.matrix, atol=EXACT, rtol=0)
    again = ExactSolver(exact.settings).fit(model, x, y, weight_decay=0.2, state=state)
    v = torch.ones(2, 18, dtype=torch.float64)
    assert torch.allclose(again.inverse_hvp(v), exact.inverse_hvp(v), atol=EXACT, rtol=0)
    as32 = ExactSolver(exact.settings).fit(model, x, y, weight_decay=0.2, state={"curvature": state["curvature"].float()})
    assert as32.matrix.dtype == torch.float64  # a float32 cache entry is cast to the model's dtype
    assert _rel(as32.inverse_hvp(v), exact.inverse_hvp(v)) < 1e-6
    got = exact.inverse_hvp(v.float())  # float32 vectors: solved in the model's dtype
    assert got.dtype == torch.float64 and torch.allclose(got, exact.inverse_hvp(v), atol=EXACT, rtol=0)
    other_wd = ExactSolver(exact.settings).fit(model, x, y, weight_decay=1.0, state=state)  # the cache holds C only
    assert torch.allclose(other_wd.matrix, state["curvature"] + 1.3 * torch.eye(18, dtype=torch.float64), atol=EXACT, rtol=0)
    # an indefinite matrix (the Hessian's curvature minus a shift): no Cholesky, solved by LU
    shifted = ExactSolver(exact.settings).fit(model, x, y, weight_decay=0.0, state={"curvature": state["curvature"] - 0.31 * torch.eye(18, dtype=torch.float64)})
    assert shifted._chol is None and "the damped curvature is not positive definite; solving by LU" in caplog.messages
    assert torch.allclose(shifted.inverse_hvp(v), torch.linalg.solve(shifted.matrix, v.T).T, atol=1e-8, rtol=0)
    assert exact_memory_bytes(10, 3, 4) == 8 * (2 * 100 + 2 * 4 * 3 * 10)
    assert exact_memory_bytes(10, 3, 4, itemsize=4) == 4 * (2 * 100 + 2 * 4 * 3 * 10)
    with pytest.raises(ValueError, match=r"builds a 18 x 18 matrix \(about 0\.0 GB with its factor, above max_params=17\); use 'cg' or 'fast'"):
        make_solver("exact", max_params=17).fit(model, x, y)
    assert make_solver("exact", max_params=18).fit(model, x, y).matrix.shape == (18, 18)
    # the estimate: 2 P^2 + 2 * chunk * 10 classes * P floats of the model's dtype (8 bytes here)
    with pytest.raises(ValueError, match=r"about 28\.8 GB with its factor, above max_params=17"):
        make_solver("exact", max_params=17, chunk_size=10**7).fit(model, x, y)
    with pytest.raises(ValueError, match=r"about 14\.4 GB with its factor"):
        make_solver("exact", max_params=17, chunk_size=10**7).fit(model.float(), x.float(), y)
    model.double()


# -- conjugate gradient: both curvature-product paths, early-converging rows, warnings ----------

def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_cg_settings_are_validated():
    for bad, message in (({"max_factor_mb": -1.0}, "max_factor_mb must be >= 0, got -1.0"),
                         ({"tol": 0.0}, "tol must be > 0, got 0.0"), ({"max_iter": 0}, "max_iter must be >= 1, got 0"),
                         ({"n_samples": 0}, "n_samples must be >= 1 or None, got 0"),
                         ({"damping": -1.0}, "damping must be a finite number >= 0")):
        with pytest.raises(ValueError, match=message):
            CGSettings(**bad)
    CGSettings(max_factor_mb=0.0, max_iter=1, n_samples=1)  # the edges are allowed


def test_cg_solves_with_and_without_the_held_factor_row_by_row(caplog):
    model, x, y = _logistic_problem()
    exact = make_solver("exact", damping=0.1).fit(model, x, y, weight_decay=0.2)
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(3, 18, generator=gen, dtype=torch.float64)
    v[1] *= 1e-3  # rows of different sizes stop at different iterations
    v[2] = torch.linalg.eigh(exact.matrix).eigenvectors[:, -1]  # an eigenvector: done in one step
    want = exact.inverse_hvp(v)
    for mb in (0.0, 2048.0):  # 0: curvature products every iteration; else the GGN factor held in memory
        for curvature in ("ggn", "hessian"):
            cg = make_solver("cg", curvature=curvature, damping=0.1, tol=1e-12, max_iter=200, max_factor_mb=mb,
                             chunk_size=7).fit(model, x, y, weight_decay=0.2)
            ref = exact if curvature == "ggn" else make_solver("exact", curvature="hessian", damping=0.1).fit(
                model, x, y, weight_decay=0.2)
            assert torch.allclose(cg.apply(v), v @ ref.matrix, atol=EXACT, rtol=0), (mb, curvature)
            got = cg.inverse_hvp(v)
            assert _rel(got, ref.inverse_hvp(v)) < 1e-9, (mb, curvature)
            for row in range(3):
                assert _rel(got[row], ref.inverse_hvp(v)[row]) < 1e-9, (mb, curvature, row)
            assert abs(cg.residuals[0] - 1.0) < 1e-12 and cg.residuals[-1] <= 1e-12 and len(cg.residuals) <= 19 + 1
    cg = make_solver("cg", damping=0.1, tol=1e-12, n_samples=100).fit(model, x, y, weight_decay=0.2)  # >= n: all
    assert _rel(cg.inverse_hvp(v), want) < 1e-9
    assert torch.equal(cg.inverse_hvp(torch.zeros(1, 18, dtype=torch.float64)), torch.zeros(1, 18, dtype=torch.float64))
    caplog.clear()
    short = make_solver("cg", damping=0.1, tol=1e-12, max_iter=2).fit(model, x, y, weight_decay=0.2)
    short.inverse_hvp(v)
    assert len(short.residuals) == 3 and short.residuals[-1] > 1e-12
    assert "CG stopped at max_iter=2 with relative residual" in caplog.text
    caplog.clear()
    cg.inverse_hvp(v)
    assert "CG stopped" not in caplog.text


def test_cg_warns_on_an_indefinite_hessian_and_keeps_float32(caplog):
    torch.manual_seed(3)
    x, y = blobs(30, (6,), 3, seed=3)
    model = mlp().eval()  # untrained: its Hessian is indefinite
    exact = make_solver("exact", curvature="hessian", damping=0.0).fit(model, x, y)
    assert torch.linalg.eigvalsh(exact.matrix)[0] < 0
    cg = make_solver("cg", curvature="hessian", damping=0.0, max_iter=40).fit(model, x, y)
    cg.inverse_hvp(torch.ones(1, cg.n_params, dtype=torch.float64))
    assert "CG met a direction of non-positive curvature" in caplog.text and "raise damping or use curvature='ggn'" in caplog.text
    model64, x64, y64 = _logistic_problem()
    exact64 = make_solver("exact", damping=0.1).fit(model64, x64, y64, weight_decay=0.2)
    want = exact64.inverse_hvp(torch.ones(1, 18, dtype=torch.float64))
    cg32 = make_solver("cg", damping=0.1, tol=1e-10).fit(model64.float(), x64.float(), y64, weight_decay=0.2)
    got = cg32.inverse_hvp(torch.ones(1, 18))
    assert got.dtype == torch.float32 and _rel(got.double(), want) < 1e-4
    model64.double()  # float32 training images for a float64 model: cast to the model's dtype
    cast = make_solver("cg", damping=0.1, tol=1e-12).fit(model64, x64.float(), y64, weight_decay=0.2)
    assert _rel(cast.inverse_hvp(torch.ones(1, 18, dtype=torch.float64)), want) < 1e-6


# -- LiSSA: the fixed point, the settings, the eigenvalue estimate and the advice ---------------

def test_lissa_full_batch_reaches_the_exact_fixed_point():
    model, x, y = _logistic_problem()
    exact = make_solver("exact", damping=0.1).fit(model, x, y, weight_decay=0.2)
    top = float(torch.linalg.eigvalsh(exact.matrix)[-1])
    v = torch.ones(2, 18, dtype=torch.float64)
    v[1] *= -3
    for curvature in ("ggn", "hessian"):
        lissa = make_solver("lissa", curvature=curvature, damping=0.1, scale=1.5 * top, depth=800, batch_size=30,
                            repeat=2).fit(model, x, y, weight_decay=0.2)
        ref = exact if curvature == "ggn" else make_solver("exact", curvature="hessian", damping=0.1).fit(model, x, y, weight_decay=0.2)
        assert _rel(lissa.inverse_hvp(v), ref.inverse_hvp(v)) < 1e-8, curvature
    s = LiSSASettings(damping=0.5, scale=20.0)
    assert s.damp == pytest.approx(0.025)
    paper = LiSSASettings.from_paper(damp=0.01, scale=30.0, depth=7, repeat=3, batch_size=5)
    assert (paper.damping, paper.scale, paper.depth, paper.repeat, paper.batch_size) == (pytest.approx(0.3), 30.0, 7, 3, 5)
    for bad, message in (({"scale": 0.0}, "scale must be > 0, got 0.0"), ({"blowup": 1.0}, "blowup must be > 1, got 1.0")):
        with pytest.raises(ValueError, match=message):
            LiSSASettings(**bad)
    for field in ("depth", "repeat", "batch_size", "check_every"):
        with pytest.raises(ValueError, match="depth, repeat, batch_size and check_every must be >= 1"):
            LiSSASettings(**{field: 0})
    LiSSASettings(depth=1, repeat=1, batch_size=1, check_every=1, blowup=1.5)  # the edges are allowed


def test_lissa_minibatches_cover_the_data_and_run_out_with_a_message():
    model, x, y = _logistic_problem()
    lissa = make_solver("lissa", batch_size=7, seed=5).fit(model, x, y, weight_decay=0.2)
    batches = lissa._batches(torch.Generator().manual_seed(5))
    first = [next(batches) for _ in range(4)]  # 4 batches of 7 from one permutation of 30: no repeats
    rows = torch.cat([b[0] for b in first])
    assert rows.shape == (28, 5) and len(torch.unique(rows, dim=0)) == 28
    assert all(len(b[0]) == 7 for b in (next(batches) for _ in range(10)))  # a new permutation when one runs short
    v = torch.ones(1, 18, dtype=torch.float64)
    short = make_solver("lissa", depth=5, scale=50.0).fit(model, x, y, weight_decay=0.2)
    with pytest.raises(ValueError, match=r"batches ran out after 3 steps; LiSSA needs depth=5 minibatches per repetition"):
        short.inverse_hvp(v, batches=[(x[:10], y[:10])] * 3)


def test_lissa_divergence_message_estimates_the_eigenvalue_and_the_scale_to_use():
    model, x, y = _logistic_problem()
    exact = make_solver("exact", damping=0.0).fit(model, x, y, weight_decay=0.2)
    top = float(torch.linalg.eigvalsh(exact.matrix)[-1])  # of C + weight_decay I on all 30
    lissa = make_solver("lissa", damping=0.1, scale=top / 10, depth=3000, batch_size=30, check_every=7).fit(
        model, x, y, weight_decay=0.2)
    assert lissa.largest_eigenvalue(x, y, steps=300) == pytest.approx(top, rel=1e-6)
    with pytest.raises(LiSSADivergenceError) as info:
        lissa.inverse_hvp(torch.ones(1, 18, dtype=torch.float64))
    text = str(info.value)
    step = int(re.search(r"diverged at step (\d+) of repetition 0", text).group(1))
    assert step % 7 == 0 and step < 700
    lam = float(re.search(r"is about ([0-9.e+-]+) \(power iteration\)", text).group(1))
    assert lam == pytest.approx(top, rel=0.05)
    assert f"scale={top / 10:g} is too small" in text and "ggn curvature (batch_size=30, + weight decay)" in text
    assert f"Raise scale to about {float(f'{2 * lam:.1g}'):g} (and keep damping=0.1" in text


def test_top_k_defaults_to_ten_takes_one_row_and_every_k_from_1_to_n():
    scores = torch.arange(12, dtype=torch.float64).flip(0)[None] - 5.5  # (1, 12): 6.5, 5.5, ..., -5.5
    assert top_k(scores).helpful.shape == (1, 10) and top_k(scores).harmful.shape == (1, 10)
    row = top_k(scores[0], k=3)  # one test image as a 1-D vector
    assert row.helpful.tolist() == [[0, 1, 2]] and row.harmful.tolist() == [[11, 10, 9]]
    assert top_k(scores, k=1).helpful.tolist() == [[0]] and top_k(scores, k=1).harmful_scores.tolist() == [[-5.5]]
    everything = top_k(scores, k=12)
    assert everything.helpful.tolist() == [list(range(12))] and everything.harmful.tolist() == [list(range(11, -1, -1))]
    for bad in (0, 13):
        with pytest.raises(ValueError, match=rf"k must be between 1 and the number of training images \(12\), got {bad}"):
            top_k(scores, k=bad)


def test_make_solver_builds_each_solver_with_its_settings_and_names_the_valid_ones():
    from dataclasses import fields

    from influence_over_inference.engine.solvers.registry import SOLVERS

    for name, cls in SOLVERS.items():
        solver = make_solver(name, damping=0.375)
        assert type(solver) is cls and solver.name == name and solver.settings.damping == 0.375
    assert make_solver("lissa", depth=3).settings.depth == 3
    with pytest.raises(ValueError, match=re.escape("unknown solver 'newton'; choose one of ['cg', 'ekfac', 'exact', 'fast', 'lissa']")):
        make_solver("newton")
    valid = sorted(f.name for f in fields(CGSettings))
    with pytest.raises(ValueError, match=re.escape(f"solver 'cg' has no setting(s) ['depth', 'scale']; valid: {valid}")):
        make_solver("cg", scale=2.0, depth=3)


def test_s_test_checks_test_labels_against_the_models_classes():
    from influence_over_inference.engine.scores import s_test

    split, model, x, y = _split_problem()
    solver = make_solver("exact", damping=0.1).fit(model, x, y, weight_decay=WD)
    with pytest.raises(ValueError, match=r"test data: labels must lie in \[0, 10\), found 3\.\.10"):
        s_test(model, x[:2], torch.tensor([3, 10]), solver)
    assert s_test(model, x[:2], torch.tensor([3, 9]), solver).shape == (2, solver.n_params)
    with pytest.raises(ValueError, match="^" + re.escape("fit the solver first: solver.fit(model, train_x, train_y, weight_decay)") + "$"):
        s_test(model, x[:2], y[:2], make_solver("exact"))
    last = make_solver("exact", damping=0.1).fit(model, x, y, weight_decay=WD, layers=["fc3"])
    assert torch.equal(s_test(model, x[:2], y[:2], last, layers=["fc3"]), s_test(model, x[:2], y[:2], last))
    with pytest.raises(ValueError, match=r"vectors must have shape \(K, \d+\)"):  # layers the solver was not fitted on
        s_test(model, x[:2], y[:2], solver, layers=["fc3"])


def test_influence_takes_precomputed_s_test_and_casts_float32_test_images():
    from influence_over_inference.engine.scores import s_test

    split, model, x, y = _split_problem()
    solver = make_solver("exact", damping=0.1).fit(model, x, y, weight_decay=WD)
    want = influence(model, x[:3], y[:3], split, solver)
    stest = s_test(model, x[:3], y[:3], solver)
    assert torch.allclose(influence(model, None, None, split, solver, stest=stest), want, atol=EXACT, rtol=0)
    one = influence(model, None, None, split, solver, stest=stest[1])  # one vector, 1-D
    assert one.shape == (1, 12) and torch.allclose(one[0], want[1], atol=EXACT, rtol=0)
    with pytest.raises(ValueError, match=rf"stest must have shape \(K, {solver.n_params}\), got \(3, {solver.n_params - 1}\)"):
        influence(model, None, None, split, solver, stest=stest[:, 1:])
    fresh = make_solver("exact")  # nimarb's or another solver's s_test: this one need not be fitted
    assert torch.allclose(influence(model, None, None, split, fresh, stest=stest), want, atol=EXACT, rtol=0)
    with pytest.raises(ValueError, match=rf"stest must have shape \(K, {solver.n_params}\)"):
        influence(model, None, None, split, fresh, stest=stest[:, 1:])
    last = make_solver("exact", damping=0.1).fit(model, x, y, weight_decay=WD, layers=["fc3"])  # 40 parameters
    on_last = influence(model, None, None, split, last, stest=s_test(model, x[:3], y[:3], last))
    assert torch.allclose(on_last, influence(model, x[:3], y[:3], split, last), atol=EXACT, rtol=0)
    with pytest.raises(ValueError, match=r"stest must have shape \(K, 40\), got \(3, 39\)"):
        influence(model, None, None, split, last, stest=torch.zeros(3, 39, dtype=torch.float64))
    as32 = s_test(model, x[:3].float(), y[:3], solver)  # float32 images, float64 model: cast, same answer
    assert as32.dtype == torch.float64 and torch.allclose(as32, stest, atol=1e-6 * float(stest.abs().max()), rtol=0)


def test_exact_hessian_sums_every_chunk_on_chosen_layers_and_casts_float32_images():
    torch.manual_seed(0)
    x, y = blobs(30, (6,), 3, seed=0)
    model = fit(mlp(), x, y, WD, steps=30).eval()
    whole = make_solver("exact", curvature="hessian", damping=0.1, chunk_size=1000).fit(model, x, y, layers=["3"])
    chunked = make_solver("exact", curvature="hessian", damping=0.1, chunk_size=7).fit(model, x, y, layers=["3"])
    assert whole.matrix.shape == (27, 27) and torch.allclose(chunked.matrix, whole.matrix, atol=EXACT, rtol=0)
    for curvature in ("ggn", "hessian"):
        want = make_solver("exact", curvature=curvature, damping=0.1).fit(model, x, y).matrix
        got = make_solver("exact", curvature=curvature, damping=0.1).fit(model, x.float(), y).matrix
        assert got.dtype == torch.float64 and torch.allclose(got, want, atol=1e-6, rtol=0), curvature


@pytest.mark.parametrize("lam,suggest", [(37.0, "70"), (0.2, "1"), (4.4, "9")])
def test_lissa_advice_is_twice_the_eigenvalue_at_one_digit_and_at_least_one(monkeypatch, lam, suggest):
    model, x, y = _logistic_problem()
    lissa = make_solver("lissa", damping=0.1, scale=0.01, depth=500, batch_size=30, check_every=5).fit(
        model, x, y, weight_decay=0.2)
    monkeypatch.setattr(lissa, "largest_eigenvalue", lambda xb, yb: lam)
    with pytest.raises(LiSSADivergenceError, match=rf"is about {lam:.3g} \(power iteration\).*Raise scale to about {suggest} \("):
        lissa.inverse_hvp(torch.ones(1, 18, dtype=torch.float64))


def test_lissa_settings_from_the_papers_names_default_to_one_repetition():
    s = LiSSASettings.from_paper(damp=0.01, scale=10.0, depth=5)
    assert (s.damping, s.scale, s.depth, s.repeat) == (pytest.approx(0.1), 10.0, 5, 1)


def test_power_iteration_is_seeded_in_the_models_dtype_and_zero_on_a_layer_without_curvature():
    model, x, y = _logistic_problem()
    lissa = make_solver("lissa", damping=0.1, scale=10.0, depth=5, batch_size=30).fit(model, x, y, weight_decay=0.2)
    x = x.float().double()  # values a float32 copy holds exactly
    torch.manual_seed(1)
    first = lissa.largest_eigenvalue(x, y)
    torch.manual_seed(2)  # the global generator does not matter: the start vector is seeded
    assert lissa.largest_eigenvalue(x.float(), y) == first  # float32 images are moved to the model's dtype
    assert lissa.largest_eigenvalue(x, y, seed=5) != first
    # every hidden unit dead: the first layer has exactly zero curvature (and no weight decay here)
    dead = dead_relu_net(d=5, h=4)
    flat = make_solver("lissa", damping=0.1, scale=10.0, depth=5, batch_size=30).fit(dead, x, y, weight_decay=0.0, layers=["1"])
    assert flat.largest_eigenvalue(x, y) == 0.0


def test_lissa_checks_the_last_step_and_takes_float32_minibatches():
    model, x, y = _logistic_problem()
    # a check only at step 0 and at the last step (49): a divergence that starts later is caught at 49
    lissa = make_solver("lissa", damping=0.1, scale=0.05, depth=50, batch_size=30, check_every=1000).fit(
        model, x, y, weight_decay=0.2)
    with pytest.raises(LiSSADivergenceError, match=r"^LiSSA diverged at step 49 of repetition 0 "):
        lissa.inverse_hvp(torch.ones(1, 18, dtype=torch.float64))
    ok = make_solver("lissa", damping=0.1, scale=10.0, depth=20, batch_size=10).fit(model, x, y, weight_decay=0.2)
    x32 = x.float()
    batches64 = [(x32[i : i + 10].double(), y[i : i + 10]) for i in (0, 10, 20, 0, 10, 20, 0, 10, 20, 0) * 2]
    batches32 = [(b.float(), t) for b, t in batches64]
    v = torch.ones(1, 18, dtype=torch.float64)
    assert torch.equal(ok.inverse_hvp(v, batches=batches32), ok.inverse_hvp(v, batches=batches64))


def test_lissa_minibatches_partition_each_epoch():
    model, x, y = _logistic_problem()
    lissa = make_solver("lissa", damping=0.1, scale=10.0, depth=5, batch_size=10).fit(model, x, y, weight_decay=0.2)
    rows = {tuple(xi.tolist()): i for i, xi in enumerate(x)}
    batches = lissa._batches(torch.Generator().manual_seed(0))
    for _ in range(2):  # two epochs of 30 examples in batches of 10
        seen = sorted(rows[tuple(xi.tolist())] for _ in range(3) for xi in next(batches)[0])
        assert seen == list(range(30))


def test_lissa_settings_message_and_cg_max_iter_warning(caplog):
    with pytest.raises(ValueError, match=r"^depth, repeat, batch_size and check_every must be >= 1$"):
        LiSSASettings(depth=0)
    model, x, y = _logistic_problem()
    cg = make_solver("cg", damping=0.0, tol=1e-30, max_iter=2).fit(model, x, y, weight_decay=1e-3)
    with caplog.at_level("WARNING"):
        cg.inverse_hvp(torch.randn(1, 18, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert [r.getMessage() for r in caplog.records] == [
        f"CG stopped at max_iter=2 with relative residual {cg.residuals[-1]:.2e} > tol=1.0e-30"]
    assert cg.residuals[-1] > 1e-6
    assert len(cg.residuals) == 3 and cg.residuals[-1] != cg.residuals[-2]
