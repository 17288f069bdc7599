"""Fidelity against stability (issue 9): the hybrid with its fits' spans merged in groups, on the small net and the CNN.

The default hybrid averages 16 inverses, one per fit of 250 images (:class:`FastSolver`, ``rest="ekfac"``).
Averaging is what makes two seeds agree, and what costs fidelity to the exact Gauss-Newton inverse:
each fit's span carries the curvature of its own images only. Here the 16 fits are merged in ``G``
groups of ``16 / G`` consecutive fits: each group's span is the top-``rank`` eigenpairs of its fits' mean
low-rank curvature ``mean_f U_f diag(e_f) U_f^T`` (:func:`merge_spans`), and the hybrid averages ``G``
inverses. ``G = 16`` is the default; ``G = 1`` inverts the curvature of all 16 fits' images at once.

- **small net** (:func:`fast_design_cnn._small_problem`, 3,702 parameters, 2,000 training images, so
  16 fits of 125): Pearson against exact influence from the explicit damped GGN at damping 0.01, float64;
- **the CNN** (the checkpoint, 50,000 training images, EK-FAC fits of ``bench/ekfac_design_cnn.py``'s
  cache): LDS on the 500 LDS test images against the 50 retrained halves of ``results/lds.npz``, and the
  seed stability of ``fast_design_cnn.stability`` (fits seeded 0 and 1, 10 test images, all 50,000
  training images); merge and s_test seconds (510 vectors) under whatever load there was, not a benchmark.

The fits of each seed are the default solver's, fitted once and cached under ``data/fast_design/``.
Writes section ``merged_spans`` of bench/results/fast_design.json.
Usage: ``python bench/merged_spans.py [--groups 1 2 4 8 16] [--n-fits 16] [--section merged_spans] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from ekfac_design_cnn import fitted  # noqa: E402
from fast_design_cnn import (  # noqa: E402
    N_STABLE,
    OUT,
    _exact_scores,
    _peak_mb,
    _small_problem,
    _train_pass,
    lds_of,
    lds_setup,
    stability,
)

from influence_over_inference.engine.hashing import file_sha256  # noqa: E402
from influence_over_inference.engine.io import atomic_torch_save, write_json_atomic  # noqa: E402
from influence_over_inference.engine.solvers.fast import FastSettings, FastSolver  # noqa: E402
from influence_over_inference.engine.solvers.lowrank import merge_span  # noqa: E402

log = logging.getLogger("merged_spans")


def merge_spans(fits: list[tuple[torch.Tensor, torch.Tensor]], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` eigenpairs ``(Q (P, k), lam (k,))`` of ``mean_f U_f diag(e_f) U_f^T`` for fits ``[(U_f (P, r_f), e_f)]``
    with orthonormal columns ``U_f``, merged one fit at a time by the engine's :func:`merge_span` (what
    ``FastSettings.span_images`` does during a fit, here on fits already made)."""
    n = len(fits)
    rows, lam = fits[0][0].T, fits[0][1].double() / n
    for u, e in fits[1:]:
        rows, lam, _ = merge_span(rows, lam, u.T, e.double() / n, rank)
    return rows.T, lam


