"""Influence scores (Koh & Liang, ICML 2017): which training images help, and which harm, a prediction.

THE SIGN CONVENTION (the one place it is written down). For a test image t and a training
image j, with n training images, C the curvature (Hessian or GGN) of the mean training loss,
``weight_decay`` the training L2 coefficient and ``lambda`` the damping::

    score[t, j] = (1/n) * grad L(t)^T (C + weight_decay I + lambda I)^{-1} grad L(j)
                = (1/n) * s_test(t)^T grad_z(j)

the first-order prediction of how much the loss on t would *rise* if j were removed from the
training set and the model retrained (Koh & Liang's I_up,loss is ``-n`` times this).
Positive = helpful (removing j would raise the test loss); negative = harmful (removing j would
lower it). ``self_influence[j] = score[j, j]`` with t = j: large for atypical or mislabelled
images (Koh & Liang, Section 5.4).

PERTURBATION (:mod:`.perturbation`): ``map[t, j] = -grad_x score[t, j]``, the gradient with respect
to training image j's normalised input, signed so that **moving the pixels of x_j along +map
raises the predicted loss on t** (``<map, delta>`` is the predicted change when x_j becomes
x_j + delta; Koh & Liang's I_pert,loss is ``n`` times the map).

nimarb's ``pytorch-influence-functions`` calls the opposite lists "harmful" and "helpful"; with
this convention :func:`top_k` returns ``helpful`` = largest scores, ``harmful`` = smallest.

Scores are computed by streaming training images in chunks against all ``s_test`` vectors at once:
their products with the gradients (:func:`.gradients.grad_dot`, which never builds a Linear weight's
per-example rows) where the hooks take the model, else materialised gradients
(:func:`.gradients.iter_grad_z`) times (K, P): memory stays at one chunk plus (K, P).
:class:`InfluenceEngine` ties a model, its training split and a solver together and caches the
fitted curvature and the scores under ``data/influence/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .distributed import broadcast_from_main, gather_columns, is_main, shard
from .gradients import DEFAULT_CHUNK, grad_dot, grad_z, iter_grad_z
from .hooks import _hooks_supported, prepare_dot_vectors
from .params import check_inputs, count_selected, data_length, iter_chunks
from .solvers.base import InverseHVP


def _n_classes(model: nn.Module, x: torch.Tensor) -> int | None:
    return getattr(model, "config", {}).get("n_classes") if hasattr(model, "config") else None


def s_test(
    model: nn.Module,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    solver: InverseHVP,
    layers: Sequence[str] | str | None = None,
) -> torch.Tensor:
    """``(C + weight_decay I + lambda I)^{-1} grad L(test)`` for each test example: (K, P).

    ``solver`` must already be fitted on the training set (same ``layers``).
    """
    check_inputs(test_x, test_y, _n_classes(model, test_x), what="test data")
    if solver.model is None:
        raise ValueError("fit the solver first: solver.fit(model, train_x, train_y, weight_decay)")
    layers = solver.layers if layers is None else layers
    p = next(model.parameters())
    g = grad_z(model, test_x.to(p.device, p.dtype), test_y.to(p.device), layers=layers)  # (K, P)
    return solver.inverse_hvp(g)


def influence(
    model: nn.Module,
    test_x: torch.Tensor | None,
    test_y: torch.Tensor | None,
    train,
    solver: InverseHVP,
    chunk_size: int = DEFAULT_CHUNK,
    progress: bool = False,
    stest: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Scores (n_test, n_train) with the module's sign convention (positive = helpful).

    ``train`` is the training split (or ``(x, y)``) the solver was fitted on; its gradients are
    streamed in chunks of ``chunk_size`` and never held all at once. ``stest`` may pass
    precomputed :func:`s_test` vectors (K, P) (any solver's, or nimarb's); then ``test_x`` and
    ``test_y`` may be None. Under ``torch.distributed`` (:mod:`.distributed`) call it on every
    rank: ``s_test`` is computed on rank 0 and broadcast, each rank scores its shard of the
    training examples, and rank 0 returns all the scores; other ranks return None.
    """
    if stest is not None:
        stest = stest[None] if stest.ndim == 1 else stest
        if stest.shape[1] != count_selected(model, getattr(solver, "layers", None)):
            raise ValueError(f"stest must have shape (K, {count_selected(model, getattr(solver, 'layers', None))}), got {tuple(stest.shape)}")
    elif is_main():
        stest = s_test(model, test_x, test_y, solver)
    stest = broadcast_from_main(stest)[0]
    n = data_length(train)
    p = next(model.parameters())
    mine = shard(train, n, block=chunk_size)
    scores = torch.empty(len(stest), data_length(mine), dtype=stest.dtype)
    progress = progress and is_main()
    layers = getattr(solver, "layers", None)
    if _hooks_supported(model, layers):  # products with the s_test vectors, no Linear-weight rows (grad_dot)
        stest_dev = stest.to(p.device, p.dtype)
        prepared = prepare_dot_vectors(model, stest_dev, layers)
        for start, x, y in iter_chunks(mine, chunk_size, p.device, p.dtype, progress, "scoring training images"):
            scores[:, start : start + len(x)] = grad_dot(model, x, y, stest_dev, layers, chunk_size, prepared)[0].T.cpu()
    else:
        for start, g in iter_grad_z(model, mine, chunk_size, p.device, layers, p.dtype, progress, "scoring training images"):
            scores[:, start : start + len(g)] = (stest @ g.T).cpu()  # (K, B)
    scores = gather_columns(scores, n, block=chunk_size)
    return None if scores is None else scores / n


