"""Influence under torch.distributed: 2 gloo processes give the scores of 1 process.

Two CPU processes are started with ``torch.multiprocessing.spawn`` and joined in a ``gloo``
process group; they score a tiny float64 model, sharding the curvature fit and the training
examples, and rank 0 writes what it gathered. The same cases run in this (single) process, and
scores, top-k and self-influence must agree to ``DIST_REL``: with an uneven split of the examples,
with a rank that has none, for the exact, fast (hooked and generic paths) and EK-FAC solvers (the fast
solver's hooked cases fit EK-FAC too, for the rest of the space: sharded in both), and
through the cached :class:`InfluenceEngine` (rank 0 alone writes the cache).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from engine_models import DTYPE, blobs, conv  # noqa: I001
from torch import nn

from influence_over_inference.engine import distributed
from influence_over_inference.engine.influence_engine import InfluenceEngine
from influence_over_inference.engine.scores import influence, self_influence, top_k
from influence_over_inference.engine.solvers.registry import make_solver

DIST_REL = 1e-10  # 2 processes vs 1, float64: only the order of summation differs
WORLD = 2
N_TRAIN = 60
WD = 1e-3

# name: (model, solver, solver settings, scoring chunk). Chunk 7 over 60 examples is 9 blocks,
# split 4 / 5 (uneven); a chunk or block of 100 is one block: rank 0 (the writer) has no examples.
CASES = {
    "exact_uneven": ("conv", "exact", {"damping": 0.05, "chunk_size": 7}, 7),
    "exact_empty_rank": ("conv", "exact", {"damping": 0.05, "chunk_size": 100}, 100),
    "fast_uneven": ("conv", "fast", {"damping": 0.05, "n_samples": 45, "chunk_size": 7}, 7),
    "fast_empty_rank": ("conv", "fast", {"damping": 0.05, "n_samples": 20, "chunk_size": 100}, 100),
    "fast_merged_spans": ("conv", "fast", {"damping": 0.05, "n_samples": 45, "chunk_size": 7, "span_images": 12}, 7),
    "fast_generic_path": ("layernorm_mlp", "fast", {"damping": 0.05, "n_samples": 30, "chunk_size": 8}, 11),
    "ekfac_uneven": ("conv", "ekfac", {"damping": 0.05, "chunk_size": 7}, 7),
    "ekfac_empty_rank": ("conv", "ekfac", {"damping": 0.05, "chunk_size": 100}, 100),
}


def _model(kind: str) -> nn.Module:
    torch.manual_seed(3)
    if kind == "conv":
        return conv().eval()
    # LayerNorm has parameters the hooks path does not handle: torch.func gradients, factor rows
    return nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(12, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 4)).to(DTYPE).eval()


def _data():
    x, y = blobs(N_TRAIN + 5, (3, 8, 8), 4, seed=1, noise=2.0)
    return (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


def run_case(name: str) -> dict | None:
    """One case's scores, top-k and self-influence (None off rank 0)."""
    kind, solver_name, settings, chunk = CASES[name]
    model = _model(kind)
    train, (test_x, test_y) = _data()
    solver = make_solver(solver_name, **settings).fit(model, *train, weight_decay=WD)
    scores = influence(model, test_x, test_y, train, solver, chunk_size=chunk)
    self_inf = self_influence(model, train, solver, chunk_size=chunk)
    if scores is None:
        assert self_inf is None
        return None
    best = top_k(scores, 5)
    return {"scores": scores, "helpful": best.helpful, "harmful": best.harmful, "self_influence": self_inf}


