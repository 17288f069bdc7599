"""Curvature of the mean training loss: products ``C v``, explicit matrices and GGN factor rows.

``C`` is the curvature of the *mean* training loss (cross-entropy, no weight-decay term) at the
trained parameters. Two curvatures:

- ``"hessian"``: the true Hessian; products by forward-over-reverse differentiation
  (``torch.func.jvp`` of ``torch.func.grad``, Pearlmutter 1994). A trained CNN's Hessian has
  negative eigenvalues, so ``C + lambda I`` may be indefinite.
- ``"ggn"``: the generalised Gauss-Newton ``J^T (diag(p) - p p^T) J`` (Martens 2014;
  Schraudolph 2002), positive semi-definite; for softmax cross-entropy it equals the Fisher
  ``sum_c p_c g(c) g(c)^T`` of the per-class gradients. The safer default.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from .gradients import class_gradients
from .hooks import _hooks_supported
from .params import (
    _split_params,
    count_selected,
    flatten_params,
    select_parameters,
    unflatten_params,
)

CURVATURES = ("ggn", "hessian")



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
