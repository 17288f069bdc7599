"""The fast solver's settings on the real CNN (issue 9): seed stability, LDS and fit cost per configuration.

Writes the ``cnn_sweep`` section of bench/results/fast_design.json (the small-net section of
``bench/fast_design.py`` is kept). For each configuration (damping x n_fits x n_samples, rank 500,
``top_eigh`` at ``eigh_iters``):

- **seed stability**: scores of two fits seeded 0 and 1 over all 50,000 training images, for 10
  seeded test images of the LDS set: Spearman (mean over test images) and the overlap of their
  top-10 helpful and top-10 harmful images;
- **LDS** (``experiments.lds_score``) on the 500 LDS test images against the 50 retrained halves
  in ``results/lds.npz`` (no retraining), for each seed;
- fit seconds (one thread, under load: not a benchmark) and the basis memory.

The fits are the fast solver's with ``rest="damping"`` (the formula below); the EK-FAC rest of today's
default is swept by ``bench/ekfac_design_cnn.py``. Everything is computed once and reused across settings: each fit (seed, n_samples, fit index) is
cached under ``data/fast_design/``; damping and n_fits change only weights. Because the fast
solver's inverse is ``I/d + (1/F) sum_f U_f diag(1/(e_f + d) - 1/d) U_f^T``, a fit contributes
``U_f^T g_test`` and ``U_f^T G_S`` (G_S: the 50 subsets' summed training gradients, one pass) to
the LDS, and its correction vectors to the stability test images' s_test; one final pass over
the training gradients scores all configurations at once.

Usage: ``python bench/fast_design_cnn.py [--m 500 1000] [--fits 8 4] [--eigh-iters 4] [--section cnn_sweep]``
(n_fits 1, 4, 8, 16, 32 and 64 up to ``--fits``, per n_samples value). What was run (sections of the JSON):
``cnn_sweep`` (the defaults above), ``cnn_sweep_exact_eigh`` (``--m 500 --fits 1 --eigh-iters 0``),
``cnn_sweep_16_fits`` (``--m 500 --fits 16``). ``--small '[{}, {"n_fits": 1, "damping": 0.01}, ...]'``
instead writes ``small_net_pearson``: Pearson against exact influence on the benchmark's 3,702-parameter
net for each list entry of FastSettings overrides (``{}``: the defaults, ``pearson_default_vs_exact_small``;
``{"solver": "ekfac", ...}``: another solver's settings). ``--small-errors`` writes ``small_net_hybrid_errors``:
the default hybrid's Pearson there with its sampled span, its EK-FAC rest or both replaced by the exact GGN.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from influence_over_inference.engine.gradients import grad_z, iter_grad_z  # noqa: E402
from influence_over_inference.engine.hashing import file_sha256  # noqa: E402
from influence_over_inference.engine.io import atomic_torch_save, write_json_atomic  # noqa: E402
from influence_over_inference.engine.solvers.fast import FastSettings, FastSolver  # noqa: E402
from influence_over_inference.experiments.lds import LDSConfig, subset_masks  # noqa: E402
from influence_over_inference.experiments.lds_score import bootstrap_ci, rowwise_spearman  # noqa: E402
from influence_over_inference.experiments.store import settings_key  # noqa: E402
from influence_over_inference.study.checkpoints import load_checkpoint  # noqa: E402
from influence_over_inference.study.data import load_cifar10  # noqa: E402

log = logging.getLogger("fast_design_cnn")
DAMPINGS = (0.01, 0.03, 0.1, 0.3)
SEEDS = (0, 1)
N_STABLE = 10  # test images of the stability measure
OUT = ROOT / "bench/results/fast_design.json"
CACHE = ROOT / "data/fast_design"


class _Fits(FastSolver):
    """The fast solver with the fitting left to the caller (one fit at a time, cached)."""

    def _fit(self) -> None:
        pass


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _train_pass(model, train, masks, rows: torch.Tensor | None, desc: str):
    """One pass over the training gradients: subset sums G_S (S, P) float64 and, if ``rows`` (K, P), scores (K, n)."""
    gs = torch.zeros(len(masks), rows.shape[1] if rows is not None else 0, dtype=torch.float64)
    m = torch.from_numpy(masks).double()
    scores = None if rows is None else torch.empty(len(rows), len(train))
    for start, g in iter_grad_z(model, train, 500, "cpu", None, torch.float32, True, desc):
        if gs.shape[1] == 0:
            gs = torch.zeros(len(masks), g.shape[1], dtype=torch.float64)
        gs += m[:, start : start + len(g)] @ g.double()
        if rows is not None:
            scores[:, start : start + len(g)] = rows @ g.T
    return gs, scores


def fit_products(solver, m, seed, f, g_lds, g_stable, gs, cache: Path) -> dict:
    """One fit (cached): its eigenvalues, ``U^T g`` of the LDS test images, ``U^T G_S``, and per damping the
    stability images' corrections ``U diag(1/(e+d) - 1/d) U^T g`` (added to ``g/d``)."""
    path = cache / f"fit-m{m}-seed{seed}-f{f}-iters{solver.settings.eigh_iters}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    idx = solver.subsamples()[f]
    t0 = time.perf_counter()
    evals, rows, _ = solver._fit_one(idx, torch.Generator().manual_seed(seed + f))  # basis vectors as rows (r, P)
    u = rows.T  # (P, r)
    seconds = time.perf_counter() - t0
    a_lds = (g_lds @ u).double()  # (T, r)
    b = (u.T.double() @ gs.T)  # (r, S)
    a_st = g_stable @ u  # (K, r)
    corr = {}
    for d in DAMPINGS:
        total = solver.weight_decay + d
        corr[str(d)] = ((a_st * (1 / (evals + total) - 1 / total)) @ u.T)  # (K, P)
    blob = {"evals": evals.double(), "a_lds": a_lds, "b": b, "corr": corr, "seconds": torch.tensor(seconds),
            "indices": idx}
    atomic_torch_save(blob, path)
    return blob


