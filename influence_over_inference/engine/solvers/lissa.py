"""LiSSA (Agarwal, Bullins & Hazan 2017) as Koh & Liang (2017) use it, done right.

The estimate is fed back, divided by ``scale``, ``repeat`` runs are averaged, and divergence is
detected early with a message saying how large ``scale`` must be.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..curvature import curvature_products
from .base import InverseHVP, _check_common


class LiSSADivergenceError(RuntimeError):
    """LiSSA's recursion blew up (norm growth or NaN): ``scale`` is below the curvature's largest eigenvalue."""


@dataclass
class LiSSASettings:
    curvature: str = "ggn"  # "ggn" or "hessian" (Koh & Liang use the Hessian)
    damping: float = 0.01  # lambda, as for every solver; the paper's damp = damping / scale
    scale: float = 500.0  # must exceed the largest eigenvalue of a minibatch curvature (+ weight decay)
    depth: int = 5000  # recursion steps per repetition
    repeat: int = 1  # r: independent repetitions averaged
    batch_size: int = 100  # training examples per recursion step (drawn with replacement-free sampling)
    seed: int = 0  # seeds the minibatch sampling (torch.Generator)
    blowup: float = 1e4  # divergence when ||h|| > blowup * ||v|| / damp, or not finite
    check_every: int = 10  # test for divergence every this many steps

    def __post_init__(self):
        _check_common(self)
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.depth < 1 or self.repeat < 1 or self.batch_size < 1 or self.check_every < 1:
            raise ValueError("depth, repeat, batch_size and check_every must be >= 1")
        if not self.blowup > 1:
            raise ValueError(f"blowup must be > 1, got {self.blowup}")

    @property
    def damp(self) -> float:
        """Koh & Liang's ``damp``: the recursion's damping, ``damping / scale``."""
        return self.damping / self.scale

    @classmethod
    def from_paper(cls, damp: float, scale: float, depth: int, repeat: int = 1, **rest) -> LiSSASettings:
        """Settings from the paper's (and nimarb's) names: the effective damping is ``damp * scale``."""
        return cls(damping=damp * scale, scale=scale, depth=depth, repeat=repeat, **rest)



class LiSSASolver(InverseHVP):
    """LiSSA (Agarwal, Bullins & Hazan 2017) as Koh & Liang use it, done right.

    For each repetition, with ``damp = damping / scale`` and a fresh minibatch B_t each step::

        h_0 = v;   h_t = v + (1 - damp) h_{t-1} - (C_{B_t} + weight_decay I) h_{t-1} / scale

    whose fixed point is ``h = scale (C + weight_decay I + damping I)^{-1} v``; the result is
    ``h_depth / scale`` averaged over ``repeat`` repetitions. Nothing is differentiated through
    the recursion (no graph kept). It converges when ``scale`` exceeds the largest eigenvalue of
    every minibatch curvature (plus weight decay); otherwise :class:`LiSSADivergenceError` is
    raised early, with an estimate of that eigenvalue. Minibatches are drawn with a seeded
    ``torch.Generator``, or given explicitly via :meth:`inverse_hvp`'s ``batches``.
    """

    name = "lissa"
    settings_class = LiSSASettings

    def _batches(self, gen: torch.Generator):
        s = self.settings
        n = self.n_train
        order, pos = torch.randperm(n, generator=gen), 0
        while True:
            if pos + s.batch_size > n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos : pos + s.batch_size]
            pos += s.batch_size
            yield self._train_tensors(idx.sort().values)

    def _batch_product(self, xb, yb, h):
        return curvature_products(self.model, xb, yb, h, self.settings.curvature, self.layers, chunk_size=len(xb)) + self.weight_decay * h

    def inverse_hvp(self, vectors: torch.Tensor, batches: Iterable | None = None) -> torch.Tensor:
        """As the base class; ``batches`` (optional) is an iterable of ``(x, y)`` minibatches used in
        order, one per step, instead of seeded sampling (``depth`` steps per repetition)."""
        v = self._check_vectors(vectors)
        s = self.settings
        gen = torch.Generator().manual_seed(s.seed)
        estimates = []
        vnorm = v.norm(dim=1)
        limit = s.blowup * vnorm / max(s.damp, 1e-12)
        for rep in range(s.repeat):
            source = iter(batches) if batches is not None else self._batches(gen)
            h = v.clone()
            for step in range(s.depth):
                try:
                    xb, yb = next(source)
                except StopIteration:
                    raise ValueError(f"batches ran out after {step} steps; LiSSA needs depth={s.depth} minibatches per repetition") from None
                xb, yb = xb.to(self.device, self.dtype), yb.to(self.device)
                with torch.no_grad():
                    h = v + (1 - s.damp) * h - self._batch_product(xb, yb, h) / s.scale
                if step % s.check_every == 0 or step == s.depth - 1:
                    norms = h.norm(dim=1)
                    if not torch.isfinite(norms).all() or (norms > limit).any():
                        self._raise_divergence(rep, step, xb, yb)
            estimates.append(h / s.scale)
        return torch.stack(estimates).mean(0)

    def largest_eigenvalue(self, x: torch.Tensor, y: torch.Tensor, steps: int = 20, seed: int = 0) -> float:
        """Power-iteration estimate of the largest |eigenvalue| of ``C_batch + weight_decay I`` on ``(x, y)``
        (moved to the model's device and dtype)."""
        x, y = x.to(self.device, self.dtype), y.to(self.device)
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(1, self.n_params, generator=gen).to(self.device, self.dtype)
        v /= v.norm()
        value = 0.0
        for _ in range(steps):
            w = self._batch_product(x, y, v)
            value = float(w.norm())
            if value == 0:
                break
            v = w / value
        return value

    def _raise_divergence(self, rep, step, xb, yb):
        s = self.settings
        lam = self.largest_eigenvalue(xb, yb)
        suggest = float(f"{max(2 * lam, 1.0):.1g}")
        raise LiSSADivergenceError(
            f"LiSSA diverged at step {step} of repetition {rep} (estimate not finite or growing without bound): "
            f"scale={s.scale:g} is too small. The largest eigenvalue of a minibatch {s.curvature} curvature "
            f"(batch_size={s.batch_size}, + weight decay) is about {lam:.3g} (power iteration); the recursion needs "
            f"scale > that. Raise scale to about {suggest:g} (and keep damping={s.damping:g} with damp=damping/scale), "
            f"or use a larger batch_size to smooth the minibatch curvature."
        )
