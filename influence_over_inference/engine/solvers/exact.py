"""The exact solver: the explicitly built damped curvature matrix and a direct (LU) solve.

The ground truth every approximation is tested against, on models small enough (P up to ~20,000).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..curvature import curvature_matrix
from .base import InverseHVP, _check_common


@dataclass
class ExactSettings:
    curvature: str = "ggn"  # "ggn" (PSD, default) or "hessian" (true Hessian, may be indefinite)
    damping: float = 0.01  # lambda: extra damping added to C + weight_decay I
    chunk_size: int = 1000  # training examples per curvature-product call

    def __post_init__(self):
        _check_common(self)



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
