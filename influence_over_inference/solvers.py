"""Inverse Hessian-vector products ``(C + weight_decay I + damping I)^{-1} v`` behind one interface.

``C`` is the curvature of the *mean* training loss (cross-entropy, no weight-decay term) at the
trained parameters; the training weight decay adds ``weight_decay * I`` (Koh & Liang 2017 take
the Hessian of the whole training objective) and ``damping`` is the explicit extra damping
``lambda``. Two curvatures:

- ``"hessian"``: the true Hessian; products by forward-over-reverse differentiation
  (``torch.func.jvp`` of ``torch.func.grad``, Pearlmutter 1994). A trained CNN's Hessian has
  negative eigenvalues, so ``C + lambda I`` may be indefinite.
- ``"ggn"``: the generalised Gauss-Newton ``J^T (diag(p) - p p^T) J`` (Martens 2014;
  Schraudolph 2002), positive semi-definite; for softmax cross-entropy it equals the Fisher
  ``sum_c p_c g(c) g(c)^T`` of the per-class gradients. The safer default.

The solvers follow alstonlo/torch-influence: one abstract method, :meth:`InverseHVP.inverse_hvp`,
and paper names (``damp``, ``scale``, ``depth``, ``repeat`` = r):

- :class:`ExactSolver`: the explicitly built matrix and a direct (LU) solve; small models, tests.
- :class:`CGSolver`: conjugate gradient (Hestenes & Stiefel 1952; Martens 2010) on damped
  curvature-vector products over the training set or a fixed subsample, batched over vectors.
- :class:`LiSSASolver`: Agarwal et al. (2017) / Koh & Liang's recursion, done right (the estimate
  fed back, divided by ``scale``, ``repeat`` runs averaged, divergence detected).
- :class:`FastSolver`: fits the top GGN eigenpairs once (from per-class gradients of a
  subsample) and then solves any number of vectors in closed form (see its docstring for the
  design, how it was chosen, and where it is inexact).

Settings are dataclasses with commented, validated defaults; :func:`make_solver` builds a
solver from a name and keyword settings (the command line and the notebook use it).
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from .gradients import (
    _hooks_supported,
    _split_params,
    as_tensors,
    check_inputs,
    class_gradient_parts,
    class_gradients,
    count_selected,
    data_length,
    flatten_params,
    select_parameters,
    unflatten_params,
)

log = logging.getLogger(__name__)

CURVATURES = ("ggn", "hessian")


class LiSSADivergenceError(RuntimeError):
    """LiSSA's recursion blew up (norm growth or NaN): ``scale`` is below the curvature's largest eigenvalue."""


# ----------------------------------------------------------------------------- curvature products

def curvature_products(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    vectors: torch.Tensor,
    curvature: str = "ggn",
    layers: Sequence[str] | str | None = None,
    chunk_size: int = 1000,
) -> torch.Tensor:
    """``C v`` for each row of ``vectors`` (K, P): C the curvature of the mean loss over ``(x, y)``.

    No weight-decay or damping term. ``"hessian"``: forward-over-reverse HVPs; ``"ggn"``:
    ``J^T H_out J v`` with H_out the softmax cross-entropy Hessian in the logits. Streams ``x``
    in chunks; vectorised over the K vectors with vmap. Model in eval mode.
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    if len(vectors) <= SMALL_K:
        return _products_loop(model, x, y, vectors, curvature, layers, chunk_size)
    if curvature == "ggn" and _hooks_supported(model, layers):
        # per-example factor rows (hooks, no vmap): GGN v = (1/n) sum_i R_i^T (R_i v)
        total = torch.zeros_like(vectors)
        for start in range(0, len(x), chunk_size):
            rows = ggn_factor(model, x[start : start + chunk_size], layers)  # (B*C, P)
            total += (vectors @ rows.T) @ rows
        return total / len(x)
    was_training = model.training
    model.eval()
    try:
        params, frozen, buffers = _split_params(model, layers)
        total = torch.zeros_like(vectors)
        n = len(x)
        for start in range(0, n, chunk_size):
            xb, yb = x[start : start + chunk_size], y[start : start + chunk_size]

            def f_logits(p, xb=xb):
                return functional_call(model, ({**frozen, **p}, buffers), (xb,))

            if curvature == "hessian":

                def f_loss(p, xb=xb, yb=yb):
                    return nn.functional.cross_entropy(f_logits(p, xb), yb, reduction="sum")

                def hvp_one(v, f_loss=f_loss):
                    tangent = unflatten_params(v, params)
                    return flatten_params(jvp(grad(f_loss), (params,), (tangent,))[1])

                total += vmap(hvp_one)(vectors)
            else:
                logits, pullback = vjp(f_logits, params)
                probs = torch.softmax(logits.detach(), dim=1)  # (B, C)

                def ggn_one(v, f_logits=f_logits, probs=probs, pullback=pullback):
                    jv = jvp(f_logits, (params,), (unflatten_params(v, params),))[1]  # (B, C)
                    hjv = probs * jv - probs * (probs * jv).sum(1, keepdim=True)  # (diag(p) - p p^T) J v
                    return flatten_params(pullback(hjv)[0])

                total += vmap(ggn_one)(vectors)
        return total / n
    finally:
        model.train(was_training)


