"""Per-sample gradients (``grad_z``) of the cross-entropy loss, vectorised with ``torch.func``.

Koh & Liang (ICML 2017) need, for every training image z, the gradient of its own loss
L(z, theta) with respect to the parameters. nimarb's ``pytorch-influence-functions`` computes
them one image at a time with ``create_graph=True``; here ``torch.func.vmap(grad(...))`` over
``functional_call`` computes a whole chunk at once (the recipe of the torch.func tutorial
"Per-sample-gradients"), and :func:`iter_grad_z` streams chunks over a data set so that the
50,000 x 62,006 matrix is never held unless asked for.

Conventions used throughout the package:

- the loss is the per-example cross-entropy, *without* the weight-decay term (weight decay enters
  the curvature as ``weight_decay * I``; see :mod:`.solvers.base`);
- the model is used in eval mode, on the un-augmented data;
- gradients are flattened to rows of length P in the order of ``model.named_parameters()``
  (restricted to the chosen ``layers``), so row ``i`` of the result belongs to image ``i``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from .hooks import _hook_dots, _hook_grads, _hooks_supported, _label_cotangent, prepare_dot_vectors
from .params import (
    _flatten_rows,
    _split_params,
    check_inputs,
    count_selected,
    iter_chunks,
    select_parameters,
)

DEFAULT_CHUNK = 500  # images per vmap call: ~125 MB of float32 gradients for the 62,006-parameter CNN



def _loss_fn(model: nn.Module, buffers: dict, frozen: dict):
    """L(params, x, y) for one example: cross-entropy of the model's logits (no weight decay)."""

    def loss(params, x, y):
        logits = functional_call(model, ({**frozen, **params}, buffers), (x.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, y.unsqueeze(0))

    return loss


def grad_z(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    layers: Sequence[str] | str | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    method: str = "auto",
) -> torch.Tensor:
    """Per-sample gradients of the cross-entropy loss: inputs (N, ...), labels (N,) -> (N, P).

    Row ``i`` is d L(x_i, y_i) / d theta flattened in parameter order (see the module docstring),
    on the model's device and dtype. The model is put in eval mode while computing and restored.
    ``method``: ``"vmap"`` (torch.func, any model), ``"hooks"`` (layer inputs times output
    gradients; nn.Linear / nn.Conv2d parameters only, several times faster on the CPU) or
    ``"auto"`` (hooks where possible, else vmap). Both give the same numbers (tested).
    """
    check_inputs(x, y, what="grad_z")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if len(x) == 0:
        return torch.zeros(0, count_selected(model, layers))
    was_training = model.training
    model.eval()
    try:
        rows = []
        fast = method in ("auto", "hooks") and _hooks_supported(model, layers)
        if fast:  # write straight into one (N, P) buffer: no per-chunk concatenation
            p0 = next(iter(select_parameters(model, layers).values()))
            out = torch.empty(len(x), count_selected(model, layers), dtype=p0.dtype, device=p0.device)
            for start in range(0, len(x), chunk_size):
                xb, yb = x[start : start + chunk_size], y[start : start + chunk_size]
                _hook_grads(model, xb, [_label_cotangent(yb)], layers, out=out[start : start + len(xb)])
            return out
        if method == "hooks" and not fast:
            raise ValueError("method='hooks' needs every chosen parameter to be the weight or bias of an nn.Linear or a plain nn.Conv2d; use method='vmap'")
        if method not in ("auto", "hooks", "vmap"):
            raise ValueError(f"method must be 'auto', 'hooks' or 'vmap', got {method!r}")
        params, frozen, buffers = _split_params(model, layers)  # the vmap route (the hooks route returned above)
        per_sample = vmap(grad(_loss_fn(model, buffers, frozen)), in_dims=(None, 0, 0))
        for start in range(0, len(x), chunk_size):
            xb, yb = x[start : start + chunk_size], y[start : start + chunk_size]
            rows.append(_flatten_rows(per_sample(params, xb, yb), len(xb)))
        return torch.cat(rows)
    finally:
        model.train(was_training)




def grad_dot(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    vectors: torch.Tensor,
    layers: Sequence[str] | str | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    prepared: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_z(x, y) @ vectors.T, squared norms of grad_z rows)``: (N, K) and (N,), memory-light.

    Equal to forming :func:`grad_z` and multiplying, but for an ``nn.Linear`` layer the per-sample
    gradient ``g a^T`` is never built: ``<V, g a^T> = g^T V a`` and ``||g a^T||^2 = ||g||^2 ||a||^2``
    (the "ghost" identities; Goodfellow 2015). This is what streams 50,000 training images
    against many ``s_test`` vectors quickly (:func:`.scores.influence`). Falls back to :func:`grad_z` for
    other models. ``prepared``: :func:`.hooks.prepare_dot_vectors` of ``vectors``, made once by a caller
    that streams many calls with the same vectors.
    """
    check_inputs(x, y, what="grad_dot")
    p_total = count_selected(model, layers)
    if vectors.ndim != 2 or vectors.shape[1] != p_total:
        raise ValueError(f"vectors must have shape (K, {p_total}), got {tuple(vectors.shape)}")
    if not _hooks_supported(model, layers):
        g = grad_z(model, x, y, layers, chunk_size)
        return g @ vectors.T, (g * g).sum(1)
    was_training = model.training
    model.eval()
    prepared = prepare_dot_vectors(model, vectors, layers) if prepared is None else prepared
    try:
        dots, norms = [], []
        for start in range(0, len(x), chunk_size):
            d, n = _hook_dots(model, x[start : start + chunk_size], y[start : start + chunk_size], vectors, layers, prepared)
            dots.append(d)
            norms.append(n)
        return torch.cat(dots), torch.cat(norms)
    finally:
        model.train(was_training)


def class_gradients(
    model: nn.Module,
    x: torch.Tensor,
    layers: Sequence[str] | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Newton factor rows: inputs (B, ...) -> (probabilities (B, C), rows (B, C, P)).

    Row ``[i, c]`` is ``sqrt(p_ic) * grad L(x_i, label=c)``. For softmax cross-entropy
    ``J^T (diag(p) - p p^T) J = sum_c p_c g(c) g(c)^T`` exactly, so the per-example GGN is
    ``rows[i].T @ rows[i]``. Model in eval mode.
    """
    check_inputs(x, what="class_gradients")
    was_training = model.training
    model.eval()
    try:
        if _hooks_supported(model, layers):
            with torch.no_grad():
                probs = torch.softmax(model(x), dim=1)
            n_classes = probs.shape[1]

            def cot(c):
                def f(logits):
                    p = torch.softmax(logits, dim=1)
                    g = p.clone()
                    g[:, c] -= 1.0
                    return g * p[:, c : c + 1].sqrt()

                return f

            rows = torch.empty(len(x), n_classes, count_selected(model, layers), dtype=probs.dtype, device=probs.device)
            _hook_grads(model, x, [cot(c) for c in range(n_classes)], layers, out=[rows[:, c] for c in range(n_classes)])
            return probs, rows
        logits, jac = logits_jacobian(model, x, layers)
        probs = torch.softmax(logits, dim=1)
        eye = torch.eye(probs.shape[1], dtype=probs.dtype, device=probs.device)
        cot = (probs[:, None, :] - eye[None]) * probs.sqrt()[:, :, None]  # (B, C_label, C_logit)
        return probs, torch.einsum("bcl,blp->bcp", cot, jac)
    finally:
        model.train(was_training)


def logits_jacobian(
    model: nn.Module,
    x: torch.Tensor,
    layers: Sequence[str] | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example Jacobians of the logits: inputs (B, ...) -> (logits (B, C), J (B, C, P)).

    Used for the Gauss-Newton curvature: the per-example GGN of softmax cross-entropy is
    ``J^T (diag(p) - p p^T) J``. Model in eval mode.
    """
    check_inputs(x, what="logits_jacobian")
    was_training = model.training
    model.eval()
    try:
        params, frozen, buffers = _split_params(model, layers)

        def logits_one(p, xi):
            return functional_call(model, ({**frozen, **p}, buffers), (xi.unsqueeze(0),))[0]

        jac = vmap(jacrev(logits_one), in_dims=(None, 0))(params, x)  # {name: (B, C, *shape)}
        with torch.no_grad():
            logits = functional_call(model, ({**frozen, **params}, buffers), (x,))
        b, c = logits.shape
        return logits, torch.cat([j.reshape(b, c, -1) for j in jac.values()], dim=2)
    finally:
        model.train(was_training)


def iter_grad_z(
    model: nn.Module,
    data,
    chunk_size: int = DEFAULT_CHUNK,
    device: str | torch.device = "cpu",
    layers: Sequence[str] | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    desc: str = "training gradients",
) -> Iterator[tuple[int, torch.Tensor]]:
    """Stream per-sample gradients over ``data`` (a ``CIFAR10Split`` or ``(x, y)``): yields ``(start, (B, P))``.

    A split's uint8 images are normalised one chunk at a time, so memory stays at one chunk of
    gradients. ``dtype`` casts inputs (e.g. float64 for tests); the model must already match it.
    """
    for start, x, y in iter_chunks(data, chunk_size, device, dtype, progress, desc):
        yield start, grad_z(model, x, y, layers=layers, chunk_size=chunk_size)
