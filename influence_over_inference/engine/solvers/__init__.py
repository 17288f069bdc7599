"""Inverse Hessian-vector products ``(C + weight_decay I + damping I)^{-1} v``, one module per solver.

The interface is :class:`~.base.InverseHVP` (one abstract method, ``inverse_hvp``); the solvers
are :mod:`.exact`, :mod:`.cg`, :mod:`.lissa`, :mod:`.fast` and :mod:`.ekfac`, each with its settings dataclass;
:func:`make_solver` (in :mod:`.registry`) builds one by name.
"""

from .base import InverseHVP
from .cg import CGSettings, CGSolver
from .ekfac import EKFACSettings, EKFACSolver
from .exact import ExactSettings, ExactSolver
from .fast import FastSettings, FastSolver
from .lissa import LiSSADivergenceError, LiSSASettings, LiSSASolver
from .registry import SOLVERS, make_solver

__all__ = [
    "SOLVERS", "CGSettings", "CGSolver", "EKFACSettings", "EKFACSolver", "ExactSettings", "ExactSolver", "FastSettings", "FastSolver",
    "InverseHVP", "LiSSADivergenceError", "LiSSASettings", "LiSSASolver", "make_solver",
]
