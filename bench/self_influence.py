"""Self-influence with the default fast solver: the kernel route against the gradient route, one idle run.

Self-influence (``scores.self_influence``, the mislabel finder) needs each training gradient's
products with the fast solver's bases (16 fits x 500 columns at the defaults) and, with the hybrid
default (``rest="ekfac"``), one EK-FAC solve and the products of the solved gradients with the bases
(:meth:`FastSolver.quadratic_form_with_products`). The gradient route forms every per-example
gradient (62,006 numbers) and multiplies it, and its EK-FAC solve, by the (P, 8,000) bases; the
kernel route (``FastSolver.basis_products``) takes the first of the two products without the
Linear-weight rows, through each fit's factor rows. Both run on the same fitted solver, on the same
``--n-train`` training images, alternately, ``--repeats`` times each, in one child process with a
fixed thread count; the script first waits for an idle machine (``bench/hygiene.py``) and records
the load. It prints and writes (``bench/results/self_influence.json``) the medians, min and max,
the ratio of the medians, the largest relative difference between the routes' values, and the
kernel route's seconds for all 50,000 images (one timed pass).

    python bench/self_influence.py --threads 2        # about 15 min at 2 threads on the idle machine
    python bench/self_influence.py --out /tmp/si1.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import hygiene  # noqa: E402

RESULT = ROOT / "bench" / "results" / "self_influence.json"


def child(args) -> None:
    """Fit the default fast solver, then time both routes alternately on the first ``n_train`` images."""
    import torch

    from influence_over_inference.engine.scores import self_influence
    from influence_over_inference.engine.solvers.registry import make_solver
    from influence_over_inference.study.checkpoints import load_checkpoint
    from influence_over_inference.study.data import load_cifar10

    torch.set_num_threads(args.threads)
    data = load_cifar10(root=str(ROOT / "data"))
    model, meta = load_checkpoint(ROOT / args.checkpoint)
    wd = float(meta.get("recipe", {}).get("weight_decay", 0.0))
    t0 = time.perf_counter()
    solver = make_solver("fast").fit(model, data.train, weight_decay=wd)
    fit_s = time.perf_counter() - t0
    sub = data.train.tensors(torch.arange(args.n_train))
    factors = solver.factors
    times = {"kernel": [], "gradient": []}
    values = {}
    for _ in range(args.repeats):
        for route in ("kernel", "gradient"):
            solver.factors = factors if route == "kernel" else None  # None: the gradient route (grad_z @ basis)
            t = time.perf_counter()
            values[route] = self_influence(model, sub, solver)
            times[route].append(time.perf_counter() - t)
    solver.factors = factors
    t = time.perf_counter()
    self_influence(model, data.train, solver)
    full_s = time.perf_counter() - t
    diff = float((values["kernel"] - values["gradient"]).abs().max() / values["gradient"].abs().max())
    out = {"threads": args.threads, "n_train_timed": args.n_train, "repeats": args.repeats, "fit_s": fit_s,
           "kernel_s": hygiene.summarize(times["kernel"]), "gradient_s": hygiene.summarize(times["gradient"]),
           "max_rel_diff": diff, "kernel_all_train_s": full_s, "n_train_all": len(data.train),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "solver": solver.describe(), "data_source": data.source}
    Path(args.out).write_text(json.dumps(out, indent=1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-train", type=int, default=2000, help="training images both routes are timed on")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkpoint", default="data/cifar_net.pt")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    load = hygiene.wait_until_idle(hygiene.IdleWait(), report=lambda m: print(m, flush=True))
    tmp = ROOT / "data" / "bench" / f"self_influence-{args.threads}.json"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    res = hygiene.run_child([str(Path(__file__).resolve()), "--child", "--n-train", str(args.n_train), "--repeats",
                             str(args.repeats), "--checkpoint", args.checkpoint], args.threads, tmp)
    res["ratio_gradient_over_kernel"] = res["gradient_s"]["median"] / res["kernel_s"]["median"]
    res.update(load)
    res["command"] = "python bench/self_influence.py" + (f" --threads {args.threads}" if args.threads != 1 else "")
    print(json.dumps({k: res[k] for k in ("ratio_gradient_over_kernel", "kernel_all_train_s", "max_rel_diff",
                                          "load_avg_at_start")}))
    out = Path(args.out) if args.out else RESULT
    out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
