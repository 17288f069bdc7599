"""``python -m influence_over_inference train``: train the CNN, or load it if already trained so."""

from __future__ import annotations

import argparse
from dataclasses import fields

from ..engine.io import check_writable, write_json_atomic
from ..study.training import TrainConfig

DEFAULT_CHECKPOINT = "data/cifar_net.pt"


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="auto",
                   help="CIFAR-10 source: 'auto' (CIFAR10_DIR, an earlier download, the offline copy in "
                        "../shared/data/cifar10 when offline, else download), 'torchvision', or an image "
                        "folder with train/<class>/ and test/<class>/")
    p.add_argument("--data-root", default="data", help="where torchvision downloads to and caches live")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    helps = {
        "epochs": "passes over the training set", "batch_size": "images per SGD step",
        "lr": "initial learning rate", "momentum": "SGD momentum",
        "weight_decay": "L2 penalty (recorded: influence depends on it)",
        "cosine": "cosine learning-rate decay (use --no-cosine for a constant rate)",
        "seed": "seed for initialisation and data order", "device": "'auto', 'cpu', 'cuda' or 'cuda:N'",
        "n_train": "train on a class-balanced subset of N images", "threads": "torch CPU threads",
    }
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helps[f.name])
        else:
            kind = {"int": int, "float": float, "str": str, "int | None": int}.get(str(f.type), str)
            p.add_argument(flag, type=kind, default=default, help=f"{helps[f.name]} (default: {default})")
    p.add_argument("--nimarb-recipe", action="store_true",
                   help="nimarb's recipe instead: SGD lr 1e-3, momentum 0.9, batch 4, 10 epochs")


def _train_config(args) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    if args.nimarb_recipe:
        keep = {k: values[k] for k in ("seed", "device", "n_train", "threads")}
        return TrainConfig.nimarb(**keep)
    return TrainConfig(**values)


def register(subparsers) -> None:
    """``train``: train the nimarb CNN on CIFAR-10 (or load it if already trained with these settings)."""
    p = subparsers.add_parser("train", help="train the nimarb CNN on CIFAR-10 (or load it if already trained with these settings)")
    _add_data_args(p)
    _add_train_args(p)
    p.add_argument("--out", default=DEFAULT_CHECKPOINT, help=f"checkpoint path (default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint trained otherwise")
    p.add_argument("--json", default=None, help="also write the training summary to this JSON file")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from ..study.data import load_cifar10
    from ..study.training import train_or_load

    config = _train_config(args)  # validates the settings before anything is loaded
    check_writable(args.out, "checkpoint")
    if args.json:
        check_writable(args.json, "--json")
    data = load_cifar10(args.data, root=args.data_root)
    print(f"data: {data.label}, {data.source} ({len(data.train)} train, {len(data.test)} test)")
    _, meta = train_or_load(data, args.out, config, retrain=args.overwrite)
    print(f"checkpoint: {args.out}")
    print(f"epochs: {config.epochs}, seconds per epoch: {meta['seconds_per_epoch']:.1f} ({meta['device']})")
    print(f"test accuracy: {100 * meta['test_accuracy']:.2f} %")
    for name, acc in meta["test_per_class"].items():
        print(f"  {name:10s} {100 * acc:5.1f} %")
    if args.json:
        write_json_atomic(meta, args.json)
    return 0
