"""The exact solver: the explicitly built damped curvature matrix and a direct (Cholesky) solve.

The ground truth every approximation is tested against. The matrix is accumulated in place, one
chunk of training examples at a time, on the model's device (a GPU holds the 62,006-parameter
CNN's: ``bench/exact_reference.py``); under ``torch.distributed`` each rank sums its shard and
the partial matrices are combined with ``all_reduce`` (:mod:`..distributed`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..curvature import curvature_matrix, ggn_factor
from ..distributed import all_reduce_sum, shard
from ..params import iter_chunks
from .base import InverseHVP, _check_common

log = logging.getLogger(__name__)


@dataclass
class ExactSettings:
    curvature: str = "ggn"  # "ggn" (PSD, default) or "hessian" (true Hessian, may be indefinite)
    damping: float = 0.01  # lambda: extra damping added to C + weight_decay I
    chunk_size: int = 1000  # training examples per accumulation step (and per shard block under torch.distributed)
    max_params: int | None = 20_000  # refuse larger models (the matrix and its factor take 2 P^2 floats); None: no limit

    def __post_init__(self):
        _check_common(self)
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.max_params is not None and self.max_params < 1:
            raise ValueError(f"max_params must be >= 1 or None, got {self.max_params}")


def exact_memory_bytes(n_params: int, n_classes: int, chunk_size: int, itemsize: int = 8) -> int:
    """Peak bytes of an exact fit: the damped matrix, its Cholesky factor and one chunk's GGN factor rows."""
    return itemsize * (2 * n_params * n_params + 2 * chunk_size * n_classes * n_params)


class ExactSolver(InverseHVP):
    """The explicitly built damped curvature matrix (P, P) and a Cholesky (else LU) solve.

    ``self.matrix`` is ``C + (weight_decay + damping) I`` in the model's dtype and device. The GGN
    is summed in place from per-example factor rows (``matrix.addmm_(R^T, R)``, no (P, P)
    temporaries); the Hessian chunk by chunk from curvature products. Positive definite (the
    damped GGN): Cholesky; otherwise (an indefinite Hessian, zero damping): LU.
    """

    name = "exact"
    settings_class = ExactSettings

    def _fit(self) -> None:
        s = self.settings
        p = self.n_params
        if s.max_params is not None and p > s.max_params:
            gb = exact_memory_bytes(p, 10, s.chunk_size, torch.tensor([], dtype=self.dtype).element_size()) / 1e9
            raise ValueError(f"the exact solver builds a {p} x {p} matrix (about {gb:.1f} GB with its factor, "
                             f"above max_params={s.max_params}); use 'cg' or 'fast', or raise max_params")
        total = torch.zeros(p, p, dtype=self.dtype, device=self.device)
        mine = shard(self.train_data, self.n_train, block=s.chunk_size)
        for _, x, y in iter_chunks(mine, s.chunk_size, self.device, self.dtype, self.progress, "exact solver: curvature"):
            if s.curvature == "ggn":
                rows = ggn_factor(self.model, x, self.layers)  # (B*C, P)
                total.addmm_(rows.T, rows)
            else:
                total += curvature_matrix(self.model, x, y, s.curvature, self.layers, chunk_size=s.chunk_size) * len(x)
        total = all_reduce_sum(total)
        total /= self.n_train
        total.diagonal().add_(self.total_damping)
        self.matrix = total
        self._factor()

    def _factor(self):
        chol, info = torch.linalg.cholesky_ex(self.matrix)
        if int(info) == 0:
            self._chol, self._lu = chol, None
            return
        del chol
        log.info("the damped curvature is not positive definite; solving by LU")
        self._chol, self._lu = None, torch.linalg.lu_factor(self.matrix)

    def inverse_hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        vectors = self._check_vectors(vectors)
        if self._chol is not None:
            return torch.cholesky_solve(vectors.T, self._chol).T
        return torch.linalg.lu_solve(*self._lu, vectors.T).T

    @property
    def curvature(self) -> torch.Tensor:
        """C (P, P): the undamped curvature of the mean training loss."""
        return self.matrix - self.total_damping * torch.eye(len(self.matrix), dtype=self.dtype, device=self.device)

    def state_dict(self) -> dict:
        return {"curvature": self.curvature}

    def load_state_dict(self, state: dict) -> None:
        self.matrix = state["curvature"].to(self.device, self.dtype).clone()
        self.matrix.diagonal().add_(self.total_damping)
        self._factor()
