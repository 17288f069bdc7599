"""One process with 2 threads against 2 processes (torchrun, gloo) with 1 thread each: the same task.

The task is the engine benchmark's: 100 test images x all 50,000 training images with the
default ``fast`` solver, no cache. Each configuration runs the ``influence`` command ``--repeats``
times, alternating, in the same session; the time is the command's own measurement (curvature fit
and scoring; data loading and process start are in ``wall_*``). ``max_rel_diff`` compares the
two configurations' scores: max over test images of max |a - b| / max |a|.

    python bench/distributed.py                       # the real run: about 10 minutes on the idle 2-core machine
    python bench/distributed.py --n-train 2000 --n-test 3 --repeats 1 --out data/bench/distributed_tiny.json   # a smoke run

Writes bench/results/distributed.json (keys t_1proc_s, t_2proc_s, speedup, max_rel_diff,
max_rel_diff_same_threads, and the per-run times, load averages and settings). One more untimed
run at 1 process x 1 thread separates the effect of sharding from that of the thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def run_once(procs: int, args, out: Path) -> dict:
    """One ``influence`` run: 1 process x 2 threads, or ``procs`` processes x 1 thread under torchrun."""
    common = ["-m", "influence_over_inference", "influence", "--test-index", *map(str, range(args.n_test)),
              "--k", "10", "--no-cache", "--out", str(out), "--checkpoint", args.checkpoint]
    if args.n_train:
        common += ["--n-train", str(args.n_train)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if procs == 1:
        cmd = [sys.executable, *common, "--threads", str(args.threads_1proc)]
        env["OMP_NUM_THREADS"] = str(args.threads_1proc)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *common, "--threads", "1"]
        env["OMP_NUM_THREADS"] = "1"
    load = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    report = json.loads(out.with_suffix(".json").read_text())
    return {"seconds": report["seconds"], "wall_s": wall, "load_before": load}


def max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(max(np.abs(a[i] - b[i]).max() / np.abs(a[i]).max() for i in range(len(a))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-test", type=int, default=100, help="test images (default: 100)")
    p.add_argument("--n-train", type=int, default=None, help="training images (default: all 50,000)")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration; the median is reported (default: 3)")
    p.add_argument("--procs", type=int, default=2, help="processes of the distributed run (default: 2)")
    p.add_argument("--threads-1proc", type=int, default=2, help="threads of the single process (default: 2)")
    p.add_argument("--checkpoint", default="data/cifar_net.pt")
    p.add_argument("--out", default="bench/results/distributed.json")
    args = p.parse_args(argv)
    work = ROOT / "data" / "bench" / "distributed"
    work.mkdir(parents=True, exist_ok=True)
    runs = {1: [], args.procs: []}
    for _ in range(args.repeats):
        for procs in runs:
            runs[procs].append(run_once(procs, args, work / f"p{procs}"))
    one = np.load(work / "p1.npz")["scores"]
    same_threads = None
    if args.threads_1proc != 1:  # the float32 fast fit also moves with the BLAS thread count: separate the two effects
        single = argparse.Namespace(**{**vars(args), "threads_1proc": 1})
        run_once(1, single, work / "p1_1thread")
        same_threads = np.load(work / "p1_1thread.npz")["scores"]
    many = np.load(work / f"p{args.procs}.npz")["scores"]
    t1 = statistics.median(r["seconds"] for r in runs[1])
    tn = statistics.median(r["seconds"] for r in runs[args.procs])
    result = {
        "t_1proc_s": t1, "t_2proc_s": tn, "speedup": t1 / tn, "max_rel_diff": max_rel_diff(one, many),
        "max_rel_diff_same_threads": None if same_threads is None else max_rel_diff(same_threads, many),
        "max_rel_diff_1_vs_2_threads": None if same_threads is None else max_rel_diff(same_threads, one),
        "task": f"{args.n_test} test x {one.shape[1]} training images, fast solver (defaults), no cache",
        "config": {"1proc": f"1 process x {args.threads_1proc} threads", "2proc": f"{args.procs} processes x 1 thread (torchrun, gloo)",
                   "repeats": args.repeats, "cpus": os.cpu_count()},
        "runs_1proc": runs[1], "runs_2proc": runs[args.procs],
        "notes": "t_* = the influence command's own time (curvature fit + scoring), median of repeats, run alternately; "
                 "wall_s adds interpreter start, data loading and process-group setup; load_before = 1-minute load average "
                 "before each run. max_rel_diff = max over test images of max|a-b|/max|a| (float32 scores); "
                 "max_rel_diff_same_threads compares 1 process x 1 thread (one untimed run) with the distributed run, "
                 "max_rel_diff_1_vs_2_threads one process at 1 and at 2 threads.",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("t_1proc_s", "t_2proc_s", "speedup", "max_rel_diff", "max_rel_diff_same_threads")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