SMALL_K = 4  # up to this many vectors, products loop over them with plain autograd (no vmap, no factor rows)


def _products_loop(model, x, y, vectors, curvature, layers, chunk_size):
    """``C v`` for a few vectors: Hessian by double backward (Pearlmutter), GGN by J v (double-vjp trick) then J^T."""
    was_training = model.training
    model.eval()
    try:
        named = dict(model.named_parameters())
        names = list(select_parameters(model, layers))
        params = [named[k] for k in names]
        total = torch.zeros_like(vectors)
        for start in range(0, len(x), chunk_size):
            xb, yb = x[start : start + chunk_size], y[start : start + chunk_size]
            with torch.enable_grad():
                logits = model(xb)
                if curvature == "hessian":
                    loss = nn.functional.cross_entropy(logits, yb, reduction="sum")
                    grads = torch.autograd.grad(loss, params, create_graph=True)
                    flat = torch.cat([g.reshape(-1) for g in grads])
                    for k, v in enumerate(vectors):
                        hv = torch.autograd.grad((flat * v).sum(), params, retain_graph=True, allow_unused=True)
                        total[k] += torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1) for h, p in zip(hv, params, strict=True)])
                else:
                    probs = torch.softmax(logits.detach(), dim=1)
                    u = torch.zeros_like(logits, requires_grad=True)  # dummy cotangent: J v = d/du (J^T u . v)
                    jt_u = torch.autograd.grad(logits, params, grad_outputs=u, create_graph=True)
                    flat_jt_u = torch.cat([g.reshape(-1) for g in jt_u])
                    for k, v in enumerate(vectors):
                        jv = torch.autograd.grad((flat_jt_u * v).sum(), u, retain_graph=True)[0]  # (B, C)
                        hjv = probs * jv - probs * (probs * jv).sum(1, keepdim=True)
                        back = torch.autograd.grad(logits, params, grad_outputs=hjv, retain_graph=True, allow_unused=True)
                        total[k] += torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1) for h, p in zip(back, params, strict=True)])
        return total / len(x)
    finally:
        model.train(was_training)


def ggn_factor(model: nn.Module, x: torch.Tensor, layers: Sequence[str] | str | None = None) -> torch.Tensor:
    """Rows R (B*C, P) with ``R^T R = sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i`` over the B examples.

    Row ``(i, c)`` is ``sqrt(p_ic) * grad L(x_i, label=c)`` (see :func:`.gradients.class_gradients`).
    """
    _, rows = class_gradients(model, x, layers)  # (B, C, P)
    return rows.reshape(-1, rows.shape[-1])


def curvature_matrix(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    curvature: str = "ggn",
    layers: Sequence[str] | str | None = None,
    block: int = 256,
    chunk_size: int = 1000,
) -> torch.Tensor:
    """The explicit curvature matrix (P, P) of the mean loss over ``(x, y)`` (no weight decay).

    GGN: summed from the per-example factor rows (:func:`ggn_factor`). Hessian: built column
    block by column block from :func:`curvature_products`, symmetrised. Small models only (P up
    to a few thousand).
    """
    if curvature == "ggn":
        total = None
        for start in range(0, len(x), chunk_size):
            rows = ggn_factor(model, x[start : start + chunk_size], layers)  # (B*C, P)
            total = rows.T @ rows if total is None else total + rows.T @ rows
        return total / len(x)
    p = count_selected(model, layers)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    eye = torch.eye(p, dtype=dtype, device=device)
    cols = [curvature_products(model, x, y, eye[s : s + block], curvature, layers, chunk_size) for s in range(0, p, block)]
    m = torch.cat(cols)
    return (m + m.T) / 2


# ----------------------------------------------------------------------------- settings

def _check_common(s) -> None:
    if s.curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {s.curvature!r}")
    if not s.damping >= 0 or not math.isfinite(s.damping):
        raise ValueError(f"damping must be a finite number >= 0, got {s.damping}")


