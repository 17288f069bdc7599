"""Parameters and data as the engine sees them: which parameters are scored, flat vectors, inputs.

Influence is taken over the parameters that train (``requires_grad=True``), or a user-chosen
subset of layers; gradients are flattened in ``model.named_parameters()`` order. Training and
test data are tensors ``(x, y)`` or any dataset-like object with ``tensors(indices)`` / ``__len__``
(or a ``torch.utils.data.Dataset`` of ``(x, y)`` pairs); :func:`iter_chunks` streams them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn


def select_parameters(model: nn.Module, layers: Sequence[str] | str | None = None) -> dict[str, torch.Tensor]:
    """The parameters influence is taken over, as ``{name: detached tensor}`` in model order.

    ``layers=None`` means every parameter that trains (``requires_grad=True``: a frozen backbone
    is not scored); otherwise a module name or parameter-name prefix, or a list of them (e.g.
    ``["fc3"]`` or ``"fc2.weight"``), frozen or not. Raises ValueError naming the choices when a
    name matches nothing, or when nothing trains.
    """
    named = dict(model.named_parameters())
    if layers is None:
        chosen = {k: v.detach() for k, v in named.items() if v.requires_grad}
        if not chosen:
            raise ValueError("the model has no parameter with requires_grad=True; unfreeze the layers to score, "
                             f"or name them with layers=[...] (parameters: {list(named)[:8]})")
        return chosen
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


def _split_params(model: nn.Module, layers):
    params = select_parameters(model, layers)
    frozen = {k: v.detach() for k, v in model.named_parameters() if k not in params}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    return params, frozen, buffers


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


def pick_images(split, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised test images and labels for ``indices`` of a split, with a clear error when out of range."""
    n = data_length(split)
    idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    if len(idx) == 0:
        raise ValueError("no test indices given")
    bad = idx[(idx < 0) | (idx >= n)]
    if len(bad):
        raise ValueError(f"test index {int(bad[0])} is out of range: the test set has {n} images (0..{n - 1})")
    return as_tensors(split, idx)