def lds_of(pred: np.ndarray, margins: np.ndarray) -> dict:
    per = rowwise_spearman(pred, margins.T)
    return {"lds_margin": float(np.nanmean(per)), "lds_margin_ci": list(bootstrap_ci(per, 1000, 0))}


def stability(a: torch.Tensor, b: torch.Tensor) -> dict:
    ra, rb = a.argsort(1).argsort(1).double(), b.argsort(1).argsort(1).double()
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    spear = (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))
    def overlap(largest):
        ta, tb = a.topk(10, 1, largest=largest).indices, b.topk(10, 1, largest=largest).indices
        return [len(set(x.tolist()) & set(y.tolist())) for x, y in zip(ta, tb, strict=True)]
    hel, har = overlap(True), overlap(False)
    return {"seed_spearman": float(spear.mean()), "seed_spearman_min": float(spear.min()),
            "seed_top10_helpful": float(np.mean(hel)), "seed_top10_harmful": float(np.mean(har)),
            "seed_top10_overlap": float(np.mean(hel + har)) / 10}


def _small_problem(threads: int) -> SimpleNamespace:
    """The benchmark's small net (``bench/engine_stages/small.py``: same net, training subset, recipe and
    test images) in float64, its explicit GGN and the test and training gradients."""
    import copy

    sys.path.insert(0, str(ROOT / "bench"))
    from engine_stages.common import _test, random_subset
    from engine_stages.config import BenchConfig
    from engine_stages.small import explicit_ggn

    from influence_over_inference.study.model import Net
    from influence_over_inference.study.training import TrainConfig
    from influence_over_inference.study.training import train as train_model

    cfg = BenchConfig(threads=threads)
    data = load_cifar10(root=str(ROOT / "data"))
    torch.manual_seed(cfg.seed)
    tiny = Net(channels=tuple(cfg.small_channels), hidden=tuple(cfg.small_hidden))
    tc = TrainConfig(epochs=cfg.small_epochs, device="cpu", seed=cfg.seed, threads=cfg.threads)
    small_train = random_subset(data.train, cfg.small_n_train, cfg.seed)
    tiny = train_model(small_train, tc, model=tiny, progress=False).model.eval()
    tx, ty = small_train.tensors()
    x, y = _test(data, cfg, cfg.small_n_test)
    tiny64, tx64, x64 = copy.deepcopy(tiny).double(), tx.double(), x.double()
    return SimpleNamespace(model=tiny64, tx=tx64, ty=ty, x=x64, y=y, weight_decay=tc.weight_decay,
                           ggn=explicit_ggn(tiny64, tx64), g_test=grad_z(tiny64, x64, y), g_train=grad_z(tiny64, tx64, ty))


