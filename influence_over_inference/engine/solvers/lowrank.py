"""The linear algebra of the fast solver's fits: Gram rows and basis vectors from per-class gradient pieces,
the top eigenpairs of a Gram matrix, and the merge of two fits' low-rank curvatures into one span.

Pure functions over tensors (:mod:`.fast` streams the pieces and keeps the results). Where a step takes
eigenpairs under ``torch.distributed``, rank 0 computes them and broadcasts them.
"""

from __future__ import annotations

import torch

from ..distributed import broadcast_from_main, is_main


def merge_span(rows: torch.Tensor, lam: torch.Tensor, new_rows: torch.Tensor, new_lam: torch.Tensor, rank: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``rank`` eigenpairs of ``Q^T diag(lam) Q + V^T diag(new_lam) V`` for orthonormal basis rows ``Q`` (k, P)
    and ``V`` (r, P): ``(rows (k', P), eigenvalues (k',) float64, mix (k + r, k') float64)`` with ``rows = mix^T [Q; V]``.

    With ``B = [Q^T diag(sqrt(lam)), V^T diag(sqrt(new_lam))]``, the sum is ``B B^T``, whose nonzero eigenpairs
    come from the small Gram ``B^T B``: its diagonal blocks are ``diag(lam)`` and ``diag(new_lam)``, so only the
    cross block ``Q V^T`` is a product over the P parameters (the rest in float64). Exact where nothing is
    dropped (``rank >= k + r``); merging fits one at a time otherwise keeps each step's top eigenpairs (the
    frequent-directions sketch of their mean), which the tests check against an exact eigendecomposition.
    Under ``torch.distributed`` rank 0 takes the eigenpairs and broadcasts them, as for a fit.
    """
    ev = vec = None
    if is_main():
        s_q, s_v = lam.clamp_min(0).sqrt(), new_lam.clamp_min(0).sqrt()
        cross = s_q[:, None] * (rows @ new_rows.T).double() * s_v[None]  # (k, r)
        gram = torch.cat([torch.cat([torch.diag(lam), cross], 1), torch.cat([cross.T, torch.diag(new_lam)], 1)])
        ev, vec = torch.linalg.eigh(gram)
        ev, vec = ev.flip(0)[:rank], vec.flip(1)[:, :rank]
        keep = ev > ev[0] * 1e-10  # as a fit's: directions whose eigenvalues are rounding error are dropped
        ev, vec = ev[keep], vec[:, keep]
    ev, vec = broadcast_from_main(ev, vec)
    mix = torch.cat([lam.clamp_min(0).sqrt(), new_lam.clamp_min(0).sqrt()])[:, None] * vec / ev.sqrt()  # (k + r, k')
    return mix.T.to(rows.dtype) @ torch.cat([rows, new_rows]), ev, mix


def _gram_rows(parts: dict, mine: torch.Tensor, first: int = 0) -> torch.Tensor:
    """Rows ``mine`` (sample positions, all their classes) of the factor's Gram matrix, unscaled, in the
    columns of samples ``first`` on: (|mine| C, (m - first) C)."""
    out = None
    for kind, *t in parts.values():
        if kind == "outer":
            g, a = t  # (m, C, out), (m, in)
            n_classes = g.shape[1]
            gg = g[mine].reshape(-1, g.shape[-1]) @ g[first:].reshape(-1, g.shape[-1]).T  # (|mine| C, (m - first) C)
            term = gg * (a[mine] @ a[first:].T).repeat_interleave(n_classes, 0).repeat_interleave(n_classes, 1)
        else:
            r = t[0].reshape(t[0].shape[0], -1, t[0].shape[-1])  # (m, C, k)
            term = r[mine].reshape(-1, r.shape[-1]) @ r[first:].reshape(-1, r.shape[-1]).T
        out = term if out is None else out + term
    return out


def _mirror_upper_blocks(gram: torch.Tensor, block: int) -> None:
    """Fill, in place, the blocks below the diagonal blocks of size ``block`` from those above (only those were computed)."""
    for r0 in range(0, len(gram), block):
        r1 = r0 + block
        gram[r1:, r0:r1] = gram[r0:r1, r1:].T


def _basis(parts: dict, coef: torch.Tensor, mine: torch.Tensor) -> torch.Tensor:
    """``coef^T rows`` (r, P): the basis vectors as rows, summed over the factor rows of the samples ``mine``
    only (the rest is other ranks').

    A Linear weight's rows ``g[i, c] a[i]^T`` share their input across the classes, so its block is
    ``sum_i (sum_c coef[ic] g[i, c]) a[i]^T``: the classes are summed before the outer products
    (C times fewer multiply-adds than summing the C rows of each sample one by one). Each block is
    written straight into its columns of the result, which is laid out as the products come (basis
    vectors as rows), so nothing is transposed or concatenated.
    """
    n_classes = next(iter(parts.values()))[1].shape[1]
    rows = (mine[:, None] * n_classes + torch.arange(n_classes, device=mine.device)).reshape(-1)
    coef = coef[rows]  # (|mine| C, r)
    widths = [t[0].shape[-1] * t[1].shape[-1] if kind == "outer" else t[0].shape[-1] for kind, *t in parts.values()]
    out = coef.new_empty(coef.shape[1], sum(widths))
    start = 0
    for (kind, *t), width in zip(parts.values(), widths, strict=True):
        block = out[:, start : start + width]
        start += width
        if kind == "outer":
            g, a = t  # (m, C, out), (m, in)
            g, a = g[mine], a[mine]  # (M, C, out), (M, in)
            per_sample = coef.reshape(len(mine), n_classes, coef.shape[1])  # (M, C, r)
            for k0 in range(0, coef.shape[1], 64):
                h = torch.einsum("mco,mck->kom", g, per_sample[:, :, k0 : k0 + 64])  # (k, out, M): classes summed
                block[k0 : k0 + h.shape[0]] = (h @ a).reshape(h.shape[0], -1)  # (k, out*in)
        else:
            r = t[0][mine]
            block.copy_(coef.T @ r.reshape(-1, r.shape[-1]))  # (r, numel)
    return out


def top_eigh(matrix: torch.Tensor, rank: int, generator: torch.Generator, oversample: int = 20, iters: int = 4):
    """Top ``rank`` eigenpairs (descending, eigenvalues clamped at 0) of a symmetric PSD matrix (N, N).

    A full ``eigh`` when ``rank`` is more than a third of N or ``iters`` is 0; else randomized subspace iteration
    (Halko, Martinsson & Tropp 2011, Alg. 4.4 with a Rayleigh-Ritz step): ``iters`` products
    with an (N, rank + oversample) block, seeded. Eigh of a 5,000 x 5,000 Gram takes ~80 s on
    one busy core here; this ~7 s.
    """
    n = len(matrix)
    k = min(n, rank + oversample)
    if 3 * rank >= n or iters == 0:
        evals, evecs = torch.linalg.eigh(matrix)
        keep = min(rank, n)
        return evals.flip(0)[:keep].clamp_min(0), evecs.flip(1)[:, :keep]
    q = torch.randn(n, k, generator=generator, dtype=torch.float64).to(matrix)
    for _ in range(iters):
        q, _ = torch.linalg.qr(matrix @ q)
    evals, w = torch.linalg.eigh(q.T @ matrix @ q)
    evals, evecs = evals.flip(0)[:rank].clamp_min(0), (q @ w).flip(1)[:, :rank]
    return evals, evecs
