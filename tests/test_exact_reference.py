"""bench/exact_reference.py on a model small enough for the CPU: the same code path as on the GPU
(ExactSolver's in-place blocked GGN, Cholesky, the engine's scores) against a direct solve of the
explicitly built damped GGN; it refuses, with its estimate, when memory is short; --help works."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_models import blobs, conv  # noqa: I001
from test_solvers import explicit_ggn

from influence_over_inference.engine.gradients import grad_z

ROOT = Path(__file__).resolve().parent.parent
REF_REL = 1e-9  # exact reference vs direct solve, float64
WD, DAMPING = 1e-3, 0.01


def _module():
    spec = importlib.util.spec_from_file_location("exact_reference", ROOT / "bench" / "exact_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _problem():
    torch.manual_seed(0)
    model = conv().eval()
    x, y = blobs(40, (3, 8, 8), 4, seed=2, noise=2.0)
    return model, x, y


def test_exact_reference_equals_the_direct_solve():
    model, x, y = _problem()
    scores, info = _module().exact_reference(model, (x, y), x[:3], y[:3], WD, DAMPING, chunk_size=7)
    ggn = explicit_ggn(model, x, y)
    direct = torch.linalg.solve(ggn + (WD + DAMPING) * torch.eye(len(ggn), dtype=ggn.dtype), grad_z(model, x[:3], y[:3]).T).T
    want = direct @ grad_z(model, x, y).T / len(x)  # (3, 40)
    assert float((scores - want).abs().max() / want.abs().max()) < REF_REL
    assert info["cholesky"] and info["n_params"] == ggn.shape[0]


def test_exact_reference_refuses_with_its_estimate_when_memory_is_short():
    model, x, y = _problem()
    module = _module()
    need = module.needed_bytes(model, None, 4, 7, 3, torch.float64)
    with pytest.raises(module.NotEnoughMemory, match=r"needs about .* GB .* free"):
        module.exact_reference(model, (x, y), x[:3], y[:3], WD, DAMPING, chunk_size=7, available=need - 1)
    p = 62_006  # the study's CNN in float64: the matrix and its factor alone are 61.5 GB
    assert 2 * 8 * p * p <= module.exact_memory_bytes(p, 10, 500) < 2 * 8 * p * p * 1.1  # plus one chunk of factor rows


def test_exact_reference_help():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "exact_reference.py"), "--help"], capture_output=True, text=True, check=True)
    assert "--device" in out.stdout and "exact_reference.npz" in out.stdout
