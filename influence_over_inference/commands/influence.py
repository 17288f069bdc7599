"""``python -m influence_over_inference influence``: the top-k helpful and harmful training images."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..engine.influence_engine import InfluenceEngine
from ..engine.io import atomic_write, check_writable, check_writable_dir, write_json_atomic
from ..engine.params import pick_images
from ..engine.scores import top_k
from ..study.data import balanced_indices

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    """``python -m influence_over_inference influence``: top-k helpful/harmful training images."""
    from dataclasses import fields

    from ..engine.solvers.registry import SOLVERS

    p = subparsers.add_parser("influence", help="score every training image for some test images; print the top-k helpful and harmful")
    p.add_argument("--test-index", type=int, nargs="+", default=[0], help="test-set indices to explain (default: 0)")
    p.add_argument("--k", type=int, default=10, help="how many helpful and harmful training images to list (default: 10)")
    p.add_argument("--solver", default="fast", choices=sorted(SOLVERS), help="inverse-HVP solver (default: fast)")
    p.add_argument("--checkpoint", default="data/cifar_net.pt",
                   help="trained weights: this project's checkpoint or any state_dict file (default: data/cifar_net.pt)")
    p.add_argument("--model", default=None, metavar="PACKAGE.MODULE:FACTORY",
                   help="your own model: a class or function (importable from the current folder) that builds the "
                        "nn.Module the checkpoint's state_dict fits (default: this project's CIFAR-10 CNN)")
    p.add_argument("--data", default="auto",
                   help="'auto' or 'torchvision' (CIFAR-10, as for `train`), or an image folder laid out as "
                        "DIR/train/<class>/<image> (and optionally DIR/test/<class>/<image>), any class names and "
                        "image size (default: auto)")
    p.add_argument("--transform", default=None, metavar="PACKAGE.MODULE:ATTR",
                   help="for an image folder: the transform (PIL image -> tensor) your model was trained with "
                        "(default: ToTensor, or this project's normalisation for CIFAR-10's class folders)")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="the training L2 coefficient (default: the checkpoint's record; 0 with a warning if none)")
    p.add_argument("--layers", nargs="+", default=None,
                   help="score only these modules' parameters (default: every parameter with requires_grad)")
    p.add_argument("--device", default="cpu", help="'cpu', 'cuda', 'cuda:N' or 'auto' (default: cpu)")
    p.add_argument("--data-root", default="data", help="where torchvision data and caches live (default: data)")
    p.add_argument("--n-train", type=int, default=None,
                   help="score a class-balanced subset of N training images (default: all)")
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


def _load_data(args):
    """CIFAR-10 through the study's loader, or any image folder through the generic one."""
    from ..study.data import load_cifar10
    from ..study.image_folder import is_cifar_folder, load_image_folder
    from ..study.user_model import resolve_factory

    folder = args.data not in ("auto", "torchvision") and Path(args.data).is_dir()
    if folder and (args.transform or not is_cifar_folder(args.data)):
        transform = resolve_factory(args.transform) if args.transform else None
        return load_image_folder(args.data, transform=transform)
    if args.transform:
        raise ValueError("--transform applies to an image folder given with --data DIR")
    return load_cifar10(args.data, root=args.data_root)


def _load_model(args, device):
    from ..study.checkpoints import load_checkpoint
    from ..study.user_model import load_user_model

    if args.model:
        return load_user_model(args.model, args.checkpoint, device)
    return load_checkpoint(args.checkpoint, device)


def _weight_decay(args, meta: dict) -> float:
    if args.weight_decay is not None:
        if args.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {args.weight_decay}")
        return args.weight_decay
    recorded = meta.get("recipe", {}).get("weight_decay", meta.get("weight_decay"))
    if recorded is None:
        log.warning("the checkpoint does not record its training weight decay; using 0 (pass --weight-decay)")
        return 0.0
    return float(recorded)


def _train_subset(train, n: int | None):
    """All training images, or a class-balanced subset of ``n`` for a quick look."""
    if n is None or n >= len(train):
        return train
    return train.select(balanced_indices(train.labels, n))


def _check_args(args) -> None:
    """Everything that can be checked before loading anything: fails in milliseconds, not minutes."""
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    if args.n_train is not None and args.n_train < 1:
        raise ValueError(f"--n-train must be >= 1, got {args.n_train}")
    if any(t < 0 for t in args.test_index):
        raise ValueError(f"--test-index must be >= 0, got {args.test_index}")
    if args.weight_decay is not None and args.weight_decay < 0:
        raise ValueError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"no checkpoint at {args.checkpoint}; train one with `python -m influence_over_inference train`")
    out = Path(args.out)
    check_writable(out.with_suffix(".json"), "--out")
    check_writable(out.with_suffix(".npz"), "--out")
    if not args.no_cache:
        check_writable_dir(args.cache_dir, "--cache-dir")


