"""Conjugate gradient (Hestenes & Stiefel 1952; Martens 2010) on damped curvature-vector products.

Batched over the vectors; over the whole training set or a fixed seeded subsample.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..curvature import curvature_products, ggn_factor
from ..hooks import _hooks_supported
from .base import InverseHVP, _check_common

log = logging.getLogger(__name__)

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
