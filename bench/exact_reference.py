"""Exact influence on the real CNN: the full damped Gauss-Newton matrix over all training images.

The 62,006-parameter LeNet's GGN is a 62,006 x 62,006 matrix (30.8 GB in float64): too big for
this 2-core CPU, minutes on one large GPU. It is summed in place from per-example factor rows,
one chunk of training images at a time (``ExactSolver``: ``matrix.addmm_(R^T, R)``), damped,
Cholesky-factored, and every test gradient is solved against it; the scores of all training
images follow with the engine's sign convention. Under ``torchrun`` (nccl, one GPU per rank)
each rank sums its shard and the matrices are all-reduced (every rank then holds one).

Before building anything it estimates the memory it needs (the matrix, its Cholesky factor and
one chunk of factor rows) and refuses, saying how much, when the device has less free.

    python bench/exact_reference.py --device cuda                 # 100 test images x 50,000, float64
    python bench/exact_reference.py --device cpu --n-train 500 --layers fc3 --n-test 5 --out data/bench/exact_small.npz

Writes ``bench/results/exact_reference.npz``: ``scores`` (n_test, n_train), ``test_index``,
``settings`` (JSON text).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from influence_over_inference.engine.params import count_selected  # noqa: E402
from influence_over_inference.engine.scores import influence  # noqa: E402
from influence_over_inference.engine.solvers.exact import (  # noqa: E402
    ExactSettings,
    ExactSolver,
    exact_memory_bytes,
)


class NotEnoughMemory(RuntimeError):
    """The device has less free memory than the exact reference needs (the message says how much)."""


def free_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's ``mem_get_info``, or the CPU's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read the free memory of this machine")


def needed_bytes(model, layers, n_classes: int, chunk_size: int, n_test: int, dtype: torch.dtype) -> int:
    """The estimate: matrix + Cholesky factor + one chunk of factor rows + the scoring's gradients and s_test."""
    p = count_selected(model, layers)
    item = torch.tensor([], dtype=dtype).element_size()
    return exact_memory_bytes(p, n_classes, chunk_size, item) + item * p * (chunk_size + 2 * n_test)


def exact_reference(model, train, test_x, test_y, weight_decay: float, damping: float = 0.01, layers=None,
                    chunk_size: int = 500, available: int | None = None):
    """Scores (n_test, n_train) from the explicitly built damped GGN of ``model`` (on its device and dtype).

    Raises :class:`NotEnoughMemory` when the estimate exceeds ``available`` bytes (default: the
    device's free memory). Returns ``(scores, info)`` with the estimate and the timings.
    """
    param = next(model.parameters())
    with torch.no_grad():
        n_classes = model(test_x[:1].to(param.device, param.dtype)).shape[1]
    need = needed_bytes(model, layers, n_classes, chunk_size, len(test_x), param.dtype)
    have = free_bytes(param.device) if available is None else available
    if need > have:
        raise NotEnoughMemory(f"the exact reference needs about {need / 1e9:.1f} GB on {param.device} "
                              f"({count_selected(model, layers)}^2 matrix and its factor in {param.dtype}); {have / 1e9:.1f} GB free")
    solver = ExactSolver(ExactSettings(damping=damping, chunk_size=chunk_size, max_params=None))
    t0 = time.perf_counter()
    solver.fit(model, train, weight_decay=weight_decay, layers=layers)
    t1 = time.perf_counter()
    scores = influence(model, test_x, test_y, train, solver, chunk_size=chunk_size)
    t2 = time.perf_counter()
    return scores, {"estimate_bytes": need, "free_bytes": have, "fit_s": t1 - t0, "score_s": t2 - t1,
                    "n_params": count_selected(model, layers), "cholesky": solver._chol is not None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="where the matrix is built (default: cuda)")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"], help="(default: float64)")
    p.add_argument("--n-test", type=int, default=100, help="the first N test images (default: 100)")
    p.add_argument("--n-train", type=int, default=None, help="a class-balanced subset of the training images (default: all 50,000)")
    p.add_argument("--damping", type=float, default=0.01, help="lambda, added to the GGN + weight decay (default: 0.01, the engine's)")
    p.add_argument("--layers", nargs="+", default=None, help="only these modules' parameters (default: all)")
    p.add_argument("--chunk-size", type=int, default=500, help="training images per accumulation step (default: 500)")
    p.add_argument("--checkpoint", default="data/cifar_net.pt")
    p.add_argument("--data", default="auto")
    p.add_argument("--out", default="bench/results/exact_reference.npz")
    args = p.parse_args(argv)

    import numpy as np

    from influence_over_inference.commands.influence import _train_subset
    from influence_over_inference.engine.distributed import init_from_env, is_main
    from influence_over_inference.engine.io import save_npz_atomic
    from influence_over_inference.study.checkpoints import load_checkpoint
    from influence_over_inference.study.data import load_cifar10

    device = init_from_env(args.device) or torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    data = load_cifar10(args.data)
    model, meta = load_checkpoint(args.checkpoint, device)
    model = model.to(dtype)
    train = _train_subset(data.train, args.n_train)
    test_x, test_y = data.test.tensors(torch.arange(args.n_test))
    weight_decay = float(meta["recipe"]["weight_decay"])
    try:
        scores, info = exact_reference(model, train, test_x.to(device, dtype), test_y.to(device), weight_decay, args.damping,
                                       args.layers, args.chunk_size)
    except NotEnoughMemory as error:
        print(f"refused: {error}", file=sys.stderr)
        return 3
    if not is_main():
        return 0
    settings = {"checkpoint": args.checkpoint, "data_source": data.source, "n_train": len(train), "n_test": args.n_test,
                "weight_decay": weight_decay, "damping": args.damping, "curvature": "ggn", "dtype": args.dtype,
                "layers": args.layers, "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                **info}
    save_npz_atomic(args.out, scores=scores.double().numpy(), test_index=np.arange(args.n_test), settings=json.dumps(settings))
    print(json.dumps(settings, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
