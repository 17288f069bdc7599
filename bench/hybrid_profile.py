"""Where the default hybrid's time goes on the real CNN: the 16 fits, the EK-FAC fit, the compression, s_test.

A breakdown to read beside ``bench/trust.py`` (which times the whole task against an epoch and
kronfluence): one process, one thread, after waiting for an idle machine; per repeat

- ``ekfac_fit_s``: ``make_solver("ekfac")`` fitted alone (the hybrid's rest: the same settings);
- ``hybrid_fit_s``: ``make_solver("fast")`` (the default), and ``fits_s`` = hybrid fit - EK-FAC fit;
- ``first_s_test_s``: s_test of 100 test images on the fresh hybrid, which includes compressing
  EK-FAC to each fit's span (``U^T A^{-1} U``, computed once per damping and kept);
- ``s_test_s``: the same call again (the compression kept), and ``compression_s`` = first - again.

Medians, min and max over ``--repeats`` go to ``bench/results/hybrid_profile.json``.

    python bench/hybrid_profile.py [--repeats 3] [--threads 1]
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
sys.path.insert(0, str(ROOT / "bench"))

import hygiene  # noqa: E402

from influence_over_inference.engine.hashing import file_sha256  # noqa: E402
from influence_over_inference.engine.io import write_json_atomic  # noqa: E402
from influence_over_inference.engine.scores import s_test  # noqa: E402
from influence_over_inference.engine.solvers.registry import make_solver  # noqa: E402
from influence_over_inference.study.checkpoints import load_checkpoint  # noqa: E402
from influence_over_inference.study.data import load_cifar10  # noqa: E402


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "bench/results/hybrid_profile.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    idle = hygiene.wait_until_idle(hygiene.IdleWait(), report=print)
    data = load_cifar10(root=str(ROOT / "data"))
    model, meta = load_checkpoint(ROOT / "data/cifar_net.pt")
    model.eval()
    wd = float(meta["recipe"]["weight_decay"])
    x, y = data.test.tensors(torch.arange(args.n_test))
    runs = []
    for r in range(args.repeats):
        _, ekfac_s = _timed(lambda: make_solver("ekfac").fit(model, data.train, weight_decay=wd))
        hybrid, hybrid_s = _timed(lambda: make_solver("fast").fit(model, data.train, weight_decay=wd))
        _, first_s = _timed(lambda h=hybrid: s_test(model, x, y, h))
        _, again_s = _timed(lambda h=hybrid: s_test(model, x, y, h))
        runs.append({"ekfac_fit_s": ekfac_s, "hybrid_fit_s": hybrid_s, "fits_s": hybrid_s - ekfac_s,
                     "first_s_test_s": first_s, "s_test_s": again_s, "compression_s": first_s - again_s})
        print(f"repeat {r + 1}/{args.repeats}: {json.dumps({k: round(v, 1) for k, v in runs[-1].items()})}", flush=True)
    out = {"command": f"python bench/hybrid_profile.py --repeats {args.repeats} --threads {args.threads}",
           "threads": args.threads, "n_test": args.n_test, "n_train": len(data.train), "data_source": data.source,
           "checkpoint_sha256": file_sha256(ROOT / "data/cifar_net.pt")[:16],
           "solver": make_solver("fast").describe(), **idle,
           "timings": {k: hygiene.summarize([run[k] for run in runs]) for k in runs[0]}}
    write_json_atomic(out, Path(args.out))
    print(json.dumps({k: round(v["median"], 1) for k, v in out["timings"].items()}))


if __name__ == "__main__":
    main()
