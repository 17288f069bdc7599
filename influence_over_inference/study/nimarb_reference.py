"""nimarb's pytorch-influence-functions 0.1.1, run as published, and its LiSSA recursion repaired.

Source: the PyPI package ``pytorch-influence-functions`` 0.1.1 (github.com/nimarb/
pytorch_influence_functions), modules ``influence_function`` (``s_test``, ``grad_z``, ``hvp``)
and ``calc_influence_function`` (``calc_s_test_single``, ``calc_influence_single``,
``calc_img_wise``). This module runs that code unchanged on our models and tensors, so its answers
can be compared with ours, and writes down what it actually computes:

- **``s_test`` never feeds its estimate back.** Each step sets
  ``h_estimate = v + (1 - damp) * h_init_estimates - hvp(loss, params, h_init_estimates) / scale``
  but ``h_init_estimates`` stays ``v`` (a copy of the test gradient), so whatever the depth it
  returns ONE step of Koh & Liang's recursion on the LAST minibatch drawn. The other
  ``depth - 1`` Hessian-vector products are wasted.
- **The test gradient is not detached** (``grad_z`` uses ``create_graph=True``), so its ``hvp``
  also differentiates through ``v``: it returns ``H_last v + H_test g_last`` instead of
  ``H_last v`` (``H_test``: Hessian of the test image's loss; ``g_last``: gradient of the last
  minibatch's mean loss). All told, as measured in ``tests/test_nimarb.py``, it returns
  ``(2 - damp) v - (H_last v + H_test g_last) / scale`` (:func:`published_one_step`), with
  ``H_last`` the Hessian of the mean loss of that one minibatch (no weight decay). The returned
  tensors carry autograd graphs (and so do its ~0.4 MB training gradients).
- **It is never divided by ``scale``.** Koh & Liang's recursion converges to
  ``scale * (H + damp * scale * I)^{-1} v``; the inverse-HVP estimate is that divided by ``scale``.
- **``damp`` and ``scale`` from the config are ignored by ``calc_img_wise``**: it calls
  ``calc_influence_single``, which has no damp/scale arguments and calls ``calc_s_test_single``
  with the defaults ``damp=0.01, scale=25``.
- **r > 1 "averaging" concatenates lists**: ``s_test_vec += s_test_vec_list[i]`` extends a Python
  list, then every tensor is divided by r; the scoring ``zip`` with the gradient list stops at the
  first repetition, so the result is the FIRST repetition divided by r.
- **``calc_img_wise`` hard-codes CUDA** (``gpu=0``), so it fails on a machine without a GPU.
- **``calc_influence_single`` cannot finish on CUDA**: its influences are 0-dim tensors on the
  model's device, and its last step, ``np.argsort(influences)``, must turn them into numpy
  values, which only CPU tensors allow ("can't convert cuda:0 device type tensor to numpy";
  the same path fails for any non-CPU tensor: ``tests/test_nimarb.py``). Its ``s_test`` and
  ``grad_z`` do run on CUDA (``gpu >= 0`` moves their inputs with ``.cuda()``, i.e. to the
  current CUDA device; the model must already be there). So the scoring runs on a CPU model.
- **Its "harmful" list is Koh & Liang's "helpful" one.** It scores
  ``influence_j = -grad_z_j . s_test / n`` — Koh & Liang's I_up,loss divided by n, i.e. the change
  of the test loss when training image j is up-weighted by 1/n (for a correct s_test) — then calls
  ``argsort(influence)`` (most negative first: up-weighting lowers the test loss the most = most
  HELPFUL in Koh & Liang) "harmful" and its reverse "helpful".
- It computes every training gradient one image at a time, again for every test image.

Sign relative to this project's convention (score_j = (1/n) g_test^T (H + lambda I)^{-1} g_j,
positive = helpful): for the same inverse-HVP vector ``s``, nimarb's ``influence_j = -score_j``.
:func:`nimarb_scores` returns nimarb's numbers and lists unchanged; negate the numbers to compare
them with ours (:func:`to_project_sign`).

:func:`repaired_s_test` is the minimal repair: the estimate fed back, estimate and test gradient
detached, no graph kept between steps, divided by ``scale`` at the end, fed explicit minibatches
(:func:`draw_minibatches`) so that the same steps can be replayed by our LiSSA solver. At nimarb's
defaults (scale 25, batch 4) it diverges on a trained conv net (minibatch Hessian eigenvalues reach
hundreds to thousands, and LiSSA needs scale > the largest one).
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

log = logging.getLogger(__name__)

# nimarb's defaults: s_test(damp=0.01, scale=25.0, recursion_depth=5000), r_averaging 1, and the
# PyTorch CIFAR-10 tutorial's training loader (batch 4, shuffled) that its README builds on.
NIMARB_DAMP = 0.01


NIMARB_SCALE = 25.0


NIMARB_DEPTH = 5000


NIMARB_BATCH_SIZE = 4


def _nimarb():
    """Import nimarb's modules lazily (the package is a reference, not a dependency of the engine)."""
    from pytorch_influence_functions import calc_influence_function, influence_function

    return influence_function, calc_influence_function


