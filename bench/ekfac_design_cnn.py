"""The EK-FAC solver on the real CNN (issue 9): LDS, seed stability and fit cost per setting, and the low-rank hybrid.

Writes the ``ekfac_sweep`` section of bench/results/fast_design.json. For each label mode
(``sampled``: one label per image from the model's softmax; ``expected``: every class) the solver
is fitted on all 50,000 training images, once per seed (cached under ``data/fast_design/``); the
damping only changes the inverse, so each fit serves every damping:

- **LDS** on the 500 LDS test images against the 50 retrained halves of ``results/lds.npz`` (no
  retraining): the predicted change of a subset model's output is ``s_test . G_S`` with ``G_S`` the
  subset's summed training gradients (one pass, shared with ``bench/fast_design_cnn.py``'s cache);
- **seed stability** (sampled labels: seeds 0 and 1 draw other labels): Spearman over all training
  images and top-10 overlap for the 10 stability test images of ``fast_design_cnn.py``;
- **the hybrid** (``--hybrid``): the fast solver's 16 fits of 250 images with EK-FAC for the rest of
  the spectrum instead of ``1/d``: per fit ``U (E + d)^{-1} U^T + A^{-1} - A^{-1} U (U^T A^{-1} U)^{-1} U^T A^{-1}``
  (``A``: the damped EK-FAC), the inverse of the sampled GGN on the fit's span and of EK-FAC's
  compression to the rest; with EK-FAC at zero it is the fast solver's ``(1/d)(I - U U^T)`` there.

Fit seconds are one thread under whatever load there was (not a benchmark).
Usage: ``python bench/ekfac_design_cnn.py [--dampings 0.001 0.003 0.01 0.03 0.1] [--hybrid] [--threads 2]``.
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

from fast_design_cnn import N_STABLE, OUT, _peak_mb, _train_pass, lds_of, lds_setup, stability  # noqa: E402

from influence_over_inference.engine.hashing import file_sha256  # noqa: E402
from influence_over_inference.engine.io import atomic_torch_save, write_json_atomic  # noqa: E402
from influence_over_inference.engine.solvers.ekfac import EKFACSettings, EKFACSolver  # noqa: E402
from influence_over_inference.engine.solvers.fast import FastSettings, FastSolver  # noqa: E402

log = logging.getLogger("ekfac_design_cnn")


def fitted(model, train, wd, labels: str, seed: int, cache: Path, factor_samples: int | None) -> tuple[EKFACSolver, float]:
    """An EK-FAC fit on all training images, its factors from ``factor_samples`` of them (cached): the solver and its fit seconds."""
    path = cache / f"ekfac-{labels}-seed{seed}-factors{factor_samples or 'all'}.pt"
    solver = EKFACSolver(EKFACSettings(labels=labels, seed=seed, n_factor_samples=factor_samples))
    if path.exists():
        blob = torch.load(path, weights_only=True)
        return solver.fit(model, train, weight_decay=wd, state=blob["state"]), float(blob["seconds"])
    t0 = time.perf_counter()
    solver.fit(model, train, weight_decay=wd, progress=True)
    seconds = time.perf_counter() - t0
    atomic_torch_save({"state": solver.state_dict(), "seconds": torch.tensor(seconds)}, path)
    return solver, seconds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dampings", type=float, nargs="+", default=[0.001, 0.003, 0.01, 0.03, 0.1])
    ap.add_argument("--labels", nargs="+", default=["sampled", "expected"])
    ap.add_argument("--hybrid", action="store_true", help="also the fast solver's fits with EK-FAC for the rest")
    ap.add_argument("--hybrid-dampings", type=float, nargs="+", default=[0.003, 0.01])
    ap.add_argument("--factor-samples", type=int, default=None, help="EK-FAC's n_factor_samples (default: all images)")
    ap.add_argument("--hybrid-fits", type=int, default=16, help="the hybrid's n_fits (of 250 images)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--section", default="ekfac_sweep")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    lds = lds_setup()  # fast_design_cnn.py's (its cache key at rank 500): the same G_S
    data, model, wd, margins, masks, cache, g_lds, g_stable, gs = (lds.data, lds.model, lds.wd, lds.margins, lds.masks,
                                                                   lds.cache, lds.g_lds, lds.g_stable, lds.gs)
    results, fit_seconds, stable_rows = [], {}, []
    for labels in args.labels:
        seeds = (0, 1) if labels == "sampled" else (0,)
        solvers = {}
        for s in seeds:
            solvers[s], fit_seconds[f"{labels}_seed{s}"] = fitted(model, data.train, wd, labels, s, cache, args.factor_samples)
        for damping in args.dampings:
            row = {"solver": "ekfac", "labels": labels, "damping": damping}
            for s, solver in solvers.items():
                solver.settings.damping = damping
                pred = (solver.inverse_hvp(g_lds).double() @ gs.T).numpy()
                row.update({f"{k}_seed{s}": v for k, v in lds_of(pred, margins).items()})
                if len(seeds) > 1:
                    stable_rows.append(((labels, damping, s), solver.inverse_hvp(g_stable)))
            results.append(row)
            log.info("%s", json.dumps(row))
    hybrid_rows = []
    if args.hybrid:  # the engine's FastSolver(rest="ekfac"), given the cached EK-FAC fit of the same seed
        for s in (0, 1):
            ekfac, _ = fitted(model, data.train, wd, "sampled", s, cache, args.factor_samples)
            plain = FastSolver(FastSettings(seed=s, n_fits=args.hybrid_fits)).fit(model, data.train, weight_decay=wd,
                                                                                  progress=True)
            fast = FastSolver(FastSettings(seed=s, n_fits=args.hybrid_fits, rest="ekfac")).fit(
                model, data.train, weight_decay=wd, state={**plain.state_dict(), "rest": ekfac.state_dict()})
            del plain
            for damping in args.hybrid_dampings:
                fast.settings.damping = damping
                t0 = time.perf_counter()
                s_test = fast.inverse_hvp(torch.cat([g_lds, g_stable]))
                row = {"solver": "hybrid", "fast_seed": s, "n_fits": args.hybrid_fits, "damping": damping,
                       "s_test_s_510": time.perf_counter() - t0,
                       **lds_of((s_test[: len(g_lds)].double() @ gs.T).numpy(), margins)}
                stable_rows.append((("hybrid", damping, s), s_test[len(g_lds) :]))
                hybrid_rows.append(row)
                log.info("%s", json.dumps(row))
            del fast
    if stable_rows:  # one scoring pass for every stability s_test
        order = [k for k, _ in stable_rows]
        _, scores = _train_pass(model, data.train, masks[:1], torch.cat([v for _, v in stable_rows]), "stability scores")
        block = {k: scores[i * N_STABLE : (i + 1) * N_STABLE] for i, k in enumerate(order)}
        for row in results + hybrid_rows:
            kind = row.get("labels", "hybrid")
            a, b = block.get((kind, row["damping"], 0)), block.get((kind, row["damping"], 1))
            if a is not None and b is not None:
                row.update(stability(a, b))
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc[args.section] = {
        "command": "python bench/ekfac_design_cnn.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "data_source": data.source, "n_train": len(data.train), "weight_decay": wd,
        "checkpoint_sha256": file_sha256(ROOT / "data/cifar_net.pt")[:16],
        "n_lds_test": len(lds.test_idx), "n_subsets": len(lds.subsets), "fit_s": fit_seconds, "peak_rss_mb": _peak_mb(),
        "threads": args.threads,
        "notes": "EK-FAC on all 50,000 training images; LDS: margin, 500 LDS test images, 50 retrained halves, 95% "
                 "bootstrap CI; stability: seeds 0 vs 1 (sampled labels; the hybrid: the fast fits' seeds), 10 test "
                 "images; fit_s under whatever load there was (not a benchmark).",
        "rows": results, "hybrid_rows": hybrid_rows,
    }
    write_json_atomic(doc, out)


if __name__ == "__main__":
    main()
