"""EK-FAC: the Gauss-Newton matrix per layer in a Kronecker eigenbasis with corrected eigenvalues, from all training images.

George et al., "Fast Approximate Natural Gradient Descent in a Kronecker-factored Eigenbasis"
(NeurIPS 2018), as Grosse et al. use it for influence functions ("Studying Large Language Model
Generalization with Influence Functions", 2023) and kronfluence implements it. Our own
implementation, on the engine's hooks (:mod:`..hooks`); see :class:`EKFACSolver` for what it
approximates and where it is exact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..distributed import all_reduce_sum, broadcast_from_main, is_main, shard_indices
from ..hooks import (
    _capture_layers,
    _class_cotangents,
    _hooks_supported,
    _label_cotangent,
    _module_sample_grads,
    _zero_padded,
)
from ..params import select_parameters, unflatten_params
from .base import InverseHVP, _check_common

log = logging.getLogger(__name__)

LABELS = ("sampled", "expected")


@dataclass
class EKFACSettings:
    damping: float = 0.01  # lambda: extra damping added to the EK-FAC curvature + weight_decay I
    n_samples: int | None = None  # training images the eigenvalues are estimated from (None: all)
    n_factor_samples: int | None = None  # of those, a seeded subsample the Kronecker factors (the eigenbases) come from
    #                                      (None: all; issue 9: 5,000 of 50,000 give the same LDS in less fit time, but
    #                                      two seeds then agree at Spearman 0.95, not 0.99: bench/ekfac_design_cnn.py)
    labels: str = "sampled"  # "sampled": one label per image drawn from the model's softmax (the GGN in expectation,
    #                          one backward pass); "expected": every class weighted by its probability (the GGN exactly, C passes)
    seed: int = 0  # seeds the sampled labels and the subsample
    chunk_size: int = 500  # training images per forward/backward pass
    curvature: str = "ggn"  # EK-FAC approximates the Gauss-Newton matrix (of softmax cross-entropy)

    def __post_init__(self):
        _check_common(self)
        if self.curvature != "ggn":
            raise ValueError("the EK-FAC solver approximates the Gauss-Newton curvature; set curvature='ggn'")
        if self.labels not in LABELS:
            raise ValueError(f"labels must be one of {LABELS}, got {self.labels!r}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        for name in ("n_samples", "n_factor_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")


class EKFACSolver(InverseHVP):
    """Block-diagonal curvature, one block per Linear or Conv2d layer, diagonal in a Kronecker eigenbasis.

    A layer's weight and bias form one matrix ``W`` (out, in [+1]); an example's gradient on it is
    ``sum_t d_t a_t^T`` (``a_t``: the layer's input at position ``t`` with a 1 appended for the bias,
    unfolded patches for a convolution; ``d_t``: the gradient at its output). The basis is
    ``Q_S (x) Q_A``, the eigenvectors of ``A = E[sum_t a_t a_t^T]`` and ``S = E[sum_t d_t d_t^T]``
    (K-FAC's factors); the eigenvalues are corrected to the mean squared gradient in that basis,
    ``Lambda = E[(Q_S^T DW Q_A)^2]``, which is the diagonal of the layer's Gauss-Newton block in
    that basis (the best diagonal there in Frobenius norm). With ``d = weight_decay + damping``::

        H^{-1} v  ~=  per layer:  Q_S [(Q_S^T V Q_A) / (Lambda + d)] Q_A^T

    Cross-layer blocks are taken as zero. The expectation over labels of softmax cross-entropy's
    per-example gradient outer product is the GGN, so labels drawn from the model's own softmax
    (``labels="sampled"``, one backward pass per chunk) estimate it without bias and ``"expected"``
    (every class, weighted) computes it. Exact (tested against the explicit damped GGN): for a
    single Linear layer and one training example (the block is then a Kronecker product).
    Two passes over the training images: the factors, then the eigenvalues in their eigenbasis.
    Under ``torch.distributed`` (:mod:`..distributed`) each process takes its share of the chunks in
    both passes and the sums are all-reduced (rank 0's eigenvectors are broadcast): the same chunks,
    labels and numbers as one process, up to the order of summation.
    """

    name = "ekfac"
    settings_class = EKFACSettings

    def _fit(self) -> None:
        from tqdm.auto import tqdm

        if not _hooks_supported(self.model, self.layers):
            raise ValueError("the EK-FAC solver takes only nn.Linear and nn.Conv2d (groups 1, zero padding) parameters; "
                             "use solver 'fast' or 'cg' for other layers")
        s = self.settings
        gen = torch.Generator().manual_seed(s.seed)
        if s.n_samples is not None and s.n_samples < self.n_train:
            idx = torch.randperm(self.n_train, generator=gen)[: s.n_samples].sort().values
        else:
            idx = torch.arange(self.n_train)
        self.blocks = _layer_blocks(self.model, self.layers)
        uniforms = torch.rand(len(idx), generator=gen, dtype=torch.float64)  # one per image: its sampled label in both passes

        def chunks(pos):  # this rank's (training indices, their uniforms) of the positions ``pos`` of idx, chunk by chunk
            pos = pos[shard_indices(len(pos), block=s.chunk_size)]  # whole chunks: the same chunks in any number of processes
            return [(idx[pos[i : i + s.chunk_size]], uniforms[pos[i : i + s.chunk_size]]) for i in range(0, len(pos), s.chunk_size)]

        pos = torch.arange(len(idx))  # the images of the factors: all, or a seeded subsample (their labels as drawn)
        if s.n_factor_samples is not None and s.n_factor_samples < len(idx):
            pos = torch.randperm(len(idx), generator=gen)[: s.n_factor_samples].sort().values
        cov = {m: [torch.zeros(n, n, dtype=torch.float64, device=self.device) for n in _factor_sizes(module, flags)]
               for m, (module, flags) in self.blocks.items()}
        for chunk, u in tqdm(chunks(pos), desc="EK-FAC: factors", unit="chunk", disable=not self.progress, leave=False):
            for m, (a, grads) in self._layer_pieces(chunk, u).items():
                module, flags = self.blocks[m]
                cov[m][0] = cov[m][0] + _input_cov(module, a, *flags)
                cov[m][1] = cov[m][1] + sum(_sum_outer(_positions(g)) for g in grads)
        self.q_a, self.q_s = {}, {}
        for m, (a_cov, s_cov) in cov.items():  # summed over the ranks; rank 0's eigenvectors on every rank
            q_a = q_s = None
            a_cov, s_cov = all_reduce_sum(a_cov), all_reduce_sum(s_cov)
            if is_main():
                q_a, q_s = torch.linalg.eigh(a_cov)[1].to(self.dtype), torch.linalg.eigh(s_cov)[1].to(self.dtype)
            self.q_a[m], self.q_s[m] = broadcast_from_main(q_a, q_s)

        lam = {m: torch.zeros(len(self.q_s[m]), len(self.q_a[m]), dtype=torch.float64, device=self.device) for m in self.blocks}
        for chunk, u in tqdm(chunks(torch.arange(len(idx))), desc="EK-FAC: eigenvalues", unit="chunk",
                             disable=not self.progress, leave=False):
            for m, (a, grads) in self._layer_pieces(chunk, u).items():
                lam[m] += self._rotated_squares(m, a, grads)
        self.eigenvalues = {m: (all_reduce_sum(v) / len(idx)).to(self.dtype) for m, v in lam.items()}

    def _layer_pieces(self, chunk: torch.Tensor, uniforms: torch.Tensor) -> dict:
        """Per layer: its input and, per cotangent, the gradient at its output: ``{module: (a, [g, ...])}``.

        One cotangent with sampled labels (image ``i``'s label: the inverse of its softmax's
        distribution function at ``uniforms[i]``, so the labels do not depend on the chunking); one
        per class with expected labels (class ``c``'s scaled by ``sqrt(p_c)``, so that the squares
        sum to the expectation over labels).
        """
        x, _ = self._train_tensors(chunk)
        _, owners, inputs, outputs, logits = _capture_layers(self.model, x, self.layers)
        if self.settings.labels == "sampled":
            cdf = torch.softmax(logits.detach().double(), dim=1).cumsum(1)
            y = (cdf < uniforms.to(cdf.device)[:, None]).sum(1).clamp_max(cdf.shape[1] - 1)
            cots = [_label_cotangent(y)(logits.detach())]
        else:
            cots = _class_cotangents(torch.softmax(logits.detach(), dim=1))
        grads = [torch.autograd.grad(logits, [outputs[m] for m in owners], grad_outputs=c, retain_graph=i < len(cots) - 1)
                 for i, c in enumerate(cots)]
        return {m: (inputs[m], [g[j] for g in grads]) for j, m in enumerate(owners)}

    def _rotated_squares(self, m: str, a: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
        """Sum over the chunk's examples (and cotangents) of ``(Q_S^T DW Q_A)^2``: (out, in), float64.

        A Linear layer's DW is rank one (``d a^T``), so its rotated square is the outer product of the
        rotated factors' squares; a convolution's per-example DW comes from the hooks' grouped
        convolution (:func:`..hooks._conv_weight_grads`), with the bias's column appended.
        """
        module, (has_w, has_b) = self.blocks[m]
        q_s, q_a = self.q_s[m], self.q_a[m]
        if type(module) is nn.Linear and a.ndim == 2:
            a_rot = (_with_ones(a, has_w, has_b) @ q_a).double() ** 2  # (B, in)
            return sum(((g @ q_s).double() ** 2).T @ a_rot for g in grads)
        total = 0.0
        for g in grads:
            if type(module) is nn.Conv2d:
                sample = _module_sample_grads(module, a, g)  # weight (B, out, in), bias (B, out)
                dw = torch.cat(([sample["weight"]] if has_w else []) + ([sample["bias"][..., None]] if has_b else []), dim=2)
            else:  # a Linear layer applied at several positions
                aa = _with_ones(a.reshape(len(a), -1, a.shape[-1]), has_w, has_b)  # (B, T, in)
                dw = torch.einsum("bto,bti->boi", g.reshape(len(g), -1, g.shape[-1]), aa)
            total = total + ((q_s.T @ dw @ q_a).double() ** 2).sum(0)
        return total

    def _blocks_of(self, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows (K, P) -> per layer (K, out, in [+1]) (weight columns, then the bias's)."""
        per_param = unflatten_params(vectors, select_parameters(self.model, self.layers))
        out = {}
        for m, (_, (has_w, has_b)) in self.blocks.items():
            cols = []
            if has_w:
                w = per_param[f"{m}.weight"]
                cols.append(w.reshape(*w.shape[:2], -1))
            if has_b:
                cols.append(per_param[f"{m}.bias"][..., None])
            out[m] = torch.cat(cols, dim=2)
        return out

    def _rotated(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows (K, P) in the eigenbasis, per layer: ``Q_S^T V Q_A`` (K, out, in [+1])."""
        d = self.total_damping
        if d <= 0 and any((lam <= 0).any() for lam in self.eigenvalues.values()):
            raise ValueError("the EK-FAC curvature is singular; set weight_decay + damping > 0")
        return {m: self.q_s[m].T @ block @ self.q_a[m] for m, block in self._blocks_of(v).items()}

    def inverse_hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        v = self._check_vectors(vectors)
        d = self.total_damping
        solved = {m: self.q_s[m] @ (r / (self.eigenvalues[m] + d)) @ self.q_a[m].T for m, r in self._rotated(v).items()}
        out = []
        for name in select_parameters(self.model, self.layers):
            m, _, attr = name.rpartition(".")
            block, has_b = solved[m], self.blocks[m][1][1]
            out.append(block[..., : block.shape[2] - has_b] if attr == "weight" else block[..., -1:])
        return torch.cat([o.reshape(len(v), -1) for o in out], dim=1)

    def inverse_gram(self, vectors: torch.Tensor) -> torch.Tensor:
        """``V H^{-1} V^T`` (K, K) for rows ``V`` (K, P): one rotation into the eigenbasis, no rotation back
        (half the products of :meth:`inverse_hvp` and a product with ``V``)."""
        v = self._check_vectors(vectors)
        d = self.total_damping
        gram = 0.0
        for m, r in self._rotated(v).items():
            r = r.reshape(len(v), -1)  # (K, out in)
            gram = gram + (r / (self.eigenvalues[m] + d).reshape(1, -1)) @ r.T
        return gram

    def state_dict(self) -> dict:
        return {"q_a": self.q_a, "q_s": self.q_s, "eigenvalues": self.eigenvalues}

    def _fit_light(self) -> None:
        self.blocks = _layer_blocks(self.model, self.layers)

    def load_state_dict(self, state: dict) -> None:
        self.q_a = {m: t.to(self.device, self.dtype) for m, t in state["q_a"].items()}
        self.q_s = {m: t.to(self.device, self.dtype) for m, t in state["q_s"].items()}
        self.eigenvalues = {m: t.to(self.device, self.dtype) for m, t in state["eigenvalues"].items()}


def _layer_blocks(model: nn.Module, layers) -> dict[str, tuple[nn.Module, tuple[bool, bool]]]:
    """``{module name: (module, (weight selected, bias selected))}`` in model order."""
    modules = dict(model.named_modules())
    blocks: dict[str, list] = {}
    for name in select_parameters(model, layers):
        m, _, attr = name.rpartition(".")
        blocks.setdefault(m, [modules[m], [False, False]])[1][attr == "bias"] = True
    return {m: (mod, tuple(flags)) for m, (mod, flags) in blocks.items()}


def _factor_sizes(module: nn.Module, flags: tuple[bool, bool]) -> tuple[int, int]:
    """The sizes of a layer's two Kronecker factors: its matrix's columns (inputs, unfolded for a
    convolution, and the bias's 1) and rows (outputs)."""
    has_w, has_b = flags
    return (module.weight[0].numel() if has_w else 0) + has_b, (module.weight if has_w else module.bias).shape[0]


def _with_ones(a: torch.Tensor, has_w: bool, has_b: bool) -> torch.Tensor:
    """Input rows ``(..., in)`` as the layer's matrix columns: the input if the weight is chosen, a 1 for the bias."""
    return torch.cat(([a] if has_w else []) + ([a.new_ones(*a.shape[:-1], 1)] if has_b else []), dim=-1)


def _input_cov(module: nn.Module, a: torch.Tensor, has_w: bool, has_b: bool) -> torch.Tensor:
    """K-FAC's input factor of one chunk, ``sum over examples and positions of a_t a_t^T`` (float64), ``a_t``
    with a 1 appended for the bias; a convolution's positions are its unfolded patches."""
    if type(module) is nn.Conv2d:
        flat = _patch_rows(module, a)  # (Cin kh kw, B T)
        gram, col, count = flat @ flat.T, flat.sum(1), flat.shape[1]
    else:
        flat = a.reshape(-1, a.shape[-1])
        gram, col, count = flat.T @ flat, flat.sum(0), len(flat)
    blocks = []
    if has_w:
        blocks.append(gram.double())
    if has_b:  # the bias's row and column: sums of the inputs, and the count
        col = col.double()[:, None]
        count = torch.full((1, 1), float(count), dtype=torch.float64, device=a.device)
        if not has_w:
            return count
        blocks = [torch.cat([blocks[0], col], 1), torch.cat([col.T, count], 1)]
    return torch.cat(blocks, 0)


def _patch_rows(module: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """A convolution's unfolded input patches as rows, ``(Cin kh kw, B T)``: the columns of ``unfold``'s
    ``(B, Cin kh kw, T)`` side by side, copied once from a strided view (faster than ``unfold`` and a
    batched product: one matrix product then gives the input factor)."""
    a = _zero_padded(module, a).contiguous()
    b, cin, h, w = a.shape
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    view = a.as_strided((cin, kh, kw, b, ho, wo), (h * w, dh * w, dw, cin * h * w, sh * w, sw))
    return view.reshape(cin * kh * kw, b * ho * wo)


def _positions(g: torch.Tensor) -> torch.Tensor:
    """A layer's output gradient as ``(B, T, out)``."""
    if g.ndim == 4:  # (B, out, Ho, Wo)
        return g.flatten(2).transpose(1, 2)
    return g.reshape(len(g), -1, g.shape[-1])


def _sum_outer(z: torch.Tensor) -> torch.Tensor:
    """``sum over all leading axes of z z^T`` for rows of the last axis, in float64: (k, k)."""
    flat = z.reshape(-1, z.shape[-1])
    return (flat.T @ flat).double()
