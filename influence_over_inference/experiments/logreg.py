"""Multinomial logistic regression on the last layer's features: exact fits, refits and influence.

The convex case where influence functions are exact to first order: the last layer (fc3) on the
trained network's frozen features with L2 ``weight_decay/2 ||W||^2``. Newton fits in float64,
leave-one-out refits by the chord method (Newton's equations with the full optimum's Hessian,
iterated, converging to the exact optimum of the leave-one-out objective), and the influence
``score = (1/n) g_test^T H^{-1} g_train`` with the exact Hessian (positive = helpful).

"Removing" image ``j`` means setting its weight in the training objective to zero while every other
image keeps weight ``1/n`` (the ``epsilon = -1/n`` perturbation that influence predicts).
"""

from __future__ import annotations

import torch
from torch import nn

# 1. Leave-one-out, convex case: the last layer as multinomial logistic regression


@torch.no_grad()
def last_layer_inputs(model: nn.Module, images: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
    """fc3's inputs with a column of ones for the bias: uint8 (N, 32, 32, 3) -> float64 (N, 85)."""
    from ..study.data import normalize_uint8

    model = model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        out.append(model.features(normalize_uint8(images[start : start + batch_size])).double())
    feats = torch.cat(out)  # (N, 84)
    return torch.cat([feats, torch.ones(len(feats), 1, dtype=torch.float64)], dim=1)  # (N, 85)


def logreg_loss(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor, weight_decay: float, weights=None) -> torch.Tensor:
    """Objective ``sum_i w_i CE(W x_i, y_i) + weight_decay/2 ||W||^2`` (w_i = 1/n by default)."""
    ce = nn.functional.cross_entropy(X @ W.T, y, reduction="none")  # (N,)
    w = torch.full_like(ce, 1.0 / len(y)) if weights is None else weights
    return (w * ce).sum() + 0.5 * weight_decay * (W * W).sum()


def logreg_grad(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor, weight_decay: float, weights=None) -> torch.Tensor:
    """Gradient of :func:`logreg_loss` w.r.t. ``W`` (C, D), in closed form: ``(P - Y)^T diag(w) X + wd W``."""
    P = torch.softmax(X @ W.T, dim=1)  # (N, C)
    P[torch.arange(len(y)), y] -= 1.0
    w = torch.full((len(y),), 1.0 / len(y), dtype=X.dtype) if weights is None else weights
    return (P * w[:, None]).T @ X + weight_decay * W  # (C, D)


def logreg_hessian(W: torch.Tensor, X: torch.Tensor, weight_decay: float, chunk: int = 10_000) -> torch.Tensor:
    """Exact Hessian of :func:`logreg_loss` (uniform weights) w.r.t. ``W.flatten()``: (C*D, C*D).

    ``(1/n) sum_i (diag(p_i) - p_i p_i^T) kron x_i x_i^T + weight_decay I``, streamed in chunks.
    """
    n, d = X.shape
    c = W.shape[0]
    H = torch.zeros(c * d, c * d, dtype=X.dtype)
    for start in range(0, n, chunk):
        x = X[start : start + chunk]
        p = torch.softmax(x @ W.T, dim=1)  # (B, C)
        z = (p[:, :, None] * x[:, None, :]).reshape(len(x), c * d)  # rows p_i kron x_i
        H -= z.T @ z
        for k in range(c):
            H[k * d : (k + 1) * d, k * d : (k + 1) * d] += (x * p[:, k : k + 1]).T @ x
    H /= n
    H += weight_decay * torch.eye(c * d, dtype=X.dtype)
    return H


def fit_logreg(X, y, weight_decay: float, W0: torch.Tensor, tol: float = 1e-12, max_iter: int = 100) -> tuple[torch.Tensor, dict]:
    """Newton's method with backtracking to the optimum of :func:`logreg_loss`; stops at ``max|grad| <= tol``."""
    W = W0.clone().double()
    for it in range(max_iter):
        g = logreg_grad(W, X, y, weight_decay)
        gnorm = float(g.abs().max())
        if gnorm <= tol:
            return W, {"iterations": it, "grad_max": gnorm}
        H = logreg_hessian(W, X, weight_decay)
        step = torch.linalg.solve(H, g.flatten()).reshape(W.shape)
        f0 = float(logreg_loss(W, X, y, weight_decay))
        t = 1.0
        while t > 1e-10:
            W_new = W - t * step
            if float(logreg_loss(W_new, X, y, weight_decay)) <= f0 - 1e-4 * t * float(g.flatten() @ step.flatten()):
                break
            t *= 0.5
        if t <= 1e-10:  # no decrease representable in float64: at the optimum up to rounding
            return W, {"iterations": it, "grad_max": gnorm}
        W = W_new
    g = logreg_grad(W, X, y, weight_decay)
    return W, {"iterations": max_iter, "grad_max": float(g.abs().max())}


def refit_without(X, y, weight_decay: float, W_full: torch.Tensor, H_chol: torch.Tensor, remove, tol: float = 1e-12,
                  max_iter: int = 50) -> tuple[torch.Tensor, dict]:
    """The exact optimum with the images ``remove`` given weight zero (the others keep ``1/n``).

    Iterates ``W <- W - H_full^{-1} grad F_{-j}(W)`` from the full optimum (the chord method: Newton's
    equations with the full optimum's Hessian, ``H_chol`` its Cholesky factor) until the gradient of
    the leave-out objective is below ``tol`` (max abs). It converges linearly with a contraction
    factor of order ``1/n``, so a few iterations reach float64 rounding.
    """
    n = len(y)
    w = torch.full((n,), 1.0 / n, dtype=X.dtype)
    w[torch.as_tensor(remove)] = 0.0
    W = W_full.clone()
    gnorm = float("inf")
    for it in range(max_iter):
        g = logreg_grad(W, X, y, weight_decay, weights=w)
        gnorm = float(g.abs().max())
        if gnorm <= tol:
            return W, {"iterations": it, "grad_max": gnorm}
        W = W - torch.cholesky_solve(g.reshape(-1, 1), H_chol).reshape(W.shape)
    return W, {"iterations": max_iter, "grad_max": gnorm}


def logreg_test_losses(W, X_test, y_test) -> torch.Tensor:
    """Per-image cross-entropy of the logistic regression ``W`` on test inputs."""
    return nn.functional.cross_entropy(X_test @ W.T, y_test, reduction="none")


def logreg_influence(W, X, y, X_test, y_test, H: torch.Tensor) -> torch.Tensor:
    """Exact influence scores (n_test, n_train): ``(1/n) g_test^T H^{-1} g_train`` (positive = helpful)."""
    n = len(y)
    c, d = W.shape
    P_test = torch.softmax(X_test @ W.T, dim=1)
    P_test[torch.arange(len(y_test)), y_test] -= 1.0
    G_test = (P_test[:, :, None] * X_test[:, None, :]).reshape(len(y_test), c * d)  # (K, C*D)
    S = torch.linalg.solve(H, G_test.T).T.reshape(len(y_test), c, d)  # s_test, (K, C, D)
    R = torch.softmax(X @ W.T, dim=1)
    R[torch.arange(n), y] -= 1.0  # (N, C): g_j = r_j kron x_j
    return torch.einsum("kcd,nc,nd->kn", S, R, X) / n