def _exact_scores(small: SimpleNamespace, inverse: torch.Tensor) -> torch.Tensor:
    """Influence scores (T, N) with the explicit inverse curvature ``inverse`` (P, P)."""
    return small.g_test @ inverse @ small.g_train.T / len(small.ty)


def small_net_pearson(settings_list: list[dict], threads: int = 1) -> dict:
    """Pearson of the fast solver against exact influence (explicit damped GGN, float64) on the benchmark's
    small net (:func:`_small_problem`), at each setting's own damping and at the notebook's 0.01.
    ``settings_list``: FastSettings overrides."""
    from engine_stages.small import _pearson_rows

    from influence_over_inference.engine.scores import influence
    from influence_over_inference.engine.solvers.registry import make_solver

    small = _small_problem(threads)
    ggn, eye = small.ggn, torch.eye(len(small.ggn), dtype=small.ggn.dtype)
    exact = {}
    rows = []
    for over in settings_list:
        settings = {k: v for k, v in over.items() if k != "solver"}  # {"solver": "ekfac", ...}: another solver
        fast = make_solver(over.get("solver", "fast"), **settings).fit(small.model, small.tx, small.ty,
                                                                        weight_decay=small.weight_decay)
        row = {**over}
        for lam in sorted({over.get("damping", fast.settings.damping), 0.01}):
            if lam not in exact:
                exact[lam] = _exact_scores(small, torch.linalg.inv(ggn + (small.weight_decay + lam) * eye))
            fast.settings.damping = lam
            r = _pearson_rows(influence(small.model, small.x, small.y, (small.tx, small.ty), fast), exact[lam])
            row[f"pearson_at_{lam}"], row[f"pearson_min_at_{lam}"] = float(r.mean()), float(r.min())
        rows.append(row)
        log.info("small net: %s", json.dumps(row))
    return {"params": sum(p.numel() for p in small.model.parameters()), "n_train": len(small.ty), "n_test": len(small.y),
            "weight_decay": small.weight_decay, "reference": "explicit damped GGN, float64", "rows": rows}


