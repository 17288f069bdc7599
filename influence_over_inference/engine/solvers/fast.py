"""The fast solver: top eigenpairs of the Gauss-Newton matrix from per-class gradients, closed-form inverse.

Fitted once from a seeded subsample of training images, it then solves any number of vectors at
the cost of two (K, P) x (P, rank) products, and self-influence of every training image needs
only their products with the ``rank`` basis vectors. See :class:`FastSolver` for the design, how
it was chosen and where it is inexact.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..distributed import (
    all_gather_rows,
    all_reduce_sum,
    broadcast_from_main,
    is_main,
    shard_indices,
)
from ..gradients import class_gradients
from ..hooks import _hooks_supported, class_gradient_parts, sample_gradient_parts
from .base import InverseHVP, _check_common
from .lowrank import _basis, _gram_rows, _mirror_upper_blocks, merge_span, top_eigh

log = logging.getLogger(__name__)

RESTS = ("damping", "ekfac")


@dataclass
class FastSettings:
    damping: float = 0.01  # lambda: extra damping added to GGN + weight_decay I (issue 9's sweeps: the highest LDS)
    rank: int = 500  # number of top GGN eigenpairs kept per fit (at most n_samples * n_classes)
    n_samples: int = 250  # training examples per fit whose per-class gradients form the GGN factor
    n_fits: int = 16  # independent fits on disjoint seeded subsamples; their inverses (one per span) are averaged (seed stability)
    span_images: int = 0  # images per span: consecutive fits merged until they hold about this many (the top ``rank``
    #                       eigenpairs of their mean curvature, :func:`merge_span`); at most n_samples (0, the default):
    #                       one span per fit. Larger spans come closer to the exact GGN, fewer spans agree less across
    #                       seeds (``python bench/merged_spans.py``, README)
    eigh_iters: int = 4  # subspace iterations of the randomized eigensolver; 0 = exact eigh of the Gram
    seed: int = 0  # seeds the subsamples (and the randomized eigensolver)
    chunk_size: int = 100  # examples per per-class-gradient call (rows = chunk_size * n_classes)
    curvature: str = "ggn"  # the fast solver is built on the GGN's per-example factorisation
    rest: str = "ekfac"  # the curvature outside each fit's span: "ekfac" (EK-FAC from all training images, :mod:`.ekfac`,
    #                      compressed to the rest of the space) or "damping" (zero there: 1/d, the defaults before issue 9's hybrid)

    def __post_init__(self):
        _check_common(self)
        if self.rest not in RESTS:
            raise ValueError(f"rest must be one of {RESTS}, got {self.rest!r}")
        if self.curvature != "ggn":
            raise ValueError("the fast solver uses the Gauss-Newton curvature; set curvature='ggn'")
        if self.rank < 1 or self.n_samples < 1 or self.chunk_size < 1 or self.n_fits < 1:
            raise ValueError("rank, n_samples, n_fits and chunk_size must be >= 1")
        if self.span_images < 0:
            raise ValueError(f"span_images must be >= 0 (at most n_samples: one span per fit), got {self.span_images}")
        if self.eigh_iters < 0:
            raise ValueError(f"eigh_iters must be >= 0 (0 = exact eigh), got {self.eigh_iters}")


class FastSolver(InverseHVP):
    """Top-``rank`` eigenpairs of the Gauss-Newton matrix, exact inverse on them, EK-FAC (``rest="ekfac"``, the
    default) or ``1/(wd + damping)`` (``rest="damping"``) elsewhere, averaged over ``n_fits`` independent subsamples.

    The default since issue 9's hybrid sweep (``python bench/ekfac_design_cnn.py``, sections
    ``ekfac_sweep*`` of bench/results/fast_design.json; LDS on 500 test images against 50 retrained
    halves, fast seeds 0 / 1): the sampled GGN's top eigenpairs miss the rest of the spectrum, which
    ``1/d`` treats as zero, so the low damping at which the LDS is highest amplified the sampling
    noise there. With EK-FAC from all training images for the rest (:meth:`_hybrid`), the LDS at
    damping 0.01 is 0.073 / 0.073, against 0.070 for EK-FAC alone (ours, as kronfluence's) and 0.060
    for the 16 x 250 fits with ``1/d`` at 0.1 (the previous default); at 0.1 the hybrid (its EK-FAC
    factors from 5,000 images) gives 0.068 / 0.066. The price: an EK-FAC fit on top of the 16 fits, and quadratic forms (self-influence) need
    EK-FAC solves, not only the basis products (:meth:`basis` is None). What follows describes the
    fits themselves and how their number and size were chosen (with ``rest="damping"``).

    The GGN of softmax cross-entropy factorises per example: ``sum_c p_c g(c) g(c)^T`` with
    ``g(c)`` the gradient for label ``c`` (:func:`..gradients.class_gradients`). Each fit streams
    these rows over a seeded subsample of ``n_samples`` training images into a factor
    ``G_f`` (n_samples * C, P) with ``GGN ~= G_f^T G_f`` and keeps its top ``rank`` eigenpairs
    ``U_f diag(e_f) U_f^T`` (Gram matrix and eigendecomposition in float64). The ``n_fits``
    subsamples are disjoint slices of one seeded permutation, and their inverses are averaged:
    with ``d = weight_decay + damping``::

        H^{-1} v  ~=  v / d  +  (1/F) sum_f U_f diag(1/(e_f + d) - 1/d) U_f^T v

    for any number of vectors at the cost of two (K, P) x (P, F rank) products (s_test is linear
    in the inverse, so averaging costs fits, not scoring); self-influence of every training image
    needs only its products with the ``F rank`` basis vectors (:meth:`basis`), which
    :meth:`basis_products` takes without building the gradients' Linear-weight rows (each fit
    keeps its factor for that: a kernel against its m C factor rows).

    Why these defaults (issue 9; ``python bench/fast_design_cnn.py``, bench/results/fast_design.json):
    on the real CNN (top GGN eigenvalue ~31, the 500th ~0.19), two fits that differ only in their
    seed agree, over all 50,000 training images (mean of 10 test images), at Spearman 0.60 with one
    500-image fit at damping 0.01 (the first default; 6.9 and 6.8 of their top-10 helpful and
    harmful shared). Averaging fits is what moves it; more images per fit does not, so for a given
    fit time many small fits beat a few large ones (the Gram matrix and its eigenpairs cost the
    square of the rows). Section ``cnn_sweep_small_fits`` (one checkpoint, LDS on 500 test images
    against 50 retrained halves, seeds 0 / 1, fit seconds at 2 threads under load):

    ==========  =======  ===============  ============  =================  ======
    images x    damping  seed Spearman    top-10 shared LDS                fit s
    fits
    ==========  =======  ===============  ============  =================  ======
    500 x 8     0.1      0.928            9.0 / 9.0     0.057 / 0.058      89
    500 x 16    0.1      0.960            9.1 / 9.0     0.058 / 0.058      178
    250 x 16    0.1      0.961            9.3 / 9.1     0.054 / 0.055      59
    250 x 16    0.03     0.953            9.2 / 9.1     0.056 / 0.057      59
    125 x 16    0.01     0.957            9.5 / 9.3     0.053 / 0.054      25
    250 x 32    0.01     0.972            9.3 / 9.1     0.057 / 0.059      117
    ==========  =======  ===============  ============  =================  ======

    The default, 16 fits of 250 images at damping 0.1 and rank 500, meets the stability goal
    (Spearman >= 0.95, >= 9 of the top 10 shared) at two thirds of the fit time of the earlier
    8 x 500 default, for an LDS 0.003 lower (inside its interval, but on both seeds) and twice the
    basis memory (16 x 124 MB). Smaller fits and lower damping trade fidelity: on the benchmark's
    3,702-parameter conv net (2,000 training images, so 16 fits of 125), Pearson against exact
    influence from the explicit damped GGN is 0.958 at damping 0.1 but 0.898 at 0.03 (8 fits of
    250 at 0.1: 0.983; ``small_net_pearson``); fewer columns per fit lower the LDS (rank 250:
    0.052, ``cnn_sweep_rank250``). Earlier sweeps on an earlier checkpoint (``cnn_sweep``,
    ``cnn_sweep_16_fits``): damping raises stability and lowers the LDS; 1,000 images per fit do
    not help stability (4 fits: 0.83).
    Merging the fits into fewer, larger spans (``span_images``: the top eigenpairs of several fits' mean
    curvature, ``python bench/merged_spans.py``) brings the small net's Pearson with exact influence from 0.830 to
    0.972 (one span of all 16 fits), but then two seeds agree at 0.776 on the CNN: only the average over
    many spans is stable. A fixed span size meets both: ``n_fits=64, span_images=1000`` (16 spans of 1,000
    images) gives seed Spearman 0.974 with 9.0 / 9.5 of the top 10 shared, LDS 0.077 / 0.076, and Pearson
    0.965 on the small net (two spans of about 1,000 of its 2,000 images), at four times the fits (README).
    An isotropic model of the rest of the spectrum (``1/(d + c)`` outside the span instead of
    ``1/d``) lowered the LDS for every ``c`` tried. ``eigh_iters=4`` puts the 500th eigenvalue
    ~8.5% low, but an exact eigh (``eigh_iters=0``, 3.2 times the fit time) gave the same seed
    Spearman (0.598 vs 0.599 at damping 0.01) and LDS (0.060). Where the model is small, ``n_samples`` at
    least the training set gives one fit on all of it, exact for the GGN at full rank
    (tests/test_solvers.py).
    """

    name = "fast"
    settings_class = FastSettings

    def subsamples(self) -> list[torch.Tensor]:
        """The training indices of each fit (sorted): disjoint slices of one permutation seeded by ``seed``.

        ``n_samples`` at least the training set: one fit on all of it (exact for the GGN; identical
        fits would add nothing). Otherwise ``n_fits`` slices of ``min(n_samples, n_train // n_fits)``
        images each (fewer per fit, with a warning, where the training set is too small).
        """
        s = self.settings
        if s.n_samples >= self.n_train:
            return [torch.arange(self.n_train)]
        m = min(s.n_samples, self.n_train // s.n_fits)
        if m < 1:
            raise ValueError(f"n_fits={s.n_fits} disjoint subsamples need at least {s.n_fits} training examples, got {self.n_train}")
        if m < s.n_samples:
            log.warning("fast solver: %d training examples hold %d disjoint subsamples of %d, not %d",
                        self.n_train, s.n_fits, m, s.n_samples)
        perm = torch.randperm(self.n_train, generator=torch.Generator().manual_seed(s.seed))
        return [perm[f * m : (f + 1) * m].sort().values for f in range(s.n_fits)]

    def span_groups(self, n_fits: int, per_fit: int) -> list[list[int]]:
        """The fits merged into each span: consecutive fits, as many as make ``span_images`` images of ``per_fit``
        each (rounded; near-equal groups), one per span where ``span_images`` is at most ``per_fit``."""
        per = max(1, min(n_fits, round(self.settings.span_images / max(per_fit, 1))))
        return [g.tolist() for g in torch.tensor_split(torch.arange(n_fits), math.ceil(n_fits / per))]

    def _fit(self) -> None:
        """Eigenpairs of each fit's subsample (:meth:`_fit_one`), merged into spans (:meth:`span_groups`,
        :func:`merge_span`) as they come; the spans' inverses are averaged.

        Each span's basis vectors are written, as rows, into one preallocated (S r, P) matrix as they
        come (a contiguous block per span: one copy, and only the span being merged is held besides);
        ``eigenvectors`` is its (P, S r) transpose, a view. Each fit's kernel-route factor
        (:meth:`basis_products`) is mapped onto its span's basis (``coef @ W``, ``U_span = sum_f U_f W_f``).
        """
        subsamples = self.subsamples()
        groups = self.span_groups(len(subsamples), len(subsamples[0]))
        evals, rows, used, factors, self.factor_spans = [], None, 0, [], []
        for g, group in enumerate(groups):
            basis = lam = None
            mixes = []  # per fit of the span: its basis's coefficients in the span's (r_f, k), float64
            for f in group:
                e, u, factor = self._fit_one(subsamples[f], torch.Generator().manual_seed(self.settings.seed + f))
                if basis is None:
                    basis, lam = u, e.double() / len(group)
                    mixes.append(None)  # the identity
                else:
                    k = basis.shape[0]
                    basis, lam, mix = merge_span(basis, lam, u, e.double() / len(group), self.settings.rank)
                    mixes = [mix[:k] if m is None else m @ mix[:k] for m in mixes] + [mix[k:]]
                factors.append(factor)
                self.factor_spans.append(g)
                del u
            for fac, mix in zip(factors[len(factors) - len(group) :], mixes, strict=True):  # each fit's factor onto the span
                if fac is not None and mix is not None:
                    fac["coef"] = (fac["coef"].double() @ mix).to(fac["coef"].dtype)
            if rows is None:  # room for as many vectors per span as the first kept
                rows = basis.new_empty(len(groups) * max(basis.shape[0], 1), basis.shape[1])
            if used + basis.shape[0] > rows.shape[0]:  # a later span kept more (fewer zero eigenvalues): grow
                rows = torch.cat([rows[:used], basis.new_empty((len(groups) - g) * basis.shape[0], basis.shape[1])])
            rows[used : used + basis.shape[0]] = basis
            used += basis.shape[0]
            evals.append(lam.to(self.dtype))
            del basis
        self.n_fits = len(groups)  # the inverses averaged: one per span
        self.eigenvalues = torch.cat(evals)  # (S r,)
        rows = rows if used == rows.shape[0] else rows[:used].clone()
        self.eigenvectors = rows.T  # (P, S r), orthonormal within each span; rows (S r, P) contiguous underneath
        self.factors = factors if all(f is not None for f in factors) else None
        self.widths = [len(e) for e in evals]
        self._row_basis = None
        if self.settings.rest == "ekfac":
            self._fit_rest()

    def _fit_rest(self, state: dict | None = None) -> None:
        """The EK-FAC solver of the rest of the spectrum (``rest="ekfac"``): on all training images, the same seed."""
        from .ekfac import EKFACSettings, EKFACSolver

        s = self.settings
        self._rest_m = None
        if not _hooks_supported(self.model, self.layers):  # EK-FAC takes Linear and Conv2d layers only
            log.warning("fast solver: EK-FAC takes only nn.Linear and nn.Conv2d parameters; the curvature outside "
                        "the fits' spans is taken as zero (as rest='damping')")
            self.rest_solver = None
            return
        self.rest_solver = EKFACSolver(EKFACSettings(damping=s.damping, seed=s.seed)).fit(
            self.model, self.train_data, weight_decay=self.weight_decay, layers=self.layers, state=state,
            progress=self.progress)

    def _uses_rest(self) -> bool:
        """Whether the rest of the space is EK-FAC's (``rest="ekfac"`` on a model EK-FAC can take)."""
        return self.settings.rest == "ekfac" and getattr(self, "rest_solver", None) is not None

    def _fit_one(self, idx: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Factor pieces of the subsample ``idx``, their Gram matrix, its top eigenpairs, the basis.

        Returns ``(eigenvalues (r,), basis vectors as rows (r, P), factor)``; ``factor`` keeps what
        :meth:`basis_products` needs to take a training gradient's products with this fit's basis
        columns without the Linear-weight rows: ``coef`` (m C, r), with ``U = rows^T coef``, and
        each Linear weight's pieces ``g`` (m, C, out) and ``a`` (m, in) (about 8 MB a fit for the CNN).

        The Gram matrix and its eigendecomposition are in float64 (the pieces are promoted), so the
        fit does not move with the BLAS thread count or the number of processes (near-equal
        eigenvalues make a float32 eigendecomposition thread-dependent); the basis is in the model's dtype.
        Under ``torch.distributed`` (:mod:`..distributed`) each rank computes the pieces of its
        share of the subsample (in whole chunks), the pieces are all-gathered, each rank forms
        its rows of the Gram matrix and its part of the basis sum, and both are all-reduced;
        rank 0 takes the eigenpairs and broadcasts them. One process: the same steps, all rows.
        """
        s = self.settings
        m = len(idx)
        mine = shard_indices(m, block=s.chunk_size)  # positions in idx this rank computes
        local = self._factor_parts(idx[mine] if len(mine) else idx[:1])
        if not len(mine):  # a rank without examples: shapes from one example, no rows
            local = {name: (kind, *(t[:0] for t in ts)) for name, (kind, *ts) in local.items()}
        parts = {name: (kind, *(all_gather_rows(t, m, s.chunk_size) for t in ts)) for name, (kind, *ts) in local.items()}
        parts64 = {name: (kind, *(t.double() for t in ts)) for name, (kind, *ts) in parts.items()}
        n_classes = next(iter(parts.values()))[1].shape[1]
        rows_mine = (mine[:, None] * n_classes + torch.arange(n_classes)).reshape(-1)  # rows of the factor this rank owns
        gram = torch.zeros(m * n_classes, m * n_classes, dtype=torch.float64, device=self.device)
        for b0 in range(0, len(mine), s.chunk_size):  # in whole chunks: the same products in any number of processes
            block = mine[b0 : b0 + s.chunk_size]
            first = int(block[0])  # the Gram is symmetric: only the columns of this chunk's samples on
            gram[rows_mine[b0 * n_classes : (b0 + len(block)) * n_classes].to(self.device), first * n_classes:] = _gram_rows(
                parts64, block.to(self.device), first)
        gram = all_reduce_sum(gram) / m  # Gram of factor = rows / sqrt(m)
        _mirror_upper_blocks(gram, s.chunk_size * n_classes)
        evals = evecs = None
        if is_main():
            evals, evecs = top_eigh(gram, s.rank, generator, iters=s.eigh_iters)
            nonzero = evals > evals[0] * 1e-10 if len(evals) else evals > 0
            evals, evecs = evals[nonzero], evecs[:, nonzero]
        evals, evecs = broadcast_from_main(evals, evecs)
        coef = evecs / (evals.sqrt() * math.sqrt(m))  # (m*C, r): U = rows^T coef
        coef = coef.to(self.dtype)
        basis = all_reduce_sum(_basis(parts, coef, mine.to(self.device)))  # (r, P), orthonormal rows
        outer = {name: ts for name, (kind, *ts) in parts.items() if kind == "outer"}
        kernel_cost = m * n_classes * (coef.shape[1] + sum(g.shape[-1] for g, _ in outer.values())) + m * sum(a.shape[-1] for _, a in outer.values())
        basis_cost = sum(g.shape[-1] * a.shape[-1] for g, a in outer.values()) * coef.shape[1]
        factor = None  # kept only where the kernel route is the cheaper (not when m C is near the parameter count)
        if outer and kernel_cost < basis_cost:
            factor = {"coef": coef, "g": {name: g for name, (g, _) in outer.items()}, "a": {name: a for name, (_, a) in outer.items()}}
        return evals.to(self.dtype), basis, factor

    def _factor_parts(self, idx: torch.Tensor) -> dict:
        """Per-class gradient pieces of the examples ``idx``: ``{name: ("outer", g (B, C, out), a (B, in)) | ("rows", (B, C, k))}``.

        The Linear-weight rows ``g a^T`` are never built where the hooks path applies (the Gram
        needs only ``(g . g')(a . a')``, Goodfellow's identity); other models give one ``rows`` piece.
        """
        from tqdm.auto import tqdm

        s = self.settings
        ghost = _hooks_supported(self.model, self.layers)
        chunks = []
        for start in tqdm(range(0, len(idx), s.chunk_size), desc="fast solver: GGN factor", unit="chunk", disable=not self.progress, leave=False):
            x, _ = self._train_tensors(idx[start : start + s.chunk_size])
            if ghost:
                chunks.append(class_gradient_parts(self.model, x, self.layers)[1])
            else:
                chunks.append({"all": ("rows", class_gradients(self.model, x, self.layers)[1])})  # (B, C, P)
        return {name: (kind, *(torch.cat([c[name][1 + i] for c in chunks]) for i in range(len(ts))))
                for name, (kind, *ts) in chunks[0].items()}

    def fits(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each span's basis and eigenvalues, ``[(U_f (P, r_f), e_f (r_f,)), ...]`` (one span per fit unless
        ``span_images`` merges them): views of ``eigenvectors`` and ``eigenvalues``, whose columns are the spans'
        side by side (``widths`` of them each)."""
        out, start = [], 0
        for width in self.widths:
            out.append((self.eigenvectors[:, start : start + width], self.eigenvalues[start : start + width]))
            start += width
        return out

    def _weights(self) -> torch.Tensor:
        """Per basis column: ``(1/(e + d) - 1/d) / n_fits`` (``n_fits``: the spans averaged), the average inverse's
        correction to ``I/d``."""
        d = self.total_damping
        if d <= 0:
            raise ValueError("the fast solver needs weight_decay + damping > 0 (the rest of the spectrum is treated as 0)")
        return (1 / (self.eigenvalues + d) - 1 / d) / self.n_fits

    def inverse_hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        v = self._check_vectors(vectors)
        if self._uses_rest():
            return self._hybrid(v)[0]
        w = self._weights()
        coef = v @ self.eigenvectors  # (K, F r)
        return v / self.total_damping + (coef * w) @ self.eigenvectors.T

    def quadratic_form(self, vectors: torch.Tensor) -> torch.Tensor:
        v = self._check_vectors(vectors)
        if self._uses_rest():
            return self._hybrid(v, quadratic=True)[1]
        return self.quadratic_form_from_products(v @ self.eigenvectors, (v * v).sum(1))

    def _rest(self):
        """The EK-FAC solver at this solver's damping and, per span, the Cholesky factor of ``U_f^T A^{-1} U_f`` (float64)."""
        rest = self.rest_solver
        if rest.settings.damping != self.settings.damping or self._rest_m is None:  # again after a damping change
            rest.settings.damping = self.settings.damping
            self._rest_m = []
            for u, _ in self.fits():
                m = rest.inverse_gram(u.T).double()  # U^T A^{-1} U (r, r)
                self._rest_m.append(torch.linalg.cholesky((m + m.T) / 2))
        return rest, self._rest_m

    def quadratic_form_with_products(self, vectors: torch.Tensor, dots: torch.Tensor) -> torch.Tensor:
        """``v^T H^{-1} v`` given ``dots = v @ eigenvectors`` (from :meth:`basis_products`, which takes them
        without the Linear-weight rows): the hybrid then needs one product with the bases, not two."""
        v = self._check_vectors(vectors)
        if self._uses_rest():
            return self._hybrid(v, quadratic=True, products=dots.to(v))[1]
        return self.quadratic_form_from_products(dots.to(v), (v * v).sum(1))

    def _hybrid(self, v: torch.Tensor, quadratic: bool = False, products: torch.Tensor | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``rest="ekfac"``: ``(H^{-1} v, v^T H^{-1} v)`` (the second only if ``quadratic``; then not the first), with

            H_f^{-1} = U (E + d)^{-1} U^T + A^{-1} - A^{-1} U (U^T A^{-1} U)^{-1} U^T A^{-1}

        averaged over the fits: the inverse of the sampled GGN on the fit's span ``U`` and of the damped
        EK-FAC ``A`` compressed to the rest of the space (its Schur complement; with ``A = d I`` the
        fast solver's ``(1/d)(I - U U^T)`` there). Three products with the bases and two EK-FAC solves;
        the quadratic form two products and one solve, or one product where ``products`` (``U^T v``) is given.
        """
        rest, chol = self._rest()
        d = self.total_damping
        av = rest.inverse_hvp(v)  # A^{-1} v (K, P)
        c1 = v @ self.eigenvectors if products is None else products  # U^T v (K, F r)
        c2 = (av @ self.eigenvectors).double()  # U^T A^{-1} v
        z, start = torch.empty_like(c2), 0
        for width, l_f in zip(self.widths, chol, strict=True):
            block = c2[:, start : start + width]
            z[:, start : start + width] = torch.cholesky_solve(block.T, l_f).T  # (U^T A^{-1} U)^{-1} U^T A^{-1} v
            start += width
        f = self.n_fits
        if quadratic:
            q = (c1 * c1 / (self.eigenvalues + d)).sum(1).double() + f * (v * av).sum(1).double() - (c2 * z).sum(1)
            return None, (q / f).to(v.dtype)
        out = (c1 / (self.eigenvalues + d)) @ self.eigenvectors.T + f * av - rest.inverse_hvp((z.to(v.dtype)) @ self.eigenvectors.T)
        return out / f, None

    def basis(self) -> torch.Tensor | None:
        if self._uses_rest():  # quadratic forms need EK-FAC solves too, not only the basis products
            return None
        return self.eigenvectors.T  # (F r, P)

    def quadratic_form_from_products(self, dots: torch.Tensor, sqnorms: torch.Tensor) -> torch.Tensor:
        return sqnorms / self.total_damping + (dots * dots * self._weights()).sum(1)

    def basis_products_ready(self) -> bool:
        """Whether :meth:`basis_products` can run: the fit kept its factors and the model takes the hooks."""
        return bool(getattr(self, "factors", None)) and _hooks_supported(self.model, self.layers)

    def basis_products(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(grad_z(x, y) @ basis().T, squared norms of grad_z)`` without the gradients' Linear-weight rows.

        A Linear weight's per-example gradient is ``g a^T`` and each fit's basis there is
        ``sum_ic coef[ic] g_ic a_i^T`` (:func:`_basis`), so their product is
        ``sum_ic coef[ic] (g . g_ic)(a . a_i)``: a kernel against the fit's m C factor rows, then
        ``@ coef``; the other parameters (convolutions, biases) take the basis rows directly. For
        the CNN's 16 fits of 250 images about a tenth of the multiply-adds of ``grad_z @ basis().T``,
        with the same numbers (tested). None where the fit kept no factors (a model the hooks
        cannot take, or a cache entry written before they were kept): use :func:`grad_z` and
        :meth:`basis`.
        """
        if not self.basis_products_ready():
            return None
        x, y = x.to(self.device, self.dtype), y.to(self.device)
        with torch.enable_grad():
            parts = sample_gradient_parts(self.model, x, y, self.layers)
        if self._row_basis is None:  # the basis rows of the parameters that are not Linear weights
            offsets, start = [], 0
            for kind, *t in parts.values():
                numel = t[0].shape[1] * t[1].shape[1] if kind == "outer" else t[0].shape[1]
                if kind == "rows":
                    offsets.append(torch.arange(start, start + numel))
                start += numel
            self._row_basis = self.eigenvectors[torch.cat(offsets).to(self.device)] if offsets else None
        rows = [t[0] for kind, *t in parts.values() if kind == "rows"]
        sqnorms = sum((t[0] * t[0]).sum(1) * (t[1] * t[1]).sum(1) if kind == "outer" else (t[0] * t[0]).sum(1)
                      for kind, *t in parts.values())
        dots = torch.cat(rows, dim=1) @ self._row_basis if rows else x.new_zeros(len(x), self.eigenvectors.shape[1])
        starts = [0]
        for width in self.widths:
            starts.append(starts[-1] + width)
        for factor, span in zip(self.factors, self.factor_spans, strict=True):  # each fit's kernel, into its span's columns
            start, width = starts[span], factor["coef"].shape[1]
            kernel = None
            for name, g_fit in factor["g"].items():
                _, g, a = parts[name]
                n_classes = g_fit.shape[1]
                term = (g @ g_fit.reshape(-1, g_fit.shape[-1]).T) * (a @ factor["a"][name].T).repeat_interleave(n_classes, 1)
                kernel = term if kernel is None else kernel + term  # (B, m C)
            if kernel is not None:
                dots[:, start : start + width] += kernel @ factor["coef"]
        return dots, sqnorms

    def state_dict(self) -> dict:
        state = {"eigenvalues": self.eigenvalues, "eigenvectors": self.eigenvectors, "n_fits": torch.tensor(self.n_fits),
                 "widths": torch.tensor(self.widths)}
        if self._uses_rest():
            state["rest"] = self.rest_solver.state_dict()
        return state if self.factors is None else {**state, "factors": self.factors, "factor_spans": torch.tensor(self.factor_spans)}

    def describe(self) -> dict:
        """Name and settings; ``span_images`` only where it merges fits: at 0 the solver is the one before the
        setting existed, whose cache entries and results keep their keys."""
        out = super().describe()
        if out["span_images"] == 0:
            del out["span_images"]
        return out

    def load_state_dict(self, state: dict) -> None:
        self.eigenvalues = state["eigenvalues"].to(self.device, self.dtype)
        self.eigenvectors = state["eigenvectors"].to(self.device, self.dtype)
        self.n_fits = int(state.get("n_fits", 1))
        self.factors = [{"coef": f["coef"].to(self.device, self.dtype),
                         "g": {k: v.to(self.device, self.dtype) for k, v in f["g"].items()},
                         "a": {k: v.to(self.device, self.dtype) for k, v in f["a"].items()}}
                        for f in state.get("factors") or []] or None  # None: an entry from before factors were kept
        spans = state.get("factor_spans")  # absent in entries from before spans were merged: one fit per span
        self.factor_spans = spans.tolist() if spans is not None else list(range(len(self.factors or [])))
        widths = state.get("widths")  # absent in entries from before they were kept: equal widths
        self.widths = widths.tolist() if widths is not None else [len(self.eigenvalues) // self.n_fits] * self.n_fits
        self._row_basis = None
        self.rest_solver = None
        if self.settings.rest == "ekfac" and _hooks_supported(self.model, self.layers):
            if "rest" not in state:
                raise ValueError("this fast-solver state has no EK-FAC factors (rest='ekfac'); fit it again")
            self._fit_rest(state["rest"])
