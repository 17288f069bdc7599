"""Benchmark: our influence engine against nimarb's package and kronfluence, on the real model.

The real model is ``data/cifar_net.pt`` (the nimarb LeNet, 62,006 parameters) and the data the
real CIFAR-10 (here the offline JPEG copy; ``data_source`` records which). Issue 6, item 7.

    python bench/engine.py            # the full benchmark -> bench/results/engine.json
    python bench/engine.py --quick    # a smoke run on small numbers -> data/bench/quick/engine.json
    python bench/engine.py --fresh    # ignore cached stage results

Each measurement ("stage", one module each in ``bench/engine_stages/``) runs in its own Python process, so its wall time and its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) are its own; its result is cached under
``data/bench/<key>/<stage>.json`` (+ ``.pt`` for score matrices), keyed by the checkpoint's
hash, the data source and the settings, so a rerun after an interruption resumes where it stopped.

What is measured (all wall seconds on this machine, with its load average recorded):

- ``epoch``: one training epoch of our TrainConfig recipe on the same data, same run.
- ``nimarb_same`` / ``ours_same``: ONE test image with the same LiSSA settings (Hessian, batch,
  scale, damp, depth, r = 1) and all training images. nimarb's ``s_test`` and our LiSSA run
  ``timing_depth`` recursion steps and are extrapolated linearly to ``depth`` (each step costs
  the same; nimarb's output does not even depend on the depth); nimarb's per-training-image
  scoring is timed on ``nimarb_train_measured`` images and extrapolated to all; ours scores all.
- ``nimarb_own``: nimarb at its own settings (damp 0.01, scale 25, depth 5000, batch 4) for the
  agreement test images: its ``s_test`` timed over ``timing_depth`` steps (extrapolated), its
  scores over all training images computed with our streamed gradients from its s_test vector
  (the same numbers as its one-image loop; checked on a prefix, ``nimarb_loop_rel_diff``).
  ``nimarb_t100_s`` = n_test x (s_test at depth 5000 + n_train x its per-image cost).
- ``fast``: ours, fast solver, all n_test x n_train scores, fit included.
- ``cg``: CG (the reference) on the ``n_agree`` agreement test images; ``t100_cg_s``
  extrapolated linearly to n_test.
- ``lissa``: our LiSSA on the agreement test images (curvature and depth as configured).
- ``kronfluence``: kronfluence 1.0.1 EK-FAC, factors on all training images + pairwise scores.
- ``small``: a trained 3,702-parameter conv net of the same shape on a CIFAR subset, exact
  influence from the explicit damped GGN / Hessian; Pearson of fast and kronfluence vs exact.
Agreement (Spearman over all training images, top-10 overlap) is computed from the cached
score matrices at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the package, without installing it

from engine_stages import cg, epoch, fast, kronfluence, lissa, nimarb, score, small
from engine_stages.assemble import assemble, print_table
from engine_stages.common import ROOT, _cache_dir, _load, _peak_rss_mb, _write_json
from engine_stages.config import AGREE_STAGES, STAGES, BenchConfig

log = logging.getLogger("bench")

STAGE_FUNCTIONS = {
    "epoch": epoch.stage_epoch,
    "nimarb_same": nimarb.stage_nimarb_same,
    "ours_same": nimarb.stage_ours_same,
    "nimarb_own": nimarb.stage_nimarb_own,
    "fast": fast.stage_fast,
    "cg": cg.stage_cg,
    "lissa": lissa.stage_lissa,
    "score": score.stage_score,
    "kronfluence": kronfluence.stage_kronfluence,
    "small": small.stage_small,
}

def run_stage(name: str, quick: bool) -> None:
    """The child process: compute one stage and write its JSON (with this process's peak RSS)."""
    torch.manual_seed(0)
    cfg = BenchConfig.quick() if quick else BenchConfig()
    torch.set_num_threads(cfg.threads)
    out = _cache_dir(cfg, quick)
    data, model, wd, train = _load(cfg)
    start = time.perf_counter()
    result = STAGE_FUNCTIONS[name](cfg, data, model, wd, train, out)
    result.update({"stage_wall_s": time.perf_counter() - start, "peak_rss_mb": _peak_rss_mb(),
                   "load_avg": os.getloadavg(), "threads": torch.get_num_threads(),
                   "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    _write_json(result, out / f"{name}.json")


def _spawn(name: str, quick: bool, out: Path, threads: int) -> dict:
    path = out / f"{name}.json"
    if path.exists():
        print(f"  {name:12s} cached ({path.relative_to(ROOT)})", flush=True)
        return json.loads(path.read_text())
    print(f"  {name:12s} running ...", flush=True)
    t0 = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name] + (["--quick"] if quick else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode != 0 or not path.exists():
        print(f"  {name:12s} FAILED (exit {proc.returncode}); see the output above", flush=True)
        return {"failed": True}
    print(f"  {name:12s} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(path.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run on small numbers (a few minutes)")
    parser.add_argument("--fresh", action="store_true", help="recompute every stage (ignore the cache)")
    parser.add_argument("--only", nargs="+", choices=STAGES, help="run only these stages (others from cache)")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: one stage, in-process
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.stage:
        run_stage(args.stage, args.quick)
        return 0
    cfg = BenchConfig.quick() if args.quick else BenchConfig()
    out = _cache_dir(cfg, args.quick)
    print(f"benchmark ({'quick' if args.quick else 'full'}); cache {out.relative_to(ROOT)}", flush=True)
    stages = {}
    for name in STAGES:
        path = out / f"{name}.json"
        rerun = args.only and (name in args.only or (name == "score" and set(args.only) & set(AGREE_STAGES)))
        if args.fresh or rerun:
            path.unlink(missing_ok=True)
        if args.only and name not in args.only and not path.exists():
            continue
        stages[name] = _spawn(name, args.quick, out, cfg.threads)
    res = assemble(cfg, args.quick, out, stages)
    target = out / "engine.json" if args.quick else ROOT / "bench" / "results" / "engine.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_json(res, target)
    print()
    print_table(res)
    print(f"\nwrote {target.relative_to(ROOT)}")
    return 1 if res["failed_stages"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
