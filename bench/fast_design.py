"""How the fast solver was chosen: Pearson/Spearman of candidate designs against exact influence.

A LeNet-shaped CNN small enough to build its GGN (Net(channels=(4, 4), hidden=(24, 16)), 3,702
parameters) is trained on the first 2,000 CIFAR-10 training images with the project's recipe;
the exact reference is ``(1/n) g_test^T (GGN + wd I + lambda I)^{-1} g_train`` with the explicit
GGN over all 2,000 images, in float64. Candidates (all from ``n_samples`` seeded training images):

- ``lowrank``: top-``rank`` GGN eigenpairs, ``1/(wd + lambda)`` on the rest (the FastSolver);
- ``lowrank+diag``: the same plus the rest's diagonal (Woodbury);
- ``grad_dot``: no curvature (reference point).

Usage: ``python bench/fast_design.py [--n-test 20] [--out bench/results/fast_design.json]``

The real CNN's sweep (n_fits, damping, n_samples: seed stability and LDS; issue 9) is
``bench/fast_design_cnn.py``; it writes the ``cnn_sweep`` and ``small_net_pearson`` sections of the
same JSON, which this script keeps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from influence_over_inference.engine.curvature import ggn_factor
from influence_over_inference.engine.gradients import grad_z
from influence_over_inference.study.data import load_cifar10
from influence_over_inference.study.model import Net
from influence_over_inference.study.training import TrainConfig, train

OTHER_SECTIONS = ("cnn_sweep", "small_net_pearson")  # written by bench/fast_design_cnn.py


def pearson_rows(a, b):
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def spearman_rows(a, b):
    ra = a.argsort(1).argsort(1).double()
    rb = b.argsort(1).argsort(1).double()
    return pearson_rows(ra, rb)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "bench/results/fast_design.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = load_cifar10(root=str(ROOT / "data"))
    torch.manual_seed(0)
    tiny = Net(channels=(4, 4), hidden=(24, 16))
    cfg = TrainConfig(epochs=args.epochs, n_train=args.n_train, device="cpu", seed=0)
    tiny = train(data.train, cfg, model=tiny, progress=False).model.eval().double()
    wd = cfg.weight_decay
    tx, ty = data.train.subset(args.n_train).tensors()
    x, y = data.test.tensors(torch.arange(args.n_test))
    tx, x = tx.double(), x.double()
    n = len(ty)
    rows = torch.cat([ggn_factor(tiny, tx[s : s + 200]) for s in range(0, n, 200)]) / n**0.5  # (n*C, P)
    ggn = rows.T @ rows
    evals_all = torch.linalg.eigvalsh(ggn)
    g_test, g_train = grad_z(tiny, x, y), grad_z(tiny, tx, ty)
    eye = torch.eye(len(ggn), dtype=ggn.dtype)
    results = {"params": len(ggn), "n_train": n, "n_test": len(y), "weight_decay": wd,
               "ggn_top_eigenvalues": evals_all.flip(0)[:10].tolist(), "ggn_mean_eigenvalue": float(evals_all.mean()),
               "rows": []}
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(n, generator=gen)
    for lam in (0.01, 0.001, 0.1, 0.5):  # the headline first
        d = wd + lam
        exact = torch.linalg.solve(ggn + d * eye, g_test.T).T @ g_train.T / n
        base = {"damping": lam}

        def record(design, scores, base=base, exact=exact, **kw):
            r = {**base, "design": design, **kw, "pearson": float(pearson_rows(scores, exact).mean()),
                 "pearson_min": float(pearson_rows(scores, exact).min()), "spearman": float(spearman_rows(scores, exact).mean())}
            results["rows"].append(r)
            print(json.dumps(r))

        record("grad_dot", g_test @ g_train.T / n)
        for m in (100, 250, 500):
            idx = perm[:m].sort().values
            r_m = torch.cat([ggn_factor(tiny, tx[idx[s : s + 200]]) for s in range(0, m, 200)]) / m**0.5
            t0 = time.perf_counter()
            gram = r_m @ r_m.T
            e, w = torch.linalg.eigh(gram)
            e, w = e.flip(0).clamp_min(0), w.flip(1)
            fit_s = time.perf_counter() - t0
            diag_full = (r_m * r_m).sum(0)  # diag of subsample GGN
            for rank in (20, 50, 100, 200, 500):
                if rank > len(e):
                    continue
                ek, wk = e[:rank], w[:, :rank]
                keep = ek > ek[0] * 1e-12
                ek, wk = ek[keep], wk[:, keep]
                u = (r_m.T @ wk) / ek.sqrt()  # (P, r)
                coef = g_test @ u
                s = (g_test - coef @ u.T) / d + (coef / (ek + d)) @ u.T
                record("lowrank", s @ g_train.T / n, n_samples=m, rank=rank, fit_s=fit_s)
                rest = (diag_full - (u * u * ek).sum(1)).clamp_min(0)
                a_inv = 1 / (rest + d)  # (P,)
                inner = torch.diag(1 / ek) + (u * a_inv[:, None]).T @ u
                av = g_test * a_inv
                s2 = av - (torch.linalg.solve(inner, (av @ u).T).T @ u.T) * a_inv
                record("lowrank+diag", s2 @ g_train.T / n, n_samples=m, rank=rank)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = {k: v for k, v in json.loads(out.read_text()).items() if k in OTHER_SECTIONS} if out.exists() else {}
    out.write_text(json.dumps({**results, **kept}, indent=1))  # the real-CNN sections of fast_design_cnn.py stay


if __name__ == "__main__":
    main()