def small_net_hybrid_errors(damping: float = 0.01, threads: int = 1) -> dict:
    """Where the hybrid's error on the small net comes from: its Pearson against exact influence with each
    of its two approximations replaced by the exact GGN, as explicit (P, P) matrices (float64). Per fit,
    the hybrid inverts ``diag(E + d on the span U, A compressed to the rest)``; the rows swap in
    ``U^T (G + d) U`` for ``E + d`` (the span exact), the damped exact GGN for EK-FAC's ``A`` (the rest
    exact), or both (what remains: the cross terms between the span and the rest that the hybrid drops);
    the damped EK-FAC with the sampled curvature put in on each span and EK-FAC's cross terms kept,
    ``(A + U (E + d - U^T A U) U^T)^{-1}`` averaged over the fits; and, apart, the inverse of the fits' mean low-rank curvature ``(mean_f U_f E_f U_f^T + d)^{-1}`` (the
    fits cover all 2,000 images here; on the real CNN they cover 4,000 of 50,000, so it would be a
    sampled GGN's inverse, as seed-dependent as CG on a sample)."""
    from engine_stages.small import _pearson_rows

    from influence_over_inference.engine.solvers.registry import make_solver

    small = _small_problem(threads)
    eye = torch.eye(len(small.ggn), dtype=small.ggn.dtype)
    d = small.weight_decay + damping
    g_inv = torch.linalg.inv(small.ggn + d * eye)
    exact = _exact_scores(small, g_inv)
    fast = make_solver("fast", damping=damping).fit(small.model, small.tx, small.ty, weight_decay=small.weight_decay)
    a_inv = fast.rest_solver.inverse_hvp(eye)
    a_inv = (a_inv + a_inv.T) / 2  # (P, P): the damped EK-FAC's inverse
    fits = fast.fits()

    def pearson(inverse):
        return float(_pearson_rows(_exact_scores(small, inverse), exact).mean())

    def hybrid(span_exact: bool, rest_inverse: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for u, e in fits:
            on_span = torch.linalg.inv(u.T @ (small.ggn + d * eye) @ u) if span_exact else torch.diag(1 / (e + d))
            au = rest_inverse @ u
            total = total + u @ on_span @ u.T + rest_inverse - au @ torch.linalg.solve(u.T @ au, au.T)
        return total / len(fits)

    a = torch.linalg.inv(a_inv)  # the damped EK-FAC
    keep_cross = sum(torch.linalg.inv(a + u @ (torch.diag(e + d) - u.T @ a @ u) @ u.T) for u, e in fits) / len(fits)
    mean_curvature = sum(u @ torch.diag(e) @ u.T for u, e in fits) / len(fits)
    rows = {"hybrid": pearson(hybrid(False, a_inv)), "hybrid_span_exact": pearson(hybrid(True, a_inv)),
            "hybrid_rest_exact": pearson(hybrid(False, g_inv)), "hybrid_both_exact": pearson(hybrid(True, g_inv)),
            "hybrid_keep_ekfac_cross_terms": pearson(keep_cross),
            "ekfac": pearson(a_inv), "inverse_of_mean_lowrank": pearson(torch.linalg.inv(mean_curvature + d * eye))}
    log.info("small net, hybrid errors: %s", json.dumps(rows))
    return {"params": len(eye), "n_train": len(small.ty), "n_test": len(small.y), "damping": damping,
            "weight_decay": small.weight_decay, "threads": threads, "fast": fast.describe(),
            "reference": "explicit damped GGN, float64", "pearson": rows}


def with_default_key(section: dict) -> dict:
    """Adds ``pearson_default_vs_exact_small``: the row of the default settings (``{}``), at the default damping."""
    for row in section["rows"]:
        if set(row) <= {k for k in row if k.startswith("pearson")}:  # no overrides: the defaults
            section["pearson_default_vs_exact_small"] = row[f"pearson_at_{FastSettings().damping}"]
            section["default_settings"] = FastSolver(FastSettings()).describe()
    return section


def lds_setup(rank: int = 500) -> SimpleNamespace:
    """What both design sweeps score against: the checkpoint, the LDS arrays of ``results/lds.npz``, the 10
    stability test images, the cache folder (keyed by checkpoint, data, test images, subsets and ``rank``),
    the LDS test images' gradients and the subsets' summed training gradients ``G_S`` (cached there)."""
    data = load_cifar10(root=str(ROOT / "data"))
    model, meta = load_checkpoint(ROOT / "data/cifar_net.pt")
    model.eval()
    arrays = np.load(ROOT / "results/lds.npz")
    test_idx, margins, subsets = arrays["test_indices"], arrays["margins"].astype(np.float64), arrays["subsets"]
    masks = subset_masks(len(data.train), LDSConfig())[subsets]
    stable_pos = torch.randperm(len(test_idx), generator=torch.Generator().manual_seed(9))[:N_STABLE].sort().values
    key = settings_key({"ck": file_sha256(ROOT / "data/cifar_net.pt"), "data": data.source, "test": test_idx.tolist(),
                        "subsets": subsets.tolist(), "rank": rank})
    cache = CACHE / key
    cache.mkdir(parents=True, exist_ok=True)
    x, y = data.test.tensors(torch.as_tensor(test_idx))
    g_lds = grad_z(model, x, y)  # (T, P)
    gs_path = cache / "subset_gradient_sums.pt"
    if gs_path.exists():
        gs = torch.load(gs_path, weights_only=True)
    else:
        gs, _ = _train_pass(model, data.train, masks, None, "subset gradient sums")
        atomic_torch_save(gs, gs_path)
    return SimpleNamespace(data=data, model=model, wd=float(meta["recipe"]["weight_decay"]), test_idx=test_idx,
                           margins=margins, subsets=subsets, masks=masks, stable_pos=stable_pos, cache=cache,
                           g_lds=g_lds, g_stable=g_lds[stable_pos], gs=gs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[500, 1000], help="n_samples values")
    ap.add_argument("--fits", type=int, nargs="+", default=[8, 4], help="largest n_fits per n_samples value")
    ap.add_argument("--rank", type=int, default=500)
    ap.add_argument("--eigh-iters", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--section", default="cnn_sweep", help="the JSON section written (e.g. cnn_sweep_exact_eigh)")
    ap.add_argument("--small", default=None, help="only the small net: a JSON list of FastSettings overrides")
    ap.add_argument("--small-errors", action="store_true", help="only the small net: where the hybrid's error comes from")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.small_errors:
        out = Path(args.out)
        doc = json.loads(out.read_text()) if out.exists() else {}
        doc["small_net_hybrid_errors"] = {"command": f"python bench/fast_design_cnn.py --small-errors --threads {args.threads}",
                                          **small_net_hybrid_errors(threads=args.threads)}
        write_json_atomic(doc, out)
        return
    if args.small is not None:
        out = Path(args.out)
        doc = json.loads(out.read_text()) if out.exists() else {}
        section = "small_net_pearson" if args.section == "cnn_sweep" else args.section  # --section: another one
        doc[section] = with_default_key({"command": "python bench/fast_design_cnn.py --small '<settings>'",
                                                     **small_net_pearson(json.loads(args.small), args.threads)})
        write_json_atomic(doc, out)
        return
    lds = lds_setup(args.rank)
    data, model, wd, test_idx, margins, subsets, masks = (lds.data, lds.model, lds.wd, lds.test_idx, lds.margins,
                                                          lds.subsets, lds.masks)
    stable_pos, cache, g_lds, g_stable, gs = lds.stable_pos, lds.cache, lds.g_lds, lds.g_stable, lds.gs
    base_pred = (g_lds.double() @ gs.T).numpy()  # (T, S): g_t . G_S
    configs, fit_seconds = [], {}
    for m, max_fits in zip(args.m, args.fits, strict=True):
        solvers = {s: _Fits(FastSettings(n_samples=m, n_fits=max_fits, seed=s, rank=args.rank, eigh_iters=args.eigh_iters,
                                         rest="damping")
                            ).fit(model, data.train, weight_decay=wd) for s in SEEDS}
        fits = {s: [] for s in SEEDS}
        for f in range(max_fits):
            for s in SEEDS:
                log.info("fit m=%d seed=%d f=%d (peak RSS %.0f MB)", m, s, f, _peak_mb())
                fits[s].append(fit_products(solvers[s], m, s, f, g_lds, g_stable, gs, cache))
        fit_seconds[str(m)] = float(np.mean([float(b["seconds"]) for s in SEEDS for b in fits[s]]))
        for n_fits in sorted({1, 4, 8, 16, 32, 64} & set(range(1, max_fits + 1))):
            for d in DAMPINGS:
                configs.append({"n_samples": m, "n_fits": n_fits, "damping": d, "fits": {s: fits[s][:n_fits] for s in SEEDS}})
    # s_test of the stability images for every configuration and seed, then one scoring pass
    rows, where = [g_stable], {}
    for c in configs:
        total = wd + c["damping"]
        for s in SEEDS:
            where[(id(c), s)] = len(rows)
            rows.append(g_stable / total + sum(b["corr"][str(c["damping"])] for b in c["fits"][s]) / c["n_fits"])
    scores_path = cache / f"stability_scores-{settings_key([(c['n_samples'], c['n_fits'], c['damping']) for c in configs] + [args.eigh_iters])}.pt"
    if scores_path.exists():
        scores = torch.load(scores_path, weights_only=True)
    else:
        _, scores = _train_pass(model, data.train, masks[:1], torch.cat(rows), "stability scores")
        atomic_torch_save(scores, scores_path)
    k = N_STABLE
    block = lambda i: scores[i * k : (i + 1) * k]  # noqa: E731
    results = []
    grad_dot = block(0)
    for c in configs:
        total = wd + c["damping"]
        row = {"n_samples": c["n_samples"], "n_fits": c["n_fits"], "damping": c["damping"], "rank": args.rank,
               "eigh_iters": args.eigh_iters}
        row.update(stability(block(where[(id(c), 0)]), block(where[(id(c), 1)])))
        for s in SEEDS:
            pred = base_pred / total + sum(((b["a_lds"] * (1 / (b["evals"] + total) - 1 / total)) @ b["b"]).numpy()
                                           for b in c["fits"][s]) / c["n_fits"]
            row.update({f"{k_}_seed{s}": v for k_, v in lds_of(pred, margins).items()})
        row["lds_margin_mean_of_seeds"] = float(np.mean([row[f"lds_margin_seed{s}"] for s in SEEDS]))
        sp = stability(block(where[(id(c), 0)]), grad_dot)["seed_spearman"]
        row["spearman_vs_grad_dot"] = sp
        row["fit_s"] = fit_seconds[str(c["n_samples"])] * c["n_fits"]
        row["basis_mb"] = 62006 * args.rank * c["n_fits"] * 4 / 2**20
        row["gram_mb"] = (c["n_samples"] * 10) ** 2 * 8 / 2**20
        results.append(row)
        log.info("%s", json.dumps({k_: row[k_] for k_ in ("n_samples", "n_fits", "damping", "seed_spearman",
                                                            "seed_top10_overlap", "lds_margin_seed0")}))
    gd = {"lds_margin": lds_of(base_pred, margins)["lds_margin"]}
    # LDS only (no stability: it would need the bases again): an isotropic model of the rest of the
    # spectrum, ``c`` on the directions outside each fit's span instead of 0, i.e. 1/(d + c) there
    rest = []
    for c in configs:
        if c["n_samples"] != args.m[0] or c["n_fits"] not in (1, max(args.fits)) or c["damping"] not in (0.01, 0.1):
            continue
        total = wd + c["damping"]
        for level in (0.01, 0.03, 0.1, 0.3, 1.0):
            outside = total + level
            pred = base_pred / outside + sum(((b["a_lds"] * (1 / (b["evals"] + total) - 1 / outside)) @ b["b"]).numpy()
                                             for b in c["fits"][0]) / c["n_fits"]
            rest.append({"n_samples": c["n_samples"], "n_fits": c["n_fits"], "damping": c["damping"], "rest_level": level,
                         **{f"{k_}_seed0": v for k_, v in lds_of(pred, margins).items()}})
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc[args.section] = {
        "command": "python bench/fast_design_cnn.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "data_source": data.source, "n_train": len(data.train), "weight_decay": wd,
        "checkpoint_sha256": file_sha256(ROOT / "data/cifar_net.pt")[:16],
        "stability_test_positions": stable_pos.tolist(), "n_lds_test": len(test_idx), "n_subsets": len(subsets),
        "grad_dot_lds_margin": gd["lds_margin"], "fit_s_per_fit": fit_seconds, "peak_rss_mb": _peak_mb(),
        "threads": args.threads,
        "notes": "seed stability: fits seeded 0 vs 1, scores over all training images of 10 seeded LDS test images; "
                 "LDS: margin, 500 LDS test images, 50 retrained halves (results/lds.npz), 95% bootstrap CI; "
                 "fit_s: seconds per fit x n_fits, one thread under load (not a benchmark); basis_mb: P x rank x n_fits float32; "
                 "peak_rss_mb: this invocation's (the first run, which computed the fits, peaked at 4.2 GB with 1,000-image fits).",
        "rows": results,
        "isotropic_rest_lds": rest,
    }
    write_json_atomic(doc, out)


if __name__ == "__main__":
    main()