@dataclass
class ExactSettings:
    curvature: str = "ggn"  # "ggn" (PSD, default) or "hessian" (true Hessian, may be indefinite)
    damping: float = 0.01  # lambda: extra damping added to C + weight_decay I
    chunk_size: int = 1000  # training examples per curvature-product call

    def __post_init__(self):
        _check_common(self)


@dataclass
class CGSettings:
    curvature: str = "ggn"  # "ggn" (PSD: CG is guaranteed to converge) or "hessian"
    damping: float = 0.01  # lambda: extra damping added to C + weight_decay I
    tol: float = 1e-6  # stop when ||residual|| <= tol * ||v|| for every vector
    max_iter: int = 100  # iteration cap (a warning is logged if not converged)
    n_samples: int | None = None  # curvature over a fixed seeded subsample of this many examples (None: all)
    seed: int = 0  # seeds the subsample
    chunk_size: int = 1000  # training examples per curvature-product call
    max_factor_mb: float = 2048.0  # GGN: hold the subsample's factor rows (n*C*P floats) if under this; each iteration is then two matmuls

    def __post_init__(self):
        _check_common(self)
        if self.max_factor_mb < 0:
            raise ValueError(f"max_factor_mb must be >= 0, got {self.max_factor_mb}")
        if not self.tol > 0:
            raise ValueError(f"tol must be > 0, got {self.tol}")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")
        if self.n_samples is not None and self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1 or None, got {self.n_samples}")


@dataclass
class LiSSASettings:
    curvature: str = "ggn"  # "ggn" or "hessian" (Koh & Liang use the Hessian)
    damping: float = 0.01  # lambda, as for every solver; the paper's damp = damping / scale
    scale: float = 500.0  # must exceed the largest eigenvalue of a minibatch curvature (+ weight decay)
    depth: int = 5000  # recursion steps per repetition
    repeat: int = 1  # r: independent repetitions averaged
    batch_size: int = 100  # training examples per recursion step (drawn with replacement-free sampling)
    seed: int = 0  # seeds the minibatch sampling (torch.Generator)
    blowup: float = 1e4  # divergence when ||h|| > blowup * ||v|| / damp, or not finite
    check_every: int = 10  # test for divergence every this many steps

    def __post_init__(self):
        _check_common(self)
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.depth < 1 or self.repeat < 1 or self.batch_size < 1 or self.check_every < 1:
            raise ValueError("depth, repeat, batch_size and check_every must be >= 1")
        if not self.blowup > 1:
            raise ValueError(f"blowup must be > 1, got {self.blowup}")

    @property
    def damp(self) -> float:
        """Koh & Liang's ``damp``: the recursion's damping, ``damping / scale``."""
        return self.damping / self.scale

    @classmethod
    def from_paper(cls, damp: float, scale: float, depth: int, repeat: int = 1, **rest) -> LiSSASettings:
        """Settings from the paper's (and nimarb's) names: the effective damping is ``damp * scale``."""
        return cls(damping=damp * scale, scale=scale, depth=depth, repeat=repeat, **rest)


@dataclass
class FastSettings:
    damping: float = 0.01  # lambda: extra damping added to GGN + weight_decay I
    rank: int = 500  # number of top GGN eigenpairs kept (at most n_samples * n_classes)
    n_samples: int = 500  # training examples whose per-class gradients form the GGN factor (the benchmark and validation settings; accuracy is set by this, not by rank)
    seed: int = 0  # seeds the subsample
    chunk_size: int = 100  # examples per per-class-gradient call (rows = chunk_size * n_classes)
    curvature: str = "ggn"  # the fast solver is built on the GGN's per-example factorisation

    def __post_init__(self):
        _check_common(self)
        if self.curvature != "ggn":
            raise ValueError("the fast solver uses the Gauss-Newton curvature; set curvature='ggn'")
        if self.rank < 1 or self.n_samples < 1 or self.chunk_size < 1:
            raise ValueError("rank, n_samples and chunk_size must be >= 1")


# ----------------------------------------------------------------------------- the interface

