"""The fast path for per-sample and per-class gradients: layer inputs times output gradients.

For ``nn.Linear`` and ``nn.Conv2d`` a per-example weight gradient is the outer product of the
layer's input (unfolded for convolutions) and the gradient at its output (Goodfellow 2015,
"Efficient per-example gradient computations"; the trick behind Opacus and BackPACK). Forward hooks
capture the inputs once; one backward pass per cotangent gives every example's gradient without
``vmap``. :func:`_hooks_supported` says when a model qualifies; everything else falls back to
``torch.func`` in :mod:`.gradients`, with the same numbers (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .params import check_inputs, select_parameters, unflatten_params

# For nn.Linear and nn.Conv2d the per-sample weight gradient is a product of the layer's input
# and the gradient at its output (Goodfellow 2015, "Efficient per-example gradient
# computations"; as in Opacus): one forward and one backward pass of the summed loss give
# every per-example gradient, much faster on the CPU than vmap over convolutions.

def _label_cotangent(y: torch.Tensor):
    """d CE(logits, y) / d logits = softmax(logits) - onehot(y), for each example (B, C)."""

    def cotangent(logits):
        g = torch.softmax(logits, dim=1)
        g[torch.arange(len(y)), y] -= 1.0
        return g

    return cotangent


def _class_cotangents(probs: torch.Tensor) -> list[torch.Tensor]:
    """Per class ``c``: ``sqrt(p_c) (softmax - onehot(c))`` (B, C), so that the outer products of the
    cotangents summed over classes are ``diag(p) - p p^T``, the GGN's output curvature of cross-entropy."""
    out = []
    for c in range(probs.shape[1]):
        cot = probs.clone()
        cot[:, c] -= 1.0
        out.append(cot * probs[:, c : c + 1].sqrt())
    return out


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


def prepare_dot_vectors(model: nn.Module, vectors: torch.Tensor, layers) -> dict[str, torch.Tensor]:
    """``vectors`` (K, P) cut per parameter once, in the layout :func:`_hook_dots` multiplies with.

    A Linear weight's block becomes (in, K out), so that a chunk's layer inputs (B, in) take one
    product with it (``<V_k, g a^T> = g^T V_k a``); any other parameter's block becomes (numel, K).
    Done once per set of vectors, not per chunk: the blocks are column slices of (K, P), so each
    would otherwise be copied again for every chunk of training images.
    """
    params = select_parameters(model, layers)
    modules = dict(model.named_modules())
    per_param = unflatten_params(vectors, params)  # {name: (K, *shape)}
    out = {}
    for name, v in per_param.items():
        mod_name, _, attr = name.rpartition(".")
        if type(modules[mod_name]) is nn.Linear and attr == "weight":
            out[name] = v.permute(2, 0, 1).reshape(v.shape[2], -1).contiguous()  # (in, K*out)
        else:
            out[name] = v.reshape(len(vectors), -1).T.contiguous()  # (numel, K)
    return out


def _hook_dots(model, x, y, vectors, layers, prepared: dict | None = None):
    """``(grad_z(x, y) @ vectors.T, squared norms of its rows)`` without the Linear weights' rows.

    ``prepared``: :func:`prepare_dot_vectors` of ``vectors``, when the caller streams many chunks.
    """
    params, owners, inputs, outputs, logits = _capture_layers(model, x, layers)
    modules = dict(model.named_modules())
    cot = _label_cotangent(y)(logits.detach())
    grads_out = dict(zip(owners, torch.autograd.grad(logits, [outputs[m] for m in owners], grad_outputs=cot), strict=True))
    prepared = prepare_dot_vectors(model, vectors, layers) if prepared is None else prepared
    b, k = len(x), len(vectors)
    dots = torch.zeros(b, k, dtype=vectors.dtype, device=vectors.device)
    sq = torch.zeros(b, dtype=vectors.dtype, device=vectors.device)
    for m in owners:
        module, a, g = modules[m], inputs[m], grads_out[m]
        names = [n for n in params if n.rpartition(".")[0] == m]
        if type(module) is nn.Linear and a.ndim == 2:
            for name in names:
                if name.endswith("weight"):  # <V_k, g a^T> = g^T V_k a
                    va = (a @ prepared[name]).reshape(b, k, g.shape[1])  # (B, K, out)
                    dots += torch.bmm(va, g[:, :, None])[:, :, 0]
                    sq += (g * g).sum(1) * (a * a).sum(1)
                else:
                    dots += g @ prepared[name]
                    sq += (g * g).sum(1)
        else:
            grads = _module_sample_grads(module, a, g)
            for name in names:
                gs = grads[name.rpartition(".")[2]].reshape(b, -1)
                dots += gs @ prepared[name]
                sq += (gs * gs).sum(1)
    return dots, sq


