"""The users' task with the fast solver, timed against one training epoch in the same run.

Trains one epoch of the project's recipe (TrainConfig, all 50,000 images) to measure epoch_s,
then scores 100 test images x 50,000 training images with ``make_solver("fast")`` on the real
checkpoint: fit, s_test, streaming scores; prints one JSON line (seconds, epoch-times, peak RSS).
The full benchmark (nimarb, CG, LiSSA, kronfluence) is bench/engine.py.

Usage: ``python bench/fast_t100.py [--threads 1] [--n-test 100] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from influence_over_inference.engine.scores import influence, s_test
from influence_over_inference.engine.solvers.registry import make_solver
from influence_over_inference.study.checkpoints import load_checkpoint
from influence_over_inference.study.data import load_cifar10
from influence_over_inference.study.training import TrainConfig, train


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--checkpoint", default=str(ROOT / "data/cifar_net.pt"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_cifar10(root=str(ROOT / "data"))
    epoch_s = train(data.train, TrainConfig(epochs=1, device="cpu", threads=args.threads), progress=False).seconds_per_epoch
    model, meta = load_checkpoint(args.checkpoint)
    wd = float(meta.get("recipe", {}).get("weight_decay", 0.0))
    x, y = data.test.tensors(torch.arange(args.n_test))
    t0 = time.perf_counter()
    solver = make_solver("fast").fit(model, data.train, weight_decay=wd)
    t_fit = time.perf_counter() - t0
    t1 = time.perf_counter()
    stest = s_test(model, x, y, solver)
    t_stest = time.perf_counter() - t1
    t2 = time.perf_counter()
    scores = influence(model, None, None, data.train, solver, stest=stest)
    t_scores = time.perf_counter() - t2
    total = time.perf_counter() - t0
    out = {"epoch_s": epoch_s, "fit_s": t_fit, "s_test_s": t_stest, "scores_s": t_scores, "t100_fast_s": total,
           "t100_fast_epochs": total / epoch_s, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "threads": args.threads, "n_test": args.n_test, "n_train": scores.shape[1], "solver": solver.describe(),
           "data_source": data.source}
    print(json.dumps(out))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