class InverseHVP(abc.ABC):
    """Solves ``(C + weight_decay I + damping I) s = v`` for rows ``v`` of a (K, P) matrix.

    Use: ``solver.fit(model, train_x, train_y, weight_decay)`` once, then
    ``solver.inverse_hvp(vectors)`` as often as needed. Subclasses implement only
    :meth:`inverse_hvp`; the rest (checks, curvature products, quadratic forms) is shared.
    """

    name = "base"
    settings_class: type = ExactSettings

    progress = False

    def __init__(self, settings=None, **overrides):
        if settings is None:
            settings = self.settings_class(**overrides)
        elif overrides:
            settings = self.settings_class(**{**asdict(settings), **overrides})
        if not isinstance(settings, self.settings_class):
            raise ValueError(f"{type(self).__name__} takes {self.settings_class.__name__}, got {type(settings).__name__}")
        self.settings = settings
        self.model = None

    # -- fitting --------------------------------------------------------------------------
    def fit(self, model: nn.Module, train_x, train_y: torch.Tensor | None = None, weight_decay: float = 0.0,
            layers: Sequence[str] | str | None = None, state: dict | None = None, progress: bool = False) -> InverseHVP:
        """Remember the model and training data (``train_x, train_y`` tensors, or a split as ``train_x``).

        ``weight_decay`` is the training recipe's L2 coefficient (it adds ``weight_decay * I``).
        Subclasses that precompute (the exact matrix, the fast solver's factor) do it here, unless
        ``state`` (an earlier :meth:`state_dict`, e.g. from a cache) is given. ``progress``: tqdm bars.
        """
        self.progress = progress
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.train_data = train_x if train_y is None else (train_x, train_y)
        self.n_train = data_length(self.train_data)
        if self.n_train == 0:
            raise ValueError("the training set is empty")
        if train_y is not None:
            check_inputs(train_x, train_y, what="training data")
        self.model = model.eval()
        self.weight_decay = float(weight_decay)
        self.layers = layers
        self.n_params = count_selected(model, layers)
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        if state:
            self._fit_light()
            self.load_state_dict(state)
        else:
            self._fit()
        return self

    def _fit_light(self) -> None:  # noqa: B027
        """What :meth:`load_state_dict` leaves to do (default: nothing)."""

    def _fit(self) -> None:  # noqa: B027
        """Precompute what :meth:`inverse_hvp` needs (default: nothing)."""

    @property
    def total_damping(self) -> float:
        """weight_decay + damping: the multiple of I added to C."""
        return self.weight_decay + self.settings.damping

    def _train_tensors(self, indices=None) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = as_tensors(self.train_data, indices)
        return x.to(self.device, self.dtype), y.to(self.device)

    def _check_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__}: call fit(model, train_x, train_y, weight_decay) first")
        if vectors.ndim == 1:
            vectors = vectors[None]
        if vectors.ndim != 2 or vectors.shape[1] != self.n_params:
            raise ValueError(f"vectors must have shape (K, {self.n_params}) (one row per test gradient), got {tuple(vectors.shape)}")
        if not torch.isfinite(vectors).all():
            raise ValueError("vectors contain NaN or inf; check the test inputs and the model's loss")
        return vectors.to(self.device, self.dtype)

    # -- the one method a solver implements -----------------------------------------------
    @abc.abstractmethod
    def inverse_hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(C + weight_decay I + damping I)^{-1} v`` for each row: (K, P) -> (K, P)."""

    def quadratic_form(self, vectors: torch.Tensor) -> torch.Tensor:
        """``v^T (C + weight_decay I + damping I)^{-1} v`` for each row: (K, P) -> (K,)."""
        vectors = self._check_vectors(vectors)
        return (self.inverse_hvp(vectors) * vectors).sum(1)

    def basis(self) -> torch.Tensor | None:
        """(r, P) rows such that quadratic forms need only products with them (fast solver); else None."""
        return None

    def quadratic_form_from_products(self, dots: torch.Tensor, sqnorms: torch.Tensor) -> torch.Tensor:
        """Quadratic forms from ``v @ basis().T`` (N, r) and ``||v||^2`` (N,); only where :meth:`basis` is not None."""
        raise NotImplementedError(f"{type(self).__name__} has no basis; use quadratic_form")

    # -- caching ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Tensors of the fitted curvature worth caching (empty for matrix-free solvers)."""
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027
        """Restore what :meth:`state_dict` gave (``fit(..., state=...)`` calls it)."""

    def describe(self) -> dict:
        """Name and settings: part of every cache key and results file."""
        return {"solver": self.name, **asdict(self.settings)}


# ----------------------------------------------------------------------------- exact

class ExactSolver(InverseHVP):
    """The explicitly built damped curvature matrix (P, P) and an LU solve. Small models only.

    ``self.matrix`` is ``C + (weight_decay + damping) I`` (float of the model's dtype).
    """

    name = "exact"
    settings_class = ExactSettings

    def _fit(self) -> None:
        if self.n_params > 20_000:
            raise ValueError(f"the exact solver builds a {self.n_params} x {self.n_params} matrix; use 'cg' or 'fast' for a model this size")
        x, y = self._train_tensors()
        c = curvature_matrix(self.model, x, y, self.settings.curvature, self.layers, chunk_size=self.settings.chunk_size)
        self.curvature = c
        self.matrix = c + self.total_damping * torch.eye(len(c), dtype=c.dtype, device=c.device)
        self._factor()

    def _factor(self):
        self._lu = torch.linalg.lu_factor(self.matrix)

    def inverse_hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        vectors = self._check_vectors(vectors)
        return torch.linalg.lu_solve(*self._lu, vectors.T).T

    def state_dict(self) -> dict:
        return {"curvature": self.curvature}

    def load_state_dict(self, state: dict) -> None:
        self.curvature = state["curvature"].to(self.device, self.dtype)
        self.matrix = self.curvature + self.total_damping * torch.eye(len(self.curvature), dtype=self.dtype, device=self.device)
        self._factor()


