"""Solvers by name: :data:`SOLVERS` and :func:`make_solver` (the command line and the notebook use it)."""

from __future__ import annotations

from dataclasses import fields

from .base import InverseHVP
from .cg import CGSolver
from .ekfac import EKFACSolver
from .exact import ExactSolver
from .fast import FastSolver
from .lissa import LiSSASolver

SOLVERS: dict[str, type[InverseHVP]] = {
    "exact": ExactSolver,
    "cg": CGSolver,
    "lissa": LiSSASolver,
    "fast": FastSolver,
    "ekfac": EKFACSolver,
}


def make_solver(name: str, **settings) -> InverseHVP:
    """A solver by name (``exact``, ``cg``, ``lissa``, ``fast``, ``ekfac``) with keyword settings.

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