def self_influence(
    model: nn.Module,
    train,
    solver: InverseHVP,
    chunk_size: int = DEFAULT_CHUNK,
    progress: bool = False,
) -> torch.Tensor | None:
    """``(1/n) grad L(j)^T (C + wd I + lambda I)^{-1} grad L(j)`` for every training example: (n,).

    Uses the fast solver's basis products where its rest is zero (``rest="damping"``: closed form,
    no Linear-weight rows); for the hybrid default, the same basis products and, from the chunk's
    gradients, one EK-FAC solve and one product with the bases
    (``solver.quadratic_form_with_products``); else ``solver.quadratic_form`` per chunk of gradients
    (EK-FAC; an inverse-HVP per example for the others). Under ``torch.distributed`` each rank
    takes its shard and rank 0 returns the whole vector; other ranks return None.
    """
    n = data_length(train)
    p = next(model.parameters())
    mine = shard(train, n, block=chunk_size)
    out = torch.empty(1, data_length(mine), dtype=p.dtype)
    basis = solver.basis()
    progress = progress and is_main()
    ready = getattr(solver, "basis_products_ready", None)
    if basis is not None and ready is not None and ready():  # the fast solver with its factors: no Linear-weight rows
        for start, x, y in iter_chunks(mine, chunk_size, p.device, p.dtype, progress, "self-influence"):
            out[0, start : start + len(x)] = solver.quadratic_form_from_products(*solver.basis_products(x, y)).cpu()
    elif ready is not None and ready():  # the hybrid: U^T g without the Linear-weight rows, EK-FAC's terms from g
        for start, x, y in iter_chunks(mine, chunk_size, p.device, p.dtype, progress, "self-influence"):
            g = grad_z(model, x, y, layers=solver.layers, chunk_size=chunk_size)
            out[0, start : start + len(x)] = solver.quadratic_form_with_products(g, solver.basis_products(x, y)[0]).cpu()
    else:
        for start, g in iter_grad_z(model, mine, chunk_size, p.device, solver.layers, p.dtype, progress, "self-influence"):
            if basis is not None:  # the fast solver: only products with its (r, P) basis and squared norms
                out[0, start : start + len(g)] = solver.quadratic_form_from_products(g @ basis.T, (g * g).sum(1)).cpu()
            else:
                out[0, start : start + len(g)] = solver.quadratic_form(g).cpu()
    out = gather_columns(out, n, block=chunk_size)
    return None if out is None else out[0] / n


@dataclass
class TopK:
    """The ``k`` most helpful and most harmful training images for each test image."""

    helpful: torch.Tensor  # (n_test, k) training indices, most helpful first (largest scores)
    helpful_scores: torch.Tensor  # (n_test, k)
    harmful: torch.Tensor  # (n_test, k) training indices, most harmful first (most negative scores)
    harmful_scores: torch.Tensor  # (n_test, k)


def top_k(scores: torch.Tensor, k: int = 10) -> TopK:
    """Top-k helpful (largest) and harmful (smallest) training indices per row of ``scores`` (n_test, n_train)."""
    if scores.ndim == 1:
        scores = scores[None]
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be between 1 and the number of training images ({scores.shape[1]}), got {k}")
    hs, hi = scores.topk(k, dim=1, largest=True)
    ls, li = scores.topk(k, dim=1, largest=False)
    return TopK(hi, hs, li, ls)