# ----------------------------------------------------------------------------- conjugate gradient

class CGSolver(InverseHVP):
    """Conjugate gradient on ``(C + weight_decay I + damping I) s = v``, all K vectors at once.

    Each iteration costs one batched curvature product over the training set (or the fixed
    subsample). ``self.residuals`` holds, per iteration, the largest relative residual
    ``||r|| / ||v||`` over the vectors of the last call.
    """

    name = "cg"
    settings_class = CGSettings

    def _fit_light(self) -> None:
        self._fit()

    def _fit(self) -> None:
        s = self.settings
        if s.n_samples is not None and s.n_samples < self.n_train:
            gen = torch.Generator().manual_seed(s.seed)
            idx = torch.randperm(self.n_train, generator=gen)[: s.n_samples].sort().values
            self._x, self._y = self._train_tensors(idx)
        else:
            self._x, self._y = self._train_tensors()
        self.residuals: list[float] = []
        self._factor = None
        n_classes = None
        if s.curvature == "ggn" and _hooks_supported(self.model, self.layers):
            with torch.no_grad():
                n_classes = self.model(self._x[:1]).shape[1]
            size_mb = len(self._x) * n_classes * self.n_params * self._x.element_size() / 2**20
            if size_mb <= s.max_factor_mb:
                rows = [ggn_factor(self.model, self._x[i : i + s.chunk_size], self.layers) for i in range(0, len(self._x), s.chunk_size)]
                self._factor = torch.cat(rows) / math.sqrt(len(self._x))  # (n*C, P): GGN = factor.T @ factor
                log.info("CG holds the GGN factor of %d examples (%.0f MB)", len(self._x), size_mb)

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        """The damped operator ``(C + weight_decay I + damping I) v`` for rows (K, P)."""
        s = self.settings
        if self._factor is not None:
            f = self._factor
            cv = ((vectors.to(f.dtype) @ f.T) @ f).to(vectors.dtype)
        else:
            cv = curvature_products(self.model, self._x, self._y, vectors.to(self.dtype), s.curvature, self.layers, s.chunk_size).to(vectors.dtype)
        return cv + self.total_damping * vectors

    def inverse_hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        b = self._check_vectors(vectors).double()  # CG's recurrences in float64 (orthogonality)
        s = self.settings
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rs = (r * r).sum(1)
        bnorm = b.norm(dim=1).clamp_min(torch.finfo(b.dtype).tiny)
        self.residuals = [float((rs.sqrt() / bnorm).max())]
        active = rs.sqrt() > s.tol * bnorm
        warned = False
        for it in range(s.max_iter):
            if not active.any():
                break
            ap = torch.zeros_like(p)
            ap[active] = self.apply(p[active])
            pap = (p * ap).sum(1)
            if (pap[active] <= 0).any() and not warned:
                warned = True
                log.warning("CG met a direction of non-positive curvature at iteration %d: the damped %s is "
                            "indefinite; raise damping or use curvature='ggn'", it, s.curvature)
            alpha = torch.where(active, rs / torch.where(pap == 0, torch.ones_like(pap), pap), torch.zeros_like(rs))
            x += alpha[:, None] * p
            r -= alpha[:, None] * ap
            rs_new = (r * r).sum(1)
            beta = torch.where(active, rs_new / rs.clamp_min(torch.finfo(b.dtype).tiny), torch.zeros_like(rs))
            p = r + beta[:, None] * p
            rs = rs_new
            rel = rs.sqrt() / bnorm
            self.residuals.append(float(rel.max()))
            active = rel > s.tol
        else:
            if active.any():
                log.warning("CG stopped at max_iter=%d with relative residual %.2e > tol=%.1e", s.max_iter, self.residuals[-1], s.tol)
        return x.to(self.dtype)


# ----------------------------------------------------------------------------- LiSSA

