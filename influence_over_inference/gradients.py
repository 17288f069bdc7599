"""Per-sample gradients (``grad_z``) of the cross-entropy loss, vectorised with ``torch.func``.

Koh & Liang (ICML 2017) need, for every training image z, the gradient of its own loss
L(z, theta) with respect to the parameters. nimarb's ``pytorch-influence-functions`` computes
them one image at a time with ``create_graph=True``; here ``torch.func.vmap(grad(...))`` over
``functional_call`` computes a whole chunk at once (the recipe of the torch.func tutorial
"Per-sample-gradients"), and :func:`iter_grad_z` streams chunks over a data set so that the
50,000 x 62,006 matrix is never held unless asked for.

Conventions used throughout the package:

- the loss is the per-example cross-entropy, *without* the weight-decay term (weight decay enters
  the curvature as ``weight_decay * I``; see :mod:`.solvers`);
- the model is used in eval mode, on the un-augmented data;
- gradients are flattened to rows of length P in the order of ``model.named_parameters()``
  (restricted to the chosen ``layers``), so row ``i`` of the result belongs to image ``i``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 500  # images per vmap call: ~125 MB of float32 gradients for the 62,006-parameter CNN


# ----------------------------------------------------------------------------- parameters

def select_parameters(model: nn.Module, layers: Sequence[str] | str | None = None) -> dict[str, torch.Tensor]:
    """The parameters influence is taken over, as ``{name: detached tensor}`` in model order.

    ``layers=None`` means all parameters; otherwise a module name or parameter-name prefix, or a
    list of them (e.g. ``["fc3"]`` or ``"fc2.weight"``). Raises ValueError naming the choices when
    a name matches nothing.
    """
    named = dict(model.named_parameters())
    if layers is None:
        return {k: v.detach() for k, v in named.items()}
    if isinstance(layers, str):
        layers = [layers]
    chosen = {}
    for layer in layers:
        hits = [k for k in named if k == layer or k.startswith(layer + ".")]
        if not hits:
            modules = sorted({k.rsplit(".", 1)[0] for k in named})
            raise ValueError(f"layer {layer!r} matches no parameter; choose among modules {modules} or parameters {list(named)}")
        chosen.update({k: None for k in hits})
    return {k: named[k].detach() for k in named if k in chosen}


def count_selected(model: nn.Module, layers: Sequence[str] | str | None = None) -> int:
    """P: the number of parameters influence is taken over."""
    return sum(p.numel() for p in select_parameters(model, layers).values())


def flatten_params(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """``{name: tensor}`` -> one vector (P,), concatenated in the dict's order."""
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflatten_params(vector: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten_params`: a vector (P,) or rows (..., P) -> ``{name: (..., *shape)}``."""
    total = sum(p.numel() for p in like.values())
    if vector.shape[-1] != total:
        raise ValueError(f"vector has {vector.shape[-1]} entries in its last dimension; the parameters have {total}")
    out, start = {}, 0
    lead = vector.shape[:-1]
    for name, p in like.items():
        out[name] = vector[..., start : start + p.numel()].reshape(*lead, *p.shape)
        start += p.numel()
    return out


def _flatten_rows(tensors: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
    return torch.cat([t.reshape(batch, -1) for t in tensors.values()], dim=1)


# ----------------------------------------------------------------------------- input checks

def check_inputs(x: torch.Tensor, y: torch.Tensor | None = None, n_classes: int | None = None, what: str = "inputs") -> None:
    """Raise ValueError (saying what to do) for mismatched lengths, NaN/inf inputs or bad labels."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what}: expected a tensor of images, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"{what}: expected a batch (N, ...) of inputs, got shape {tuple(x.shape)}; add a batch dimension with x[None]")
    if x.is_floating_point() and not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
        raise ValueError(f"{what}: {bad} input(s) contain NaN or inf; clean or drop them before computing influence")
    if y is None:
        return
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"{what}: labels must have shape ({len(x)},), got {tuple(y.shape)}")
    if y.is_floating_point():
        raise ValueError(f"{what}: labels must be integer class indices, got {y.dtype}")
    if n_classes is not None and len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"{what}: labels must lie in [0, {n_classes}), found {int(y.min())}..{int(y.max())}")


# ----------------------------------------------------------------------------- per-sample gradients

def _loss_fn(model: nn.Module, buffers: dict, frozen: dict):
    """L(params, x, y) for one example: cross-entropy of the model's logits (no weight decay)."""

    def loss(params, x, y):
        logits = functional_call(model, ({**frozen, **params}, buffers), (x.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, y.unsqueeze(0))

    return loss


def _split_params(model: nn.Module, layers):
    params = select_parameters(model, layers)
    frozen = {k: v.detach() for k, v in model.named_parameters() if k not in params}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    return params, frozen, buffers


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
        if not fast:
            params, frozen, buffers = _split_params(model, layers)
            per_sample = vmap(grad(_loss_fn(model, buffers, frozen)), in_dims=(None, 0, 0))
        for start in range(0, len(x), chunk_size):
            xb, yb = x[start : start + chunk_size], y[start : start + chunk_size]
            if fast:
                rows.append(_hook_grads(model, xb, [_label_cotangent(yb)], layers)[0])
            else:
                rows.append(_flatten_rows(per_sample(params, xb, yb), len(xb)))
        return torch.cat(rows)
    finally:
        model.train(was_training)


def _label_cotangent(y: torch.Tensor):
    """d CE(logits, y) / d logits = softmax(logits) - onehot(y), for each example (B, C)."""

    def cotangent(logits):
        g = torch.softmax(logits, dim=1)
        g[torch.arange(len(y)), y] -= 1.0
        return g

    return cotangent


# ----------------------------------------------------------------------------- fast path: hooks
# For nn.Linear and nn.Conv2d the per-sample weight gradient is a product of the layer's input
# and the gradient at its output (Goodfellow 2015, "Efficient per-example gradient
# computations"; as in Opacus): one forward and one backward pass of the summed loss give
# every per-example gradient, much faster on the CPU than vmap over convolutions.

def _hooks_supported(model: nn.Module, layers) -> bool:
    modules = dict(model.named_modules())
    named = dict(model.named_parameters())
    for name in select_parameters(model, layers):
        mod_name, _, attr = name.rpartition(".")
        mod = modules.get(mod_name)
        if attr not in ("weight", "bias") or not named[name].requires_grad:
            return False
        if type(mod) is nn.Linear:
            continue
        if type(mod) is nn.Conv2d and mod.groups == 1 and mod.padding_mode == "zeros" and not isinstance(mod.padding, str):
            continue
        return False
    return True


def _capture_layers(model: nn.Module, x: torch.Tensor, layers):
    """One forward pass with hooks on the modules that own the selected parameters.

    Returns ``(params, owners, inputs, outputs, logits)``: the selected parameters, their owning
    module names (in order), each module's detached input and (graph-attached) output, and the
    logits. Raises if a module runs more than once per forward pass (use ``method='vmap'``).
    """
    params = select_parameters(model, layers)
    modules = dict(model.named_modules())
    owners = list(dict.fromkeys(name.rpartition(".")[0] for name in params))
    inputs, outputs, calls = {}, {}, dict.fromkeys(owners, 0)

    def hook_for(mod_name):
        def hook(module, args, output):
            calls[mod_name] += 1
            inputs[mod_name] = args[0].detach()
            outputs[mod_name] = output

        return hook

    handles = [modules[m].register_forward_hook(hook_for(m)) for m in owners]
    try:
        with torch.enable_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    if any(c != 1 for c in calls.values()):
        raise RuntimeError(f"layers called more than once per forward pass ({calls}); use method='vmap'")
    return params, owners, inputs, outputs, logits


def _hook_grads(model: nn.Module, x: torch.Tensor, cotangents, layers, out=None) -> list[torch.Tensor]:
    """Per-sample gradients (B, P) for each cotangent function of the logits ``(B, C) -> (B, C)``.

    Row ``i`` of result ``j`` is ``J_i^T cotangents[j](logits)_i``: with the label cotangent
    (softmax - onehot) that is the per-example loss gradient. One forward pass serves all.
    ``out``: a (B, P) buffer (one cotangent) or a list of them (one per cotangent), written in place.
    """
    params, owners, inputs, outputs, logits = _capture_layers(model, x, layers)
    modules = dict(model.named_modules())
    outs = [outputs[m] for m in owners]
    results = []
    for j, cotangent in enumerate(cotangents):
        with torch.no_grad():
            v = cotangent(logits.detach())
        grads_out = dict(zip(owners, torch.autograd.grad(logits, outs, grad_outputs=v, retain_graph=j < len(cotangents) - 1), strict=True))
        b = len(x)
        if out is None:
            buf = torch.empty(b, sum(p.numel() for p in params.values()), dtype=v.dtype, device=v.device)
        else:
            buf = out[j] if isinstance(out, (list, tuple)) else out
        start, done = 0, {}
        for name, p in params.items():
            mod_name, _, attr = name.rpartition(".")
            view = buf[:, start : start + p.numel()]
            start += p.numel()
            module, a, g = modules[mod_name], inputs[mod_name], grads_out[mod_name]
            if type(module) is nn.Linear and a.ndim == 2:
                if attr == "weight":  # outer product g a^T, written in place
                    torch.mul(g[:, :, None], a[:, None, :], out=view.view(b, *p.shape))
                else:
                    view.copy_(g)
                continue
            if mod_name not in done:
                done[mod_name] = _module_sample_grads(module, a, g)
            view.copy_(done[mod_name][attr].reshape(b, -1))
        results.append(buf)
    return results


def grad_dot(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    vectors: torch.Tensor,
    layers: Sequence[str] | str | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_z(x, y) @ vectors.T, squared norms of grad_z rows)``: (N, K) and (N,), memory-light.

    Equal to forming :func:`grad_z` and multiplying, but for an ``nn.Linear`` layer the per-sample
    gradient ``g a^T`` is never built: ``<V, g a^T> = g^T V a`` and ``||g a^T||^2 = ||g||^2 ||a||^2``
    (the "ghost" identities; Goodfellow 2015). This is what streams 50,000 training images
    against many ``s_test`` vectors quickly. Falls back to :func:`grad_z` for other models.
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
    try:
        dots, norms = [], []
        for start in range(0, len(x), chunk_size):
            d, n = _hook_dots(model, x[start : start + chunk_size], y[start : start + chunk_size], vectors, layers)
            dots.append(d)
            norms.append(n)
        return torch.cat(dots), torch.cat(norms)
    finally:
        model.train(was_training)


def _hook_dots(model, x, y, vectors, layers):
    params, owners, inputs, outputs, logits = _capture_layers(model, x, layers)
    modules = dict(model.named_modules())
    cot = _label_cotangent(y)(logits.detach())
    grads_out = dict(zip(owners, torch.autograd.grad(logits, [outputs[m] for m in owners], grad_outputs=cot), strict=True))
    per_param = unflatten_params(vectors, params)  # {name: (K, *shape)}
    b, k = len(x), len(vectors)
    dots = torch.zeros(b, k, dtype=vectors.dtype, device=vectors.device)
    norms = torch.zeros(b, dtype=vectors.dtype, device=vectors.device)
    for m in owners:
        module, a, g = modules[m], inputs[m], grads_out[m]
        names = [n for n in params if n.rpartition(".")[0] == m]
        if type(module) is nn.Linear and a.ndim == 2:
            for name in names:
                v = per_param[name]
                if name.endswith("weight"):  # <V_k, g a^T> = g^T V_k a
                    va = (a @ v.reshape(k * v.shape[1], v.shape[2]).T).reshape(b, k, v.shape[1])  # (B, K, out)
                    dots += (va * g[:, None, :]).sum(2)
                    norms += (g * g).sum(1) * (a * a).sum(1)
                else:
                    dots += g @ v.T
                    norms += (g * g).sum(1)
        else:
            grads = _module_sample_grads(module, a, g)
            for name in names:
                gs = grads[name.rpartition(".")[2]].reshape(b, -1)
                dots += gs @ per_param[name].reshape(k, -1).T
                norms += (gs * gs).sum(1)
    return dots, norms


def _module_sample_grads(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    b = len(a)
    if type(module) is nn.Linear:
        a2, g2 = a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])  # (B, T, in), (B, T, out)
        out = {"weight": torch.bmm(g2.transpose(1, 2), a2)}  # (B, out, in)
        if module.bias is not None:
            out["bias"] = g2.sum(1)
        return out
    unfolded = _unfold(a, module)  # (B, Cin*kh*kw, L)
    g2 = g.reshape(b, g.shape[1], -1)  # (B, Cout, L)
    out = {"weight": torch.bmm(g2, unfolded.transpose(1, 2))}  # (B, Cout, Cin*kh*kw)
    if module.bias is not None:
        out["bias"] = g2.sum(2)
    return out


def _unfold(a: torch.Tensor, module: nn.Conv2d) -> torch.Tensor:
    """``nn.functional.unfold`` as a strided view copied once: (B, Cin, H, W) -> (B, Cin*kh*kw, Ho*Wo).

    Same numbers; several times faster than ``im2col`` on a busy multi-threaded CPU.
    """
    ph, pw = module.padding
    if ph or pw:
        a = nn.functional.pad(a, (pw, pw, ph, ph))
    a = a.contiguous()
    b, c, h, w = a.shape
    kh, kw = module.kernel_size
    sh, sw = module.stride
    dh, dw = module.dilation
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    st = a.stride()
    view = a.as_strided((b, c, kh, kw, ho, wo), (st[0], st[1], st[2] * dh, st[3] * dw, st[2] * sh, st[3] * sw))
    return view.reshape(b, c * kh * kw, ho * wo)


def class_gradient_parts(model: nn.Module, x: torch.Tensor, layers: Sequence[str] | str | None = None):
    """:func:`class_gradients` without building the ``nn.Linear`` weight rows (hooks path only).

    Returns ``(probs (B, C), parts)`` with ``parts[name]`` for each chosen parameter, in order:
    ``("outer", g (B, C, out), a (B, in))`` for a Linear weight (row ``[i, c]`` is ``g[i, c] a[i]^T``)
    or ``("rows", (B, C, numel))``. Used to form Gram matrices of the GGN factor cheaply
    (``<g a^T, g' a'^T> = (g . g') (a . a')``). None if the model is not hooks-compatible.
    """
    if not _hooks_supported(model, layers):
        return None
    check_inputs(x, what="class_gradient_parts")
    was_training = model.training
    model.eval()
    try:
        params, owners, inputs, outputs, logits = _capture_layers(model, x, layers)
        modules = dict(model.named_modules())
        probs = torch.softmax(logits.detach(), dim=1)
        b, n_classes = probs.shape
        per_class = []  # per class: {module: grad at its output}
        for c in range(n_classes):
            cot = probs.clone()
            cot[:, c] -= 1.0
            cot = cot * probs[:, c : c + 1].sqrt()
            grads = torch.autograd.grad(logits, [outputs[m] for m in owners], grad_outputs=cot, retain_graph=c < n_classes - 1)
            per_class.append(dict(zip(owners, grads, strict=True)))
        parts = {}
        for name in params:
            mod_name, _, attr = name.rpartition(".")
            module, a = modules[mod_name], inputs[mod_name]
            if type(module) is nn.Linear and a.ndim == 2:
                g = torch.stack([pc[mod_name] for pc in per_class], dim=1)  # (B, C, out)
                parts[name] = ("outer", g, a) if attr == "weight" else ("rows", g)
            else:
                rows = torch.stack([_module_sample_grads(module, a, pc[mod_name])[attr].reshape(b, -1) for pc in per_class], dim=1)
                parts[name] = ("rows", rows)
        return probs, parts
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


def as_tensors(data, indices=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` from a ``CIFAR10Split``-like object (with ``.tensors``) or an ``(x, y)`` pair."""
    if hasattr(data, "tensors") and callable(data.tensors):
        return data.tensors(indices)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
        if indices is not None:
            idx = torch.as_tensor(indices, dtype=torch.long)
            return x[idx], y[idx]
        return x, y
    raise ValueError(f"expected a CIFAR10Split or an (inputs, labels) pair, got {type(data).__name__}")


def data_length(data) -> int:
    if hasattr(data, "tensors") and callable(data.tensors):
        return len(data)
    return len(as_tensors(data)[1])


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


def iter_chunks(data, chunk_size: int, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                progress: bool = False, desc: str = "images") -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(start, x, y)`` chunks of ``data`` (a split, normalised per chunk, or an ``(x, y)`` pair), with a tqdm bar."""
    from tqdm.auto import tqdm

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = data_length(data)
    device = torch.device(device)
    for start in tqdm(range(0, n, chunk_size), desc=desc, unit="chunk", disable=not progress, leave=False):
        idx = torch.arange(start, min(start + chunk_size, n))
        x, y = as_tensors(data, idx)
        yield start, x.to(device=device, dtype=dtype or x.dtype), y.to(device)