def grouped(fits: list, groups: int, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fits merged in ``groups`` groups of consecutive fits (:func:`merge_spans`); one group per fit: unchanged."""
    if len(fits) % groups:
        raise ValueError(f"{len(fits)} fits do not split into {groups} equal groups")
    per = len(fits) // groups
    return [merge_spans(fits[g * per : (g + 1) * per], rank) if per > 1 else fits[g] for g in range(groups)]


def set_spans(solver: FastSolver, spans: list[tuple[torch.Tensor, torch.Tensor]]) -> FastSolver:
    """The hybrid ``solver`` averaging one inverse per span: its state loaded with these bases, eigenvalues and
    widths (in place), its EK-FAC rest kept; no factors, so no kernel route."""
    state = {"eigenvectors": torch.cat([q for q, _ in spans], 1), "eigenvalues": torch.cat([lam for _, lam in spans]),
             "n_fits": torch.tensor(len(spans)), "widths": torch.tensor([q.shape[1] for q, _ in spans])}
    rest = solver.state_dict().get("rest")
    solver.load_state_dict(state if rest is None else {**state, "rest": rest})
    return solver


def small_net(groups: list[int], threads: int, n_fits: int = 16, damping: float = 0.01) -> list[dict]:
    """Pearson against exact influence on the small net for each number of groups of the default's fits
    (``n_fits`` of them: fewer images each, as the training set holds ``n_fits`` disjoint subsamples)."""
    from engine_stages.small import _pearson_rows

    small = _small_problem(threads)
    eye = torch.eye(len(small.ggn), dtype=small.ggn.dtype)
    exact = _exact_scores(small, torch.linalg.inv(small.ggn + (small.weight_decay + damping) * eye))
    fast = FastSolver(FastSettings(damping=damping, n_fits=n_fits)).fit(small.model, small.tx, small.ty,
                                                                        weight_decay=small.weight_decay)
    fits = [(u.clone(), e.clone()) for u, e in fast.fits()]
    images = sum(len(i) for i in fast.subsamples())
    rows = []
    for g in groups:
        inverse = set_spans(fast, grouped(fits, g, fast.settings.rank)).inverse_hvp(eye)
        r = _pearson_rows(_exact_scores(small, (inverse + inverse.T) / 2), exact)
        rows.append({"groups": g, "images_per_span": images // g, "pearson": float(r.mean()), "pearson_min": float(r.min())})
        log.info("small net: %s", json.dumps(rows[-1]))
    return rows


def cnn(groups: list[int], n_fits: int = 16) -> dict:
    """LDS and seed stability on the CNN for each number of groups of ``n_fits`` default fits (seeds 0 and 1)."""
    st = lds_setup()
    rows, stable = [], {}
    for seed in (0, 1):
        ekfac, _ = fitted(st.model, st.data.train, st.wd, "sampled", seed, st.cache, None)
        path = st.cache / (f"fast-default-fits-seed{seed}.pt" if n_fits == 16 else f"fast-{n_fits}-fits-seed{seed}.pt")
        if path.exists():
            state = torch.load(path, weights_only=True)
        else:
            state = FastSolver(FastSettings(seed=seed, n_fits=n_fits, rest="damping")).fit(st.model, st.data.train, weight_decay=st.wd,
                                                                           progress=True).state_dict()
            atomic_torch_save(state, path)
        fast = FastSolver(FastSettings(seed=seed, n_fits=n_fits)).fit(st.model, st.data.train, weight_decay=st.wd,
                                                       state={**state, "rest": ekfac.state_dict()})
        fits = [(u.clone(), e.clone()) for u, e in fast.fits()]
        for g in groups:
            t0 = time.perf_counter()
            set_spans(fast, grouped(fits, g, fast.settings.rank))
            merge_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            s_test = fast.inverse_hvp(torch.cat([st.g_lds, st.g_stable]))
            row = {"groups": g, "fast_seed": seed, "images_per_span": fast.settings.n_samples * n_fits // g, "merge_s": merge_s,
                   "s_test_s_510": time.perf_counter() - t0,
                   **lds_of((s_test[: len(st.g_lds)].double() @ st.gs.T).numpy(), st.margins)}
            rows.append(row)
            stable[(g, seed)] = s_test[len(st.g_lds) :]
            log.info("CNN: %s", json.dumps(row))
        del fast, fits
    order = list(stable)
    _, scores = _train_pass(st.model, st.data.train, st.masks[:1], torch.cat([stable[k] for k in order]), "stability scores")
    block = {k: scores[i * N_STABLE : (i + 1) * N_STABLE] for i, k in enumerate(order)}
    table = []
    for g in groups:
        seeds = [r for r in rows if r["groups"] == g]
        table.append({"groups": g, "images_per_span": seeds[0]["images_per_span"],
                      "lds_margin_seed0": seeds[0]["lds_margin"], "lds_margin_seed1": seeds[1]["lds_margin"],
                      **stability(block[(g, 0)], block[(g, 1)])})
    return {"data_source": st.data.source, "checkpoint_sha256": file_sha256(ROOT / "data/cifar_net.pt")[:16],
            "n_lds_test": len(st.test_idx), "n_subsets": len(st.subsets), "rows": rows, "table": table}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--n-fits", type=int, default=16, help="fits of 250 images (the default's 16, or more)")
    ap.add_argument("--section", default="merged_spans", help="the JSON section written")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    section = {"command": "python bench/merged_spans.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "settings": FastSolver(FastSettings()).describe(), "damping": 0.01, "threads": args.threads,
               "n_fits": args.n_fits,
               "small_net": small_net(args.groups, args.threads, args.n_fits), "cnn": cnn(args.groups, args.n_fits)}
    section.update({"minutes": (time.perf_counter() - t0) / 60, "peak_rss_mb": _peak_mb(),
                    "notes": "G groups of 16 / G consecutive fits of the default hybrid, each group's span the top "
                             "500 eigenpairs of its fits' mean low-rank curvature; G = 16 is the default. Small net: "
                             "Pearson with exact influence (explicit damped GGN, float64). CNN: LDS (margin, 500 test "
                             "images, 50 halves), stability of seeds 0 vs 1 (10 test images, 50,000 training images)."})
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc[args.section] = section
    write_json_atomic(doc, out)


if __name__ == "__main__":
    main()