class LiSSASolver(InverseHVP):
    """LiSSA (Agarwal, Bullins & Hazan 2017) as Koh & Liang use it, done right.

    For each repetition, with ``damp = damping / scale`` and a fresh minibatch B_t each step::

        h_0 = v;   h_t = v + (1 - damp) h_{t-1} - (C_{B_t} + weight_decay I) h_{t-1} / scale

    whose fixed point is ``h = scale (C + weight_decay I + damping I)^{-1} v``; the result is
    ``h_depth / scale`` averaged over ``repeat`` repetitions. Nothing is differentiated through
    the recursion (no graph kept). It converges when ``scale`` exceeds the largest eigenvalue of
    every minibatch curvature (plus weight decay); otherwise :class:`LiSSADivergenceError` is
    raised early, with an estimate of that eigenvalue. Minibatches are drawn with a seeded
    ``torch.Generator``, or given explicitly via :meth:`inverse_hvp`'s ``batches``.
    """

    name = "lissa"
    settings_class = LiSSASettings

    def _batches(self, gen: torch.Generator):
        s = self.settings
        n = self.n_train
        order, pos = torch.randperm(n, generator=gen), 0
        while True:
            if pos + s.batch_size > n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos : pos + s.batch_size]
            pos += s.batch_size
            yield self._train_tensors(idx.sort().values)

    def _batch_product(self, xb, yb, h):
        return curvature_products(self.model, xb, yb, h, self.settings.curvature, self.layers, chunk_size=len(xb)) + self.weight_decay * h

    def inverse_hvp(self, vectors: torch.Tensor, batches: Iterable | None = None) -> torch.Tensor:
        """As the base class; ``batches`` (optional) is an iterable of ``(x, y)`` minibatches used in
        order, one per step, instead of seeded sampling (``depth`` steps per repetition)."""
        v = self._check_vectors(vectors)
        s = self.settings
        gen = torch.Generator().manual_seed(s.seed)
        estimates = []
        vnorm = v.norm(dim=1)
        limit = s.blowup * vnorm / max(s.damp, 1e-12)
        for rep in range(s.repeat):
            source = iter(batches) if batches is not None else self._batches(gen)
            h = v.clone()
            for step in range(s.depth):
                try:
                    xb, yb = next(source)
                except StopIteration:
                    raise ValueError(f"batches ran out after {step} steps; LiSSA needs depth={s.depth} minibatches per repetition") from None
                xb, yb = xb.to(self.device, self.dtype), yb.to(self.device)
                with torch.no_grad():
                    h = v + (1 - s.damp) * h - self._batch_product(xb, yb, h) / s.scale
                if step % s.check_every == 0 or step == s.depth - 1:
                    norms = h.norm(dim=1)
                    if not torch.isfinite(norms).all() or (norms > limit).any():
                        self._raise_divergence(rep, step, xb, yb)
            estimates.append(h / s.scale)
        return torch.stack(estimates).mean(0)

    def largest_eigenvalue(self, x: torch.Tensor, y: torch.Tensor, steps: int = 20, seed: int = 0) -> float:
        """Power-iteration estimate of the largest |eigenvalue| of ``C_batch + weight_decay I`` on ``(x, y)``."""
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(1, self.n_params, generator=gen).to(self.device, self.dtype)
        v /= v.norm()
        value = 0.0
        for _ in range(steps):
            w = self._batch_product(x, y, v)
            value = float(w.norm())
            if value == 0:
                break
            v = w / value
        return value

    def _raise_divergence(self, rep, step, xb, yb):
        s = self.settings
        lam = self.largest_eigenvalue(xb, yb)
        suggest = float(f"{max(2 * lam, 1.0):.1g}")
        raise LiSSADivergenceError(
            f"LiSSA diverged at step {step} of repetition {rep} (estimate not finite or growing without bound): "
            f"scale={s.scale:g} is too small. The largest eigenvalue of a minibatch {s.curvature} curvature "
            f"(batch_size={s.batch_size}, + weight decay) is about {lam:.3g} (power iteration); the recursion needs "
            f"scale > that. Raise scale to about {suggest:g} (and keep damping={s.damping:g} with damp=damping/scale), "
            f"or use a larger batch_size to smooth the minibatch curvature."
        )


# ----------------------------------------------------------------------------- fast

