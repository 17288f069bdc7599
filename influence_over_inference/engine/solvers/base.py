"""The one interface every solver implements: :class:`InverseHVP`.

It solves ``(C + weight_decay I + damping I) s = v`` for rows ``v``. ``C`` is the curvature of the
*mean* training loss (:mod:`..curvature`); the training weight decay adds ``weight_decay * I``
(Koh & Liang 2017 take the Hessian of the whole training objective) and ``damping`` is the
explicit extra damping ``lambda``. Following alstonlo/torch-influence, a solver overrides only
:meth:`InverseHVP.inverse_hvp` and uses the paper's names (``damp``, ``scale``, ``depth``,
``repeat`` = r); settings are dataclasses with commented, validated defaults.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import asdict

import torch
from torch import nn

from ..curvature import CURVATURES
from ..params import (
    as_tensors,
    check_inputs,
    count_selected,
    data_length,
)


def _check_common(s) -> None:
    if s.curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {s.curvature!r}")
    if not s.damping >= 0 or not math.isfinite(s.damping):
        raise ValueError(f"damping must be a finite number >= 0, got {s.damping}")



class InverseHVP(abc.ABC):
    """Solves ``(C + weight_decay I + damping I) s = v`` for rows ``v`` of a (K, P) matrix.

    Use: ``solver.fit(model, train_x, train_y, weight_decay)`` once, then
    ``solver.inverse_hvp(vectors)`` as often as needed. Subclasses implement only
    :meth:`inverse_hvp`; the rest (checks, curvature products, quadratic forms) is shared.
    """

    name = "base"
    settings_class: type  # the settings dataclass; each solver sets its own

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
