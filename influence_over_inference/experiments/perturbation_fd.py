"""The perturbation map against finite differences of the exact score, on a tiny float64 model.

The map (:mod:`..engine.perturbation`) is ``-grad_x score[t, j]`` with ``s_test`` held fixed (Koh &
Liang's I_pert,loss / n). Here a tiny network of the study's architecture (:class:`..study.model.Net`
at width (2, 3) / (8, 8), float64) is trained on a few real, class-balanced training images; the
exact solver gives ``s_test`` for two other images; and every one of the 3,072 pixels of two
training images is moved by ``+-step`` (central differences of ``s_test . grad L(x_j) / n``,
batched). The relative error
``||map - fd|| / ||map||`` is the ``fd_rel_err`` of ``results/perturbation.json`` (issue bound 1e-6).
"""

from __future__ import annotations

import torch
from torch import nn

DTYPE = torch.float64


WEIGHT_DECAY = 1e-2  # of the tiny model: keeps its curvature well conditioned


FD_IMAGES = 2  # training images whose every pixel is differenced


def _tiny_model(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 200) -> nn.Module:
    """The study's LeNet at toy width, float64, fitted by full-batch L-BFGS from a seeded start."""
    from ..study.model import Net

    with torch.random.fork_rng():  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        model = Net(channels=(2, 3), hidden=(8, 8)).to(DTYPE)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss = loss + 0.5 * WEIGHT_DECAY * sum((p * p).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model.eval()


def fd_check(split, n_train: int = 64, step: float = 1e-5, seed: int = 0, n_pixels: int | None = None,
             fit_steps: int = 200, chunk: int = 512) -> dict:
    """``fd_rel_err`` (max over the differenced images) and its setting, from ``split``'s first images.

    ``split``: a training split (uint8 images, labels); ``n_train + 2`` class-balanced images of it
    (:func:`..study.data.balanced_indices`: the first of each class, in turn) of which the first
    ``n_train`` train the tiny model and the last two are its test images. Central differences:
    truncation ~ step**2, rounding ~ 1e-16 / step, both far below the 1e-6 bound in float64.
    ``n_pixels``: difference only that many pixels per image (seeded choice; None: all 3,072), for
    fast tests; ``fit_steps``: L-BFGS iterations of the tiny model (the map needs no optimum: fewer
    keep the gradients of a few random test images from vanishing).
    """
    from ..engine.gradients import grad_z
    from ..engine.perturbation import perturbation_influence
    from ..engine.scores import s_test
    from ..engine.solvers.registry import make_solver
    from ..study.data import balanced_indices

    x, y = split.tensors(balanced_indices(split.labels, n_train + 2))
    x = x.to(DTYPE)
    xt, yt, x, y = x[n_train:], y[n_train:], x[:n_train], y[:n_train]
    model = _tiny_model(x, y, seed, fit_steps)
    solver = make_solver("exact", damping=0.01).fit(model, x, y, weight_decay=WEIGHT_DECAY)
    stest = s_test(model, xt, yt, solver)  # (2, P)
    n_all = x[0].numel()
    pixels = (torch.arange(n_all) if n_pixels is None or n_pixels >= n_all
              else torch.randperm(n_all, generator=torch.Generator().manual_seed(seed))[:n_pixels].sort().values)
    errors = []
    for j in range(FD_IMAGES):
        maps = perturbation_influence(model, stest, x[j : j + 1], y[j : j + 1], n_train)[:, 0]  # (2, 3, 32, 32)
        maps = maps.reshape(len(stest), -1)[:, pixels]  # (2, n_pixels)
        fd = torch.empty(len(stest), len(pixels), dtype=DTYPE)
        for start in range(0, len(pixels), chunk):
            idx = pixels[start : start + chunk]
            cols = torch.arange(start, start + len(idx))
            bumped = x[j].reshape(1, -1).repeat(2 * len(idx), 1)  # (2B, 3072): +step then -step
            bumped[torch.arange(len(idx)), idx] += step
            bumped[len(idx) + torch.arange(len(idx)), idx] -= step
            g = grad_z(model, bumped.reshape(-1, *x.shape[1:]), y[j].repeat(2 * len(idx)))  # (2B, P)
            s = stest @ g.T / n_train  # (2, 2B): the exact score of each bumped image
            fd[:, cols] = -(s[:, : len(idx)] - s[:, len(idx):]) / (2 * step)
        errors.append(float((maps - fd).norm() / maps.norm()))
    return {"fd_rel_err": max(errors), "per_image": errors, "n_train": n_train, "step": step,
            "n_pixels": len(pixels), "model": "Net(channels=(2, 3), hidden=(8, 8)), float64, L-BFGS",
            "solver": "exact, GGN, damping 0.01", "weight_decay": WEIGHT_DECAY, "fit_steps": fit_steps}