class FastSolver(InverseHVP):
    """Top-``rank`` eigenpairs of the Gauss-Newton matrix, exact inverse on them, ``1/(wd + damping)`` elsewhere.

    The GGN of softmax cross-entropy factorises per example: ``sum_c p_c g(c) g(c)^T`` with
    ``g(c)`` the gradient for label ``c`` (:func:`.gradients.class_gradients`). ``fit`` streams
    these rows over a seeded subsample of ``n_samples`` training images into a factor
    ``G`` (n_samples * C, P) with ``GGN ~= G^T G`` and keeps its top ``rank`` eigenpairs
    ``U diag(e) U^T``. Then, with ``d = weight_decay + damping``::

        (G^T G + d I)^{-1} v  ~=  U diag(1 / (e + d)) U^T v  +  (v - U U^T v) / d

    for any number of vectors at the cost of two (K, P) x (P, rank) products; self-influence of
    every training image needs only its products with the ``rank`` basis vectors.

    Measured (``python bench/fast_design.py``; bench/results/fast_design.json): on the
    CIFAR-trained 3,702-parameter LeNet (2,000 training images, the benchmark's small net),
    against exact influence with the explicit damped GGN, mean per-test-image Pearson is 0.9995
    at damping 0.01 (0.992 at 0.001) from 250 sampled images at any rank >= 20, against 0.82
    (0.37) for the plain gradient dot product; adding the rest-of-spectrum diagonal (Woodbury)
    changed nothing. That net's GGN is small (top eigenvalue 0.029), an easy case. The limits:
    accuracy is set by how well ``n_samples`` images represent the GGN, not by ``rank``. On a
    tiny conv net that memorises its 300 training images (tests/test_solvers.py), 100 sampled
    images give Pearson ~0.5 (gradient dot product 0.27) while all 300 give 0.9997. On the real
    CNN (top GGN eigenvalue ~25-31, ~770 of the top 1,000 above 0.01) the scores from two
    independently drawn 200-image subsamples agree at Spearman ~0.75 (0.80 at damping 0.1), and
    200 vs 400 images at ~0.84: the subsample is the approximation. Raise ``n_samples`` (memory
    n*C*P floats) where accuracy matters more than time.
    """

    name = "fast"
    settings_class = FastSettings

    def _fit(self) -> None:
        s = self.settings
        gen = torch.Generator().manual_seed(s.seed)
        m = min(s.n_samples, self.n_train)
        idx = torch.randperm(self.n_train, generator=gen)[:m].sort().values
        if _hooks_supported(self.model, self.layers):
            self._fit_ghost(idx)
            return
        from tqdm.auto import tqdm

        rows = []
        for start in tqdm(range(0, m, s.chunk_size), desc="fast solver: GGN factor", unit="chunk", disable=not self.progress, leave=False):
            x, _ = self._train_tensors(idx[start : start + s.chunk_size])
            _, r = class_gradients(self.model, x, self.layers)  # (B, C, P)
            rows.append(r.reshape(-1, self.n_params))
        factor = torch.cat(rows) / math.sqrt(m)  # (m*C, P): GGN ~= factor.T @ factor
        gram = factor @ factor.T  # (m*C, m*C)
        evals, evecs = top_eigh(gram, s.rank, torch.Generator().manual_seed(s.seed))
        nonzero = evals > evals[0] * 1e-10 if len(evals) else evals > 0
        evals, evecs = evals[nonzero], evecs[:, nonzero]
        self.eigenvalues = evals  # (r,)
        self.eigenvectors = (factor.T @ evecs) / evals.sqrt()  # (P, r), orthonormal columns

    def _fit_ghost(self, idx: torch.Tensor) -> None:
        """The same eigenpairs without materialising Linear-weight rows: the factor's Gram matrix
        from ``(g . g')(a . a')`` per Linear layer, then the eigenvectors' Linear parts as
        ``sum_rows w_row g_row a_row^T``. Several times faster and far lighter for the real CNN."""
        from tqdm.auto import tqdm

        s = self.settings
        m = len(idx)
        chunks = []
        for start in tqdm(range(0, m, s.chunk_size), desc="fast solver: GGN factor", unit="chunk", disable=not self.progress, leave=False):
            x, _ = self._train_tensors(idx[start : start + s.chunk_size])
            chunks.append(class_gradient_parts(self.model, x, self.layers)[1])
        names = list(chunks[0])
        parts = {}
        for name in names:
            kind = chunks[0][name][0]
            if kind == "outer":
                g = torch.cat([c[name][1] for c in chunks])  # (m, C, out)
                a = torch.cat([c[name][2] for c in chunks])  # (m, in)
                parts[name] = ("outer", g.reshape(-1, g.shape[-1]), a)
            else:
                r = torch.cat([c[name][1] for c in chunks])  # (m, C, k)
                parts[name] = ("rows", r.reshape(-1, r.shape[-1]))
        n_classes = chunks[0][names[0]][1].shape[1]
        del chunks
        gram = None
        for kind, *t in parts.values():
            if kind == "outer":
                g, a = t
                aa = a @ a.T  # (m, m)
                term = (g @ g.T) * aa.repeat_interleave(n_classes, 0).repeat_interleave(n_classes, 1)
            else:
                term = t[0] @ t[0].T
            gram = term if gram is None else gram + term
        gram /= m  # Gram of factor = rows / sqrt(m)
        evals, evecs = top_eigh(gram, s.rank, torch.Generator().manual_seed(s.seed))
        nonzero = evals > evals[0] * 1e-10 if len(evals) else evals > 0
        evals, evecs = evals[nonzero], evecs[:, nonzero]
        coef = evecs / (evals.sqrt() * math.sqrt(m))  # (m*C, r): U = rows^T coef
        blocks = []
        for kind, *t in parts.values():
            if kind == "outer":
                g, a = t  # (m*C, out), (m, in)
                a_rows = a.repeat_interleave(n_classes, 0)  # (m*C, in)
                cols = []
                for k0 in range(0, coef.shape[1], 64):
                    w = coef[:, k0 : k0 + 64]  # (R, k)
                    weighted = (w.T[:, :, None] * g[None]).transpose(1, 2)  # (k, out, R)
                    cols.append((weighted @ a_rows).reshape(w.shape[1], -1).T)  # (out*in, k)
                blocks.append(torch.cat(cols, dim=1))
            else:
                blocks.append(t[0].T @ coef)  # (numel, r)
        self.eigenvalues = evals
        self.eigenvectors = torch.cat(blocks, dim=0)  # (P, r)

    def inverse_hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        v = self._check_vectors(vectors)
        d = self.total_damping
        if d <= 0:
            raise ValueError("the fast solver needs weight_decay + damping > 0 (the rest of the spectrum is treated as 0)")
        u, e = self.eigenvectors, self.eigenvalues
        coef = v @ u  # (K, r)
        return (v - coef @ u.T) / d + (coef / (e + d)) @ u.T

    def quadratic_form(self, vectors: torch.Tensor) -> torch.Tensor:
        v = self._check_vectors(vectors)
        return self.quadratic_form_from_products(v @ self.eigenvectors, (v * v).sum(1))

    def basis(self) -> torch.Tensor:
        return self.eigenvectors.T  # (r, P)

    def quadratic_form_from_products(self, dots: torch.Tensor, sqnorms: torch.Tensor) -> torch.Tensor:
        d = self.total_damping
        return sqnorms / d + (dots * dots * (1 / (self.eigenvalues + d) - 1 / d)).sum(1)

    def state_dict(self) -> dict:
        return {"eigenvalues": self.eigenvalues, "eigenvectors": self.eigenvectors}

    def load_state_dict(self, state: dict) -> None:
        self.eigenvalues = state["eigenvalues"].to(self.device, self.dtype)
        self.eigenvectors = state["eigenvectors"].to(self.device, self.dtype)