def cmd_influence(args) -> int:
    """Check the arguments and the solver settings, resolve the device once, then run.

    Under ``torchrun`` (RANK / WORLD_SIZE set) every rank joins the process group (gloo on the
    CPU, nccl with ``--device cuda``: one GPU per rank) only after its arguments have passed, so a
    typo fails in milliseconds on every rank instead of after the group has formed; each rank scores
    its shard and rank 0 prints and writes."""
    from ..engine.distributed import init_from_env, leave
    from ..study.training import resolve_device

    solver = _make_solver(args)  # validates the solver settings
    _check_args(args)
    device = resolve_device(args.device)
    rank_device = init_from_env(device)
    try:
        out = _run(args, solver, rank_device or device)
    except BaseException:
        if rank_device is not None:
            leave(finished=False)
        raise
    if rank_device is not None:
        leave()
    return out


def _make_solver(args):
    from dataclasses import fields

    from ..engine.solvers.registry import SOLVERS, make_solver

    cls = SOLVERS[args.solver]
    settings = {f.name: getattr(args, f.name) for f in fields(cls.settings_class) if getattr(args, f.name, None) is not None}
    return make_solver(args.solver, **settings)


def _run(args, solver, device: torch.device) -> int:
    import numpy as np

    from ..engine.distributed import is_main

    if args.threads:
        torch.set_num_threads(args.threads)
    data = _load_data(args)
    classes = list(getattr(data, "classes", None) or data.train.classes)
    model, meta = _load_model(args, device)
    weight_decay = _weight_decay(args, meta)
    train = _train_subset(data.train, args.n_train)
    x, y = pick_images(data.test, args.test_index)  # raises for an index past the test set
    if args.k > len(train):
        raise ValueError(f"--k {args.k} is larger than the number of training images ({len(train)})")
    engine = InfluenceEngine(model, train, solver, weight_decay=weight_decay, layers=args.layers,
                             cache_dir=None if args.no_cache else args.cache_dir,
                             checkpoint=args.checkpoint, data_source=data.source, progress=is_main())
    start = time.perf_counter()
    scores = engine.scores(x, y)  # (K, n_train)
    seconds = time.perf_counter() - start
    if scores is None:  # not rank 0 under torchrun: rank 0 prints and writes
        return 0
    with torch.no_grad():
        pred = model(x.to(device)).argmax(1).cpu()
    best = top_k(scores, args.k)
    report = {"checkpoint": args.checkpoint, "model": args.model or "Net", "data_source": data.source,
              "data_label": getattr(data, "label", None), "n_train": len(train),
              "weight_decay": weight_decay, "layers": args.layers, "solver": solver.describe(), "seconds": seconds,
              "sign": "score = predicted rise of the test loss if the training image were removed; positive = helpful",
              "tests": []}
    for row, t in enumerate(args.test_index):
        entry = {"test_index": t, "test_name": data.test.names[t], "label": classes[int(y[row])], "predicted": classes[int(pred[row])]}
        for kind, idx, val in (("helpful", best.helpful, best.helpful_scores), ("harmful", best.harmful, best.harmful_scores)):
            entry[kind] = [{"index": int(i), "class": classes[int(train.labels[i])], "name": train.names[int(i)], "score": float(s)}
                           for i, s in zip(idx[row], val[row], strict=True)]
        report["tests"].append(entry)
        print(f"\ntest image {t} ({entry['test_name']}): label {entry['label']}, predicted {entry['predicted']}")
        width = max(11, *(len(c) for c in classes))
        for kind in ("helpful", "harmful"):
            print(f"  most {kind}:")
            print(f"    {'rank':>4} {'index':>6} {'class':<{width}} {'score':>11}  file")
            for r, e in enumerate(entry[kind], 1):
                print(f"    {r:>4} {e['index']:>6} {e['class']:<{width}} {e['score']:>11.3e}  {e['name']}")
    out = Path(args.out)
    write_json_atomic(report, out.with_suffix(".json"))
    arrays = {"scores": scores.float().numpy(), "test_index": np.asarray(args.test_index), "labels": y.numpy()}
    atomic_write(out.with_suffix(".npz"), lambda tmp: np.savez_compressed(tmp, **arrays))
    print(f"\nscores of {len(args.test_index)} test x {len(train)} training images in {seconds:.1f} s "
          f"({solver.name}); wrote {out.with_suffix('.json')} and {out.with_suffix('.npz')}")
    return 0
