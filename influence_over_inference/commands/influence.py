"""``python -m influence_over_inference influence``: the top-k helpful and harmful training images."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..engine.influence_engine import InfluenceEngine
from ..engine.params import pick_images
from ..engine.scores import top_k


def register(subparsers) -> None:
    """``python -m influence_over_inference influence``: top-k helpful/harmful training images."""
    from dataclasses import fields

    from ..engine.solvers.registry import SOLVERS

    p = subparsers.add_parser("influence", help="score every training image for some test images; print the top-k helpful and harmful")
    p.add_argument("--test-index", type=int, nargs="+", default=[0], help="test-set indices to explain (default: 0)")
    p.add_argument("--k", type=int, default=10, help="how many helpful and harmful training images to list (default: 10)")
    p.add_argument("--solver", default="fast", choices=sorted(SOLVERS), help="inverse-HVP solver (default: fast)")
    p.add_argument("--checkpoint", default="data/cifar_net.pt", help="trained model (default: data/cifar_net.pt)")
    p.add_argument("--data", default="auto", help="CIFAR-10 source, as for `train` (default: auto)")
    p.add_argument("--data-root", default="data", help="where torchvision data and caches live (default: data)")
    p.add_argument("--n-train", type=int, default=None, help="score only the first N training images (default: all)")
    p.add_argument("--cache-dir", default="data/influence", help="cache of fitted curvature and scores (default: data/influence)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--out", default="data/influence/report", help="writes <out>.json (top-k) and <out>.npz (all scores) (default: data/influence/report; the notebook owns results/influence.json)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    seen = set()
    for cls in SOLVERS.values():
        defaults = cls.settings_class()
        for f in fields(cls.settings_class):
            if f.name in seen:
                continue
            seen.add(f.name)
            kind = {"int": int, "float": float, "str": str, "int | None": int}.get(str(f.type), str)
            p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                           help=f"solver setting (default: the solver's own, e.g. {cls.name}: {getattr(defaults, f.name)})")
    p.set_defaults(func=cmd_influence)


def cmd_influence(args) -> int:
    import numpy as np

    from ..engine.solvers.registry import SOLVERS, make_solver
    from ..study.checkpoints import load_checkpoint
    from ..study.data import CLASSES, load_cifar10

    if args.threads:
        torch.set_num_threads(args.threads)
    cls = SOLVERS[args.solver]
    from dataclasses import fields

    settings = {f.name: getattr(args, f.name) for f in fields(cls.settings_class) if getattr(args, f.name, None) is not None}
    solver = make_solver(args.solver, **settings)
    data = load_cifar10(args.data, root=args.data_root)
    model, meta = load_checkpoint(args.checkpoint)
    weight_decay = float(meta.get("recipe", {}).get("weight_decay", 0.0))
    train = data.train.subset(args.n_train)
    x, y = pick_images(data.test, args.test_index)
    if args.k > len(train):
        raise ValueError(f"--k {args.k} is larger than the number of training images ({len(train)})")
    engine = InfluenceEngine(model, train, solver, weight_decay=weight_decay, cache_dir=None if args.no_cache else args.cache_dir,
                             checkpoint=args.checkpoint, data_source=data.source, progress=True)
    import time

    start = time.perf_counter()
    scores = engine.scores(x, y)  # (K, n_train)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        pred = model(x).argmax(1)
    best = top_k(scores, args.k)
    report = {"checkpoint": args.checkpoint, "data_source": data.source, "n_train": len(train), "weight_decay": weight_decay,
              "solver": solver.describe(), "seconds": seconds,
              "sign": "score = predicted rise of the test loss if the training image were removed; positive = helpful",
              "tests": []}
    for row, t in enumerate(args.test_index):
        entry = {"test_index": t, "test_name": data.test.names[t], "label": CLASSES[int(y[row])], "predicted": CLASSES[int(pred[row])]}
        for kind, idx, val in (("helpful", best.helpful, best.helpful_scores), ("harmful", best.harmful, best.harmful_scores)):
            entry[kind] = [{"index": int(i), "class": CLASSES[int(train.labels[i])], "name": train.names[int(i)], "score": float(s)}
                           for i, s in zip(idx[row], val[row], strict=True)]
        report["tests"].append(entry)
        print(f"\ntest image {t} ({entry['test_name']}): label {entry['label']}, predicted {entry['predicted']}")  # noqa: T201 (CLI output)
        for kind in ("helpful", "harmful"):
            print(f"  most {kind}:")  # noqa: T201
            print(f"    {'rank':>4} {'index':>6} {'class':<11} {'score':>11}  file")  # noqa: T201
            for r, e in enumerate(entry[kind], 1):
                print(f"    {r:>4} {e['index']:>6} {e['class']:<11} {e['score']:>11.3e}  {e['name']}")  # noqa: T201
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".json.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out.with_suffix(".json"))
    tmp_npz = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(tmp_npz, scores=scores.float().numpy(), test_index=np.asarray(args.test_index), labels=y.numpy())
    os.replace(tmp_npz, out.with_suffix(".npz"))
    print(f"\nscores of {len(args.test_index)} test x {len(train)} training images in {seconds:.1f} s "  # noqa: T201
          f"({solver.name}); wrote {out.with_suffix('.json')} and {out.with_suffix('.npz')}")
    return 0