def top_eigh(matrix: torch.Tensor, rank: int, generator: torch.Generator, oversample: int = 20, iters: int = 4):
    """Top ``rank`` eigenpairs (descending, eigenvalues clamped at 0) of a symmetric PSD matrix (N, N).

    A full ``eigh`` when ``rank`` is more than a third of N; else randomized subspace iteration
    (Halko, Martinsson & Tropp 2011, Alg. 4.4 with a Rayleigh-Ritz step): ``iters`` products
    with an (N, rank + oversample) block, seeded. Eigh of a 5,000 x 5,000 Gram takes ~80 s on
    one busy core here; this ~7 s.
    """
    n = len(matrix)
    k = min(n, rank + oversample)
    if 3 * rank >= n:
        evals, evecs = torch.linalg.eigh(matrix)
        keep = min(rank, n)
        return evals.flip(0)[:keep].clamp_min(0), evecs.flip(1)[:, :keep]
    q = torch.randn(n, k, generator=generator, dtype=torch.float64).to(matrix)
    for _ in range(iters):
        q, _ = torch.linalg.qr(matrix @ q)
    evals, w = torch.linalg.eigh(q.T @ matrix @ q)
    evals, evecs = evals.flip(0)[:rank].clamp_min(0), (q @ w).flip(1)[:, :rank]
    return evals, evecs


# ----------------------------------------------------------------------------- factory

SOLVERS: dict[str, type[InverseHVP]] = {
    "exact": ExactSolver,
    "cg": CGSolver,
    "lissa": LiSSASolver,
    "fast": FastSolver,
}


def make_solver(name: str, **settings) -> InverseHVP:
    """A solver by name (``exact``, ``cg``, ``lissa``, ``fast``) with keyword settings.

    Unknown names or settings raise ValueError listing the valid ones.
    """
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}")
    cls = SOLVERS[name]
    valid = {f.name for f in fields(cls.settings_class)}
    unknown = sorted(set(settings) - valid)
    if unknown:
        raise ValueError(f"solver {name!r} has no setting(s) {unknown}; valid: {sorted(valid)}")
    return cls(cls.settings_class(**settings))