@contextlib.contextmanager
def quiet():
    """Swallow nimarb's stdout progress bars and its implicit-dim log_softmax warning.

    ``with quiet(): h = influence_function.s_test(...)``: nimarb prints a progress line per
    step; nothing it computes is changed."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Implicit dimension choice.*")
        yield


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A list of parameter-shaped tensors -> one flat (P,) tensor, in ``model.parameters()`` order."""
    return torch.cat([t.reshape(-1) for t in tensors])


def to_vector(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """nimarb's list of parameter-shaped tensors (its ``grad_z`` and ``s_test`` results: autograd
    graphs attached, on its device) -> one detached flat (P,) vector on the CPU."""
    return flatten([t.detach() for t in parts]).cpu()


def nimarb_gpu(device: str | torch.device) -> int:
    """nimarb's ``gpu`` argument for a torch device: -1 for the CPU, the CUDA index otherwise.

    nimarb moves inputs with ``.cuda()`` (the current CUDA device), so with ``cuda:N`` (N > 0)
    make it current first (``torch.cuda.set_device``)."""
    device = torch.device(device)
    if device.type == "cpu":
        return -1
    if device.type != "cuda":
        raise ValueError(f"nimarb's package runs on the CPU or CUDA only, not on {device}")
    return device.index or 0


def unflatten(vector: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    """A flat (P,) vector -> a list of tensors shaped like ``model.parameters()``."""
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    if vector.ndim != 1 or vector.numel() != n:
        raise ValueError(f"expected a flat vector of {n} entries, got shape {tuple(vector.shape)}")
    out, start = [], 0
    for p in params:
        out.append(vector[start : start + p.numel()].view_as(p).to(p.dtype))
        start += p.numel()
    return out


def _as_single(x: torch.Tensor, y) -> tuple[torch.Tensor, torch.Tensor]:
    """One test image and label as nimarb's loaders give them: (1, ...) and (1,)."""
    x = torch.as_tensor(x)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image (C, H, W) or (1, C, H, W), got shape {tuple(x.shape)}")
    y = torch.as_tensor(y, dtype=torch.long).reshape(-1)
    if y.numel() != 1:
        raise ValueError(f"expected one label, got {y.numel()}")
    return x, y


def draw_minibatches(
    n_train: int, batch_size: int, depth: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """``depth`` index batches of ``batch_size`` distinct training indices, one per recursion step.

    Each is the first batch of a fresh shuffled pass, which is what nimarb's ``s_test`` takes from a
    shuffled DataLoader at every step (it restarts the loader and breaks after one batch).
    """
    if not 1 <= batch_size <= n_train:
        raise ValueError(f"batch_size must be in [1, {n_train}], got {batch_size}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    return [torch.randperm(n_train, generator=generator)[:batch_size] for _ in range(depth)]


class MinibatchFeed:
    """A stand-in for nimarb's ``z_loader`` that hands out known minibatches, one per pass.

    nimarb's ``s_test`` runs ``for x, t in z_loader: ...; break`` at every recursion step, so each
    step starts a new pass and uses its first batch. Each pass over a feed yields the next of
    ``index_batches`` (cycling), as ``(train_x[idx], train_y[idx])``; :attr:`last_indices` is the
    batch the last step used.
    """

    def __init__(self, train_x: torch.Tensor, train_y: torch.Tensor, index_batches: Sequence[torch.Tensor]):
        if len(train_x) != len(train_y):
            raise ValueError(f"train_x and train_y differ in length: {len(train_x)} vs {len(train_y)}")
        if len(index_batches) == 0:
            raise ValueError("index_batches is empty")
        self.train_x = train_x
        self.train_y = train_y
        self.index_batches = list(index_batches)
        self.n_passes = 0
        self.last_indices: torch.Tensor | None = None

    def __iter__(self):
        idx = self.index_batches[self.n_passes % len(self.index_batches)]
        self.n_passes += 1
        self.last_indices = idx
        yield self.train_x[idx], self.train_y[idx]

    def batches(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """All minibatches in order, as ``(x, y)`` pairs (for :func:`repaired_s_test` or our LiSSA)."""
        return ((self.train_x[idx], self.train_y[idx]) for idx in self.index_batches)


def nimarb_s_test(
    model: nn.Module,
    x_test: torch.Tensor,
    y_test,
    train_loader: Iterable,
    damp: float = NIMARB_DAMP,
    scale: float = NIMARB_SCALE,
    depth: int = NIMARB_DEPTH,
    r: int = 1,
    gpu: int = -1,
) -> torch.Tensor:
    """nimarb's published ``s_test`` for one test image, as a detached flat (P,) vector.

    ``train_loader``: a DataLoader or a :class:`MinibatchFeed`. Returns what its scoring uses:
    ``(2 - damp) v - H_last v / scale`` whatever ``depth`` (see the module docstring); for r > 1
    its ``calc_s_test_single``, whose result is the first repetition divided by r.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1 (nimarb's s_test fails at 0), got {depth}")
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    influence_function, calc = _nimarb()
    z, t = _as_single(x_test, y_test)
    n_params = len(list(model.parameters()))
    with quiet():
        if r == 1:
            h = influence_function.s_test(z, t, model, train_loader, gpu=gpu, damp=damp, scale=scale, recursion_depth=depth)
        else:
            h = calc.calc_s_test_single(model, z, t, train_loader, gpu=gpu, damp=damp, scale=scale, recursion_depth=depth, r=r)
    # for r > 1 the list holds r * n_params tensors; its scoring zip reads the first n_params only
    return flatten([part.detach() for part in h[:n_params]]).cpu()


@dataclass
class NimarbScores:
    """nimarb's ``calc_influence_single`` output, unchanged: its numbers and its lists."""

    influences: np.ndarray  # (M,) -grad_z_j . s_test / M: Koh & Liang's I_up,loss / M = -(our score)
    harmful: list[int]  # argsort ascending: Koh & Liang's (and our) most HELPFUL first
    helpful: list[int]  # its reverse: Koh & Liang's (and our) most HARMFUL first


def nimarb_scores(
    model: nn.Module,
    x_test: torch.Tensor,
    y_test,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    s_test_vec: torch.Tensor,
    gpu: int = -1,
) -> NimarbScores:
    """Run nimarb's ``calc_influence_single`` for one test image over the given training images.

    Each of the M training images gets its own ``grad_z`` (one backward pass each, with
    ``create_graph=True``) dotted with ``s_test_vec`` (a flat (P,) vector, e.g. from
    :func:`nimarb_s_test`), divided by M (the size of the set it is given). Sign: nimarb's
    ``influences`` are minus our scores for the same ``s_test_vec``; its ``harmful`` list is our
    (and Koh & Liang's) most helpful first.
    """
    _, calc = _nimarb()
    z, t = _as_single(x_test, y_test)
    if len(train_x) != len(train_y) or len(train_x) == 0:
        raise ValueError(f"train_x and train_y must be non-empty and equally long: {len(train_x)} vs {len(train_y)}")
    train_loader = DataLoader(TensorDataset(train_x, train_y), batch_size=1)
    test_loader = DataLoader(TensorDataset(z, t), batch_size=1)
    s_list = unflatten(s_test_vec.to(next(model.parameters()).device), model)
    with quiet():
        influences, harmful, helpful, _ = calc.calc_influence_single(
            model, train_loader, test_loader, test_id_num=0, gpu=gpu, recursion_depth=1, r=1, s_test_vec=s_list
        )
    values = np.array([float(v) for v in influences])
    return NimarbScores(values, list(harmful), list(helpful))


def to_project_sign(influences: np.ndarray | torch.Tensor, n_scored: int | None = None, n_train: int | None = None):
    """nimarb's ``influences`` in this project's convention: negated (positive = helpful).

    nimarb divides by the number of images it scored (``n_scored``); pass ``n_train`` to divide by
    the full training-set size instead, as our scores do.
    """
    out = -influences
    if n_scored is not None and n_train is not None:
        out = out * (n_scored / n_train)
    return out


def _hvp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, vec: list[torch.Tensor]) -> list[torch.Tensor]:
    """H_batch vec for the mean cross-entropy of one minibatch (double backward, no graph kept)."""
    params = [p for p in model.parameters()]
    loss = F.cross_entropy(model(x), y)  # == nimarb's calc_loss (log_softmax over dim 1 + nll mean)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vec, strict=True))
    return [h.detach() for h in torch.autograd.grad(dot, params)]


def repaired_s_test(
    model: nn.Module,
    x_test: torch.Tensor,
    y_test,
    minibatches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    damp: float = NIMARB_DAMP,
    scale: float = NIMARB_SCALE,
    weight_decay: float = 0.0,
    divide_by_scale: bool = True,
) -> torch.Tensor:
    """Koh & Liang's LiSSA recursion as nimarb meant it, repaired; a flat (P,) vector.

    ``h_0 = v``; for each ``(x_b, y_b)`` in ``minibatches``:
    ``h <- v + (1 - damp) h - (H_b h + weight_decay h) / scale`` with the estimate fed back and
    everything detached; returns ``h / scale`` (``divide_by_scale=False``: ``h`` itself). With a
    fixed H it converges to ``(H + weight_decay I + damp * scale I)^{-1} v``. ``weight_decay`` is
    not in nimarb (0 keeps its objective); it adds the training L2 term to the curvature.
    Inputs are moved to the model's device; the result is on the CPU.
    """
    model.eval()
    dev = next(model.parameters()).device
    z, t = (a.to(dev) for a in _as_single(x_test, y_test))
    params = [p for p in model.parameters()]
    v = [g.detach() for g in torch.autograd.grad(F.cross_entropy(model(z), t), params)]
    h = [g.clone() for g in v]
    n_steps = 0
    for x_b, y_b in minibatches:
        hv = _hvp(model, x_b.to(dev), y_b.to(dev), h)
        h = [v_ + (1 - damp) * h_ - (hv_ + weight_decay * h_) / scale for v_, h_, hv_ in zip(v, h, hv, strict=True)]
        n_steps += 1
    if n_steps == 0:
        raise ValueError("minibatches is empty: the recursion needs at least one step")
    out = flatten(h).cpu()
    if not torch.isfinite(out).all():
        log.warning("repaired recursion diverged (non-finite) after %d steps: raise scale", n_steps)
    return out / scale if divide_by_scale else out


def published_one_step(
    model: nn.Module,
    x_test: torch.Tensor,
    y_test,
    x_last: torch.Tensor,
    y_last: torch.Tensor,
    damp: float,
    scale: float,
    graph_term: bool = True,
) -> torch.Tensor:
    """What nimarb's ``s_test`` returns, written out (flat (P,)):
    ``(2 - damp) v - (H_last v + H_test g_last) / scale``.

    ``graph_term=False`` drops ``H_test g_last``, the term its undetached test gradient adds
    (what one step of the recursion would give with ``v`` detached). Inputs are moved to the
    model's device; the result is on the CPU.
    """
    model.eval()
    dev = next(model.parameters()).device
    z, t = (a.to(dev) for a in _as_single(x_test, y_test))
    x_last, y_last = x_last.to(dev), y_last.to(dev)
    params = [p for p in model.parameters()]
    v = [g.detach() for g in torch.autograd.grad(F.cross_entropy(model(z), t), params)]
    hv = _hvp(model, x_last, y_last, v)
    if graph_term:
        g_last = [g.detach() for g in torch.autograd.grad(F.cross_entropy(model(x_last), y_last), params)]
        hv = [a + b for a, b in zip(hv, _hvp(model, z, t, g_last), strict=True)]
    return flatten([(2 - damp) * v_ - hv_ / scale for v_, hv_ in zip(v, hv, strict=True)]).cpu()




def timed(fn: Callable, *args, **kwargs) -> tuple[object, float]:
    """``(fn(*args, **kwargs), wall seconds)``."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


@dataclass
class NimarbCost:
    """nimarb's measured costs per test image, and the extrapolation to the full task."""

    s_test_s: float  # one nimarb_s_test call at the given depth and batch size
    per_train_image_s: float  # calc_influence_single's grad_z + dot per training image
    n_train_measured: int  # training images the per-image cost was measured on

    def per_test_s(self, n_train: int) -> float:
        """Seconds per test image over ``n_train`` training images (calc_img_wise recomputes all)."""
        return self.s_test_s + self.per_train_image_s * n_train

    def total_s(self, n_test: int, n_train: int) -> float:
        return n_test * self.per_test_s(n_train)


def measure_nimarb_cost(
    model: nn.Module,
    x_test: torch.Tensor,
    y_test,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    train_loader: Iterable,
    damp: float,
    scale: float,
    depth: int,
    n_train_measured: int,
) -> tuple[NimarbCost, torch.Tensor, NimarbScores]:
    """Time nimarb's ``s_test`` (full ``depth``) and its scoring over the first ``n_train_measured``
    training images, for one test image. Returns the costs, the s_test vector and the scores."""
    s_vec, s_seconds = timed(nimarb_s_test, model, x_test, y_test, train_loader, damp=damp, scale=scale, depth=depth)
    log.info("nimarb s_test depth %d: %.1f s", depth, s_seconds)
    m = min(n_train_measured, len(train_x))
    scores, score_seconds = timed(nimarb_scores, model, x_test, y_test, train_x[:m], train_y[:m], s_vec)
    log.info("nimarb scoring of %d training images: %.1f s", m, score_seconds)
    return NimarbCost(s_seconds, score_seconds / m, m), s_vec, scores
