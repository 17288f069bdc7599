"""Engine checks added while mutation testing (issue 15): behaviour the other tests left loose."""

from __future__ import annotations

from influence_over_inference.engine.hashing import file_sha256


def test_file_sha256_is_the_files_sha256_prefix(tmp_path):
    import hashlib

    path = tmp_path / "f.bin"
    data = bytes(range(256)) * 5000  # > one 1 MiB read block
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()[:16]
    assert file_sha256(path, length=40) == hashlib.sha256(data).hexdigest()[:40]


# -- scores: self-influence and influence on an image split, chosen layers, float64, progress -----

WD = 1e-2
EXACT = 1e-10  # float64: the same numbers by two routes


def _split_problem(n=12):
    import torch

    from influence_over_inference.study.data import CIFAR10Split
    from influence_over_inference.study.model import Net

    gen = torch.Generator().manual_seed(0)
    split = CIFAR10Split(torch.randint(0, 256, (n, 32, 32, 3), generator=gen, dtype=torch.uint8),
                         torch.arange(n) % 10, [f"x/{i}.png" for i in range(n)])
    torch.manual_seed(0)
    model = Net(channels=(2, 2), hidden=(4, 3)).double().eval()
    x, y = split.tensors()
    return split, model, x.double(), y


def test_self_influence_on_a_split_with_chosen_layers_is_the_diagonal_in_float64():
    import torch

    from influence_over_inference.engine.scores import influence, self_influence
    from influence_over_inference.engine.solvers.registry import make_solver

    split, model, x, y = _split_problem()
    for name in ("exact", "fast"):
        solver = make_solver(name, damping=0.1).fit(model, x, y, weight_decay=WD, layers=["fc2", "fc3"])
        full = influence(model, x, y, split, solver, chunk_size=5)  # the split's uint8 images, cast to float64
        assert full.dtype == torch.float64 and full.shape == (12, 12)
        assert torch.allclose(full, influence(model, x, y, (x, y), solver), atol=EXACT, rtol=0)
        si = self_influence(model, split, solver, chunk_size=5)
        assert si.shape == (12,) and torch.allclose(si, full.diagonal(), atol=EXACT, rtol=1e-9), name
    fast = make_solver("fast", damping=0.1).fit(model, x, y, weight_decay=WD)

    def per_example(vectors):
        raise AssertionError("the fast solver's self-influence must use its closed form, not per-example solves")

    fast.quadratic_form = per_example
    assert self_influence(model, split, fast).shape == (12,)


def test_scores_show_progress_only_when_asked(capsys):
    from influence_over_inference.engine.scores import influence, self_influence
    from influence_over_inference.engine.solvers.registry import make_solver

    split, model, x, y = _split_problem()
    solver = make_solver("exact", damping=0.1).fit(model, x, y, weight_decay=WD)
    influence(model, x[:2], y[:2], split, solver)
    self_influence(model, split, solver)
    assert capsys.readouterr().err == ""
    influence(model, x[:2], y[:2], split, solver, progress=True)
    assert "scoring training images:" in capsys.readouterr().err  # tqdm: "<desc>: "
    self_influence(model, split, solver, progress=True)
    assert "self-influence:" in capsys.readouterr().err