def sample_gradient_parts(model: nn.Module, x: torch.Tensor, y: torch.Tensor, layers=None) -> dict:
    """Per-example loss gradients in pieces, the ``nn.Linear`` weight rows never built: in parameter order,
    ``{name: ("outer", g (B, out), a (B, in))}`` for a Linear weight (example i's gradient is
    ``g[i] a[i]^T``) or ``{name: ("rows", (B, numel))}``. Hooks path only (the caller checks
    :func:`_hooks_supported`); the model in eval mode.
    """
    params, owners, inputs, outputs, logits = _capture_layers(model, x, layers)
    modules = dict(model.named_modules())
    cot = _label_cotangent(y)(logits.detach())
    grads_out = dict(zip(owners, torch.autograd.grad(logits, [outputs[m] for m in owners], grad_outputs=cot), strict=True))
    parts, done, b = {}, {}, len(x)
    for name in params:
        mod_name, _, attr = name.rpartition(".")
        module, a, g = modules[mod_name], inputs[mod_name], grads_out[mod_name]
        if type(module) is nn.Linear and a.ndim == 2:
            parts[name] = ("outer", g, a) if attr == "weight" else ("rows", g)
            continue
        if mod_name not in done:
            done[mod_name] = _module_sample_grads(module, a, g)
        parts[name] = ("rows", done[mod_name][attr].reshape(b, -1))
    return parts


def _module_sample_grads(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    b = len(a)
    if type(module) is nn.Linear:
        a2, g2 = a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])  # (B, T, in), (B, T, out)
        out = {"weight": torch.bmm(g2.transpose(1, 2), a2)}  # (B, out, in)
        if module.bias is not None:
            out["bias"] = g2.sum(1)
        return out
    out = {"weight": _conv_weight_grads(a, g, module)}  # (B, Cout, Cin*kh*kw)
    if module.bias is not None:
        out["bias"] = g.reshape(b, g.shape[1], -1).sum(2)
    return out


def _zero_padded(module: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """A convolution's input (B, Cin, H, W) with its zero padding applied (``a`` itself without padding)."""
    ph, pw = module.padding
    return nn.functional.pad(a, (pw, pw, ph, ph)) if ph or pw else a


def _conv_weight_grads(a: torch.Tensor, g: torch.Tensor, module: nn.Conv2d) -> torch.Tensor:
    """Per-example weight gradients of a Conv2d (groups 1): input (B, Cin, H, W), output gradient
    (B, Cout, Ho, Wo) -> (B, Cout, Cin*kh*kw); ``Cout`` may be any multiple of the module's (several
    cotangents stacked, as the per-class gradients are).

    Example b's gradient correlates its input with its output gradient: one grouped convolution
    over the batch, the examples as groups (the input's batch and channel axes swapped; the
    module's stride and dilation trade places). No unfolded copy of the input (B, Cin kh kw, Ho Wo)
    is made: on the CPU 3 times faster than unfold and a batched product for the CNN's first layer,
    the same numbers (tested against loops for stride, padding and dilation).
    """
    a = _zero_padded(module, a)
    b, cin = a.shape[:2]
    cout = g.shape[1]
    kh, kw = module.kernel_size
    out = nn.functional.conv2d(a.transpose(0, 1), g.reshape(b * cout, 1, *g.shape[2:]), stride=module.dilation,
                               dilation=module.stride, groups=b)  # (Cin, B*Cout, >= kh, >= kw)
    out = out[:, :, :kh, :kw]
    return out.reshape(cin, b, cout, kh * kw).permute(1, 2, 0, 3).reshape(b, cout, cin * kh * kw)


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
        for c, cot in enumerate(_class_cotangents(probs)):
            grads = torch.autograd.grad(logits, [outputs[m] for m in owners], grad_outputs=cot, retain_graph=c < n_classes - 1)
            per_class.append(dict(zip(owners, grads, strict=True)))
        parts, done = {}, {}
        for name in params:
            mod_name, _, attr = name.rpartition(".")
            module, a = modules[mod_name], inputs[mod_name]
            if type(module) is nn.Linear and a.ndim == 2:
                g = torch.stack([pc[mod_name] for pc in per_class], dim=1)  # (B, C, out)
                parts[name] = ("outer", g, a) if attr == "weight" else ("rows", g)
            elif type(module) is nn.Conv2d:  # all classes in one call: their output gradients stacked as channels
                if mod_name not in done:
                    stacked = torch.stack([pc[mod_name] for pc in per_class], dim=1)  # (B, C, out, ...)
                    done[mod_name] = _module_sample_grads(module, a, stacked.reshape(b, -1, *stacked.shape[3:]))
                parts[name] = ("rows", done[mod_name][attr].reshape(b, n_classes, -1))
            else:
                rows = torch.stack([_module_sample_grads(module, a, pc[mod_name])[attr].reshape(b, -1) for pc in per_class], dim=1)
                parts[name] = ("rows", rows)
        return probs, parts
    finally:
        model.train(was_training)
