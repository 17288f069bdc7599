"""The model-agnostic influence engine: per-sample gradients, curvature, solvers, scores, cache.

Depends on torch, numpy and tqdm only; nothing here knows about CIFAR-10, the study's CNN, the
experiments or the report. Layout (arrows point down):

- :mod:`.scores`: ``s_test``, ``influence``, ``self_influence``, ``top_k`` and THE SIGN CONVENTION;
- :mod:`.perturbation`: ``perturbation_influence``, which pixels of a training image matter (same sign page);
- :mod:`.influence_engine`: :class:`InfluenceEngine`, a model + training data + solver, cached;
- :mod:`.solvers`: one module per inverse-HVP solver behind :class:`~.solvers.base.InverseHVP`;
- :mod:`.curvature`: Gauss-Newton and Hessian products, explicit matrices, GGN factor rows;
- :mod:`.gradients` (``grad_z``, per-class gradients, Jacobians) over :mod:`.hooks` (the fast
  nn.Linear / nn.Conv2d path) and :mod:`.params` (parameter selection, flattening, data access);
- :mod:`.io` (atomic writes) and :mod:`.hashing` (file and settings fingerprints).
"""

from .gradients import grad_z, iter_grad_z
from .influence_engine import InfluenceEngine
from .params import select_parameters
from .perturbation import perturbation_influence, predicted_change
from .scores import TopK, influence, s_test, self_influence, top_k
from .solvers import SOLVERS, InverseHVP, make_solver

__all__ = [
    "SOLVERS", "InfluenceEngine", "InverseHVP", "TopK", "grad_z", "influence", "iter_grad_z", "make_solver",
    "perturbation_influence", "predicted_change", "s_test", "select_parameters", "self_influence", "top_k",
]
