"""Perturbation influence (Koh & Liang, ICML 2017, §2.2 and §5.2): which pixels of a training image matter.

For a test image t (its ``s_test`` vector, :func:`.scores.s_test`) and a training image
z_j = (x_j, y_j), the map is the gradient with respect to the training image's (normalised) input::

    map[t, j] = -(1/n) * grad_x [ s_test(t)^T grad_theta L(x_j, y_j) ]      # (C, H, W) per pair
              = -grad_x score[t, j]

so that the first-order prediction of the change in test image t's loss, if x_j were replaced by
x_j + delta and the model retrained, is ``<map[t, j], delta>``: **moving the pixels along +map
raises the predicted test loss** (Koh & Liang's I_pert,loss is ``n`` times this map). The sign
convention is written beside the score's in :mod:`.scores`; a helpful image (positive score)
made less like itself along ``+map`` helps less.

Computed by one double backward per test vector and chunk of training images: the per-example
terms ``s^T grad_theta L(x_b)`` of a chunk depend on their own ``x_b`` only (eval mode: BatchNorm
uses its running statistics), so the gradient of their sum with respect to the chunk's inputs
gives every image's map at once. Works for any model the engine supports (``functional_call`` on
the selected parameters; frozen layers are held fixed).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call

from .params import _split_params, check_inputs, count_selected

DEFAULT_PERTURBATION_CHUNK = 64  # training images per double backward: the second-order graph of the CNN stays small


def perturbation_influence(
    model: nn.Module,
    stest: torch.Tensor,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    n_train: int,
    layers: Sequence[str] | str | None = None,
    chunk_size: int = DEFAULT_PERTURBATION_CHUNK,
) -> torch.Tensor:
    """Perturbation-influence maps (K, N, *input shape): predicted test-loss change per unit input step.

    ``stest`` (K, P): :func:`.scores.s_test` vectors of K test images (the same ``layers``);
    ``train_x`` (N, ...), ``train_y`` (N,): the training images to map, as the model sees them
    (normalised); ``n_train``: the size n of the training set the solver was fitted on (the
    ``1/n`` of the score). ``<map[k, j], delta>`` predicts the rise of test image k's loss when
    training image j is replaced by ``x_j + delta`` (see the module docstring). Model in eval mode,
    restored afterwards; results do not depend on ``chunk_size`` (tested).
    """
    check_inputs(train_x, train_y, what="training images")
    stest = stest[None] if stest.ndim == 1 else stest
    if stest.ndim != 2 or stest.shape[1] != count_selected(model, layers):
        raise ValueError(f"stest must have shape (K, {count_selected(model, layers)}), got {tuple(stest.shape)}")
    if n_train < 1:
        raise ValueError(f"n_train must be >= 1, got {n_train}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    p0 = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        params, frozen, buffers = _split_params(model, layers)
        params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        names = list(params)
        stest = stest.to(p0.device, p0.dtype)
        out = torch.empty(len(stest), *train_x.shape, dtype=p0.dtype)  # (K, N, C, H, W)
        for start in range(0, len(train_x), chunk_size):
            xb = train_x[start : start + chunk_size].to(p0.device, p0.dtype).detach().requires_grad_(True)
            yb = train_y[start : start + chunk_size].to(p0.device)
            with torch.enable_grad():
                logits = functional_call(model, ({**frozen, **params}, buffers), (xb,))
                loss = nn.functional.cross_entropy(logits, yb, reduction="sum")  # sum: per-example gradients add up
                grads = torch.autograd.grad(loss, [params[k] for k in names], create_graph=True, allow_unused=True)
                flat = torch.cat([(g if g is not None else torch.zeros_like(params[k])).reshape(-1)
                                  for g, k in zip(grads, names, strict=True)])  # (P,) = sum_b grad_theta L(x_b)
                for k in range(len(stest)):
                    dot = flat @ stest[k]  # sum_b s_k^T grad_theta L(x_b)
                    gx = torch.autograd.grad(dot, xb, retain_graph=k + 1 < len(stest))[0]  # (B, C, H, W)
                    out[k, start : start + len(xb)] = (-gx / n_train).detach().cpu()
        return out
    finally:
        model.train(was_training)


def predicted_change(maps: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """First-order predicted test-loss changes ``<map[k, j], delta[j]>``: maps (K, N, ...), delta (N, ...) -> (K, N)."""
    if maps.shape[1:] != delta.shape:
        raise ValueError(f"delta {tuple(delta.shape)} must match the maps' training images {tuple(maps.shape[1:])}")
    return (maps * delta.to(maps.dtype)[None]).flatten(2).sum(2)
