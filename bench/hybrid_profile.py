"""Where the default hybrid's time goes on the real CNN: the 16 fits, the EK-FAC fit, the compression, s_test.

A breakdown to read beside ``bench/trust.py`` (which times the whole task against an epoch and
kronfluence): one process, one thread, after waiting for an idle machine; per repeat

- ``ekfac_fit_s``: ``make_solver("ekfac")`` fitted alone (the hybrid's rest: the same settings);
- ``hybrid_fit_s``: ``make_solver("fast")`` (the default), and ``fits_s`` = hybrid fit - EK-FAC fit;
- ``first_s_test_s``: s_test of 100 test images on the fresh hybrid, which includes compressing
  EK-FAC to each fit's span (``U^T A^{-1} U``, computed once per damping and kept);
- ``s_test_s``: the same call again (the compression kept), and ``compression_s`` = first - again.

Medians, min and max over ``--repeats`` go to ``bench/results/hybrid_profile.json``. With ``--settings``
(a JSON list of FastSettings overrides, ``{}`` the default) each repeat times every setting in turn, so
their ratios are taken within one run; the results go to ``--out`` under ``profiles``.

    python bench/hybrid_profile.py [--repeats 3] [--threads 1]
    python bench/hybrid_profile.py --settings '[{}, {"n_fits": 64, "span_images": 1000}]' --out bench/results/hybrid_profile_spans.json
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


def _shown(path: Path) -> str:
    """``path`` as the command line gave it relative to the repository (no machine's path in a results file)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--settings", default=None, help="JSON list of FastSettings overrides, each timed in every repeat")
    ap.add_argument("--out", default=str(ROOT / "bench/results/hybrid_profile.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    idle = hygiene.wait_until_idle(hygiene.IdleWait(), report=print)
    data = load_cifar10(root=str(ROOT / "data"))
    model, meta = load_checkpoint(ROOT / "data/cifar_net.pt")
    model.eval()
    wd = float(meta["recipe"]["weight_decay"])
    x, y = data.test.tensors(torch.arange(args.n_test))
    settings = json.loads(args.settings) if args.settings else None
    runs = [(over, []) for over in settings or [{}]]
    for r in range(args.repeats):
        _, ekfac_s = _timed(lambda: make_solver("ekfac").fit(model, data.train, weight_decay=wd))
        for over, rows in runs:
            hybrid, hybrid_s = _timed(lambda o=over: make_solver("fast", **o).fit(model, data.train, weight_decay=wd))
            _, first_s = _timed(lambda h=hybrid: s_test(model, x, y, h))
            _, again_s = _timed(lambda h=hybrid: s_test(model, x, y, h))
            rows.append({"ekfac_fit_s": ekfac_s, "hybrid_fit_s": hybrid_s, "fits_s": hybrid_s - ekfac_s,
                         "first_s_test_s": first_s, "s_test_s": again_s, "compression_s": first_s - again_s,
                         "total_s": hybrid_s + first_s})
            del hybrid
            print(f"repeat {r + 1}/{args.repeats} {json.dumps(over)}: {json.dumps({k: round(v, 1) for k, v in rows[-1].items()})}", flush=True)
    common = {"threads": args.threads, "n_test": args.n_test, "n_train": len(data.train), "data_source": data.source,
              "checkpoint_sha256": file_sha256(ROOT / "data/cifar_net.pt")[:16], **idle}
    profiles = [{"solver": make_solver("fast", **over).describe(),
                 "timings": {k: hygiene.summarize([run[k] for run in rows]) for k in rows[0]}} for over, rows in runs]
    if settings is None:  # the default alone: the file's original layout
        out = {"command": f"python bench/hybrid_profile.py --repeats {args.repeats} --threads {args.threads}", **common,
               **profiles[0]}
    else:
        out = {"command": f"python bench/hybrid_profile.py --repeats {args.repeats} --threads {args.threads} --settings "
                          f"'{args.settings}' --out {_shown(Path(args.out))}",
               **common, "profiles": profiles,
               "total_ratio_to_first": [p["timings"]["total_s"]["median"] / profiles[0]["timings"]["total_s"]["median"]
                                        for p in profiles]}
    write_json_atomic(out, Path(args.out))
    for p in profiles:
        print(json.dumps(p["solver"]), json.dumps({k: round(v["median"], 1) for k, v in p["timings"].items()}))


if __name__ == "__main__":
    main()