def run_engine(cache_dir, checkpoint) -> dict | None:
    model = _model("conv")
    train, (test_x, test_y) = _data()
    engine = InfluenceEngine(model, train, make_solver("fast", damping=0.05, n_samples=45, chunk_size=7), weight_decay=WD,
                             cache_dir=cache_dir, checkpoint=checkpoint, chunk_size=7, progress=False)
    first = engine.scores(test_x, test_y)
    files = sorted(p.name for p in cache_dir.iterdir())
    again = InfluenceEngine(model, train, make_solver("fast", damping=0.05, n_samples=45, chunk_size=7), weight_decay=WD,
                            cache_dir=cache_dir, checkpoint=checkpoint, chunk_size=7, progress=False)
    second = again.scores(test_x, test_y)  # from rank 0's cache, no collective work left hanging
    best = again.top_k(test_x, test_y, 3)
    if not distributed.is_main():
        assert first is None and second is None and best is None
        return None
    return {"scores": first, "cached": second, "files": files}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    from pathlib import Path

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        out = Path(out_dir)
        results = {name: run_case(name) for name in CASES}
        results["engine"] = run_engine(out / "cache", out / "checkpoint.pt")
        if rank == 0:
            torch.save(results, out / "results.pt")
        else:
            assert all(r is None for r in results.values()), "only rank 0 returns results"
    except BaseException:
        distributed.leave(finished=False)
        raise
    distributed.leave()  # a barrier first: no rank tears down while rank 0 still gathers


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    torch.save(_model("conv").state_dict(), out / "checkpoint.pt")
    (out / "cache").mkdir()
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return torch.load(out / "results.pt", weights_only=False), out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", list(CASES))
def test_two_gloo_processes_give_the_scores_of_one(two_processes, name):
    results, _ = two_processes
    got, want = results[name], run_case(name)
    assert got["scores"].shape == want["scores"].shape == (5, N_TRAIN)
    assert _rel(got["scores"], want["scores"]) <= DIST_REL
    assert torch.equal(got["helpful"], want["helpful"]) and torch.equal(got["harmful"], want["harmful"])
    assert _rel(got["self_influence"], want["self_influence"]) <= DIST_REL


def test_the_cases_split_as_intended():
    for name in ("exact_uneven", "fast_uneven"):
        sizes = [len(distributed.shard_indices(N_TRAIN, r, WORLD, block=CASES[name][3])) for r in range(WORLD)]
        assert sizes == [28, 32]
    assert len(distributed.shard_indices(N_TRAIN, 0, WORLD, block=100)) == 0


def test_distributed_engine_writes_its_cache_once_on_rank_0(two_processes):
    results, out = two_processes
    got = results["engine"]
    assert torch.equal(got["scores"], got["cached"])
    assert [f.split("-")[0] for f in got["files"]] == ["curvature", "scores"]  # one of each, no temporaries
    single = InfluenceEngine(_model("conv"), _data()[0], make_solver("fast", damping=0.05, n_samples=45, chunk_size=7),
                             weight_decay=WD, cache_dir=None, chunk_size=7, progress=False)
    assert _rel(got["scores"], single.scores(*_data()[1])) <= DIST_REL


@pytest.mark.parametrize("mode", ["contiguous", "strided"])
@pytest.mark.parametrize(("n", "world", "block"), [(10, 3, 1), (60, 2, 7), (5, 4, 2), (0, 2, 1), (50_000, 8, 500)])
def test_shards_partition_the_examples(n, world, block, mode):
    shards = [distributed.shard_indices(n, r, world, mode, block) for r in range(world)]
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(n))
    for s in shards:
        assert torch.equal(s, s.sort().values)
        starts = s[::block] if mode == "contiguous" else s[(s % block) == 0]
        assert bool((starts % block == 0).all())  # whole blocks: chunks hold the examples of one process


def test_shards_are_balanced_in_blocks_and_may_be_empty():
    assert [len(distributed.shard_indices(10, r, 3)) for r in range(3)] == [3, 3, 4]
    assert distributed.shard_indices(10, 1, 3, "strided").tolist() == [1, 4, 7]
    assert [len(distributed.shard_indices(5, r, 4, block=2)) for r in range(4)] == [0, 2, 2, 1]
    with pytest.raises(ValueError, match="mode"):
        distributed.shard_indices(10, 0, 2, "random")
    with pytest.raises(ValueError, match="rank"):
        distributed.shard_indices(10, 2, 2)


def test_one_process_is_untouched():
    data = (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    assert distributed.world() == (0, 1) and distributed.is_main() and not distributed.is_distributed()
    assert distributed.shard(data, 4, block=2) is data
    t = torch.ones(2, 3)
    assert distributed.all_reduce_sum(t) is t and distributed.gather_columns(t, 3) is t
    assert distributed.init_from_env() is None  # no WORLD_SIZE: no process group
