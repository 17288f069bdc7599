"""Scale-out with ``torch.distributed``: training examples sharded across ranks, results combined.

Scoring training examples is embarrassingly parallel and fitting curvature is a sum over
examples, so under an initialised default process group (``torchrun``, or your own
``torch.distributed.init_process_group``) the engine splits the training examples across the
ranks, as kronfluence does:

- the curvature fit: each rank computes its shard's part of the statistics and they are
  combined with collectives (the exact solver's matrix sum with ``all_reduce``; the fast
  solver's factor pieces with ``all_gather``, its Gram rows and basis with ``all_reduce``);
- the scores: each rank scores its shard of training examples against the same ``s_test``
  vectors (computed on rank 0 and broadcast) and rank 0 gathers the columns (``gather``);
- rank 0 alone returns the scores and writes caches and outputs; other ranks get ``None``.

Without a process group (or with one rank) every function here is the identity and the engine
runs as one process. Nothing here starts processes: that is ``torchrun``'s job (or
``torch.multiprocessing.spawn`` in the tests). ``gloo`` on the CPU, ``nccl`` on GPUs: collectives
run on the process group's device (CUDA for ``nccl``) and results come back to the caller's.

Shards are contiguous runs of whole blocks (``block`` = the chunk size of the computation, so
each chunk holds the same examples as in one process) or, with ``mode="strided"``, every
``world_size``-th block; uneven splits and ranks without examples are allowed.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from .params import as_tensors

log = logging.getLogger(__name__)

SHARD_MODES = ("contiguous", "strided")


def is_distributed() -> bool:
    """True under an initialised default process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that returns results and writes files."""
    return world()[0] == 0


def shard_indices(n: int, rank: int | None = None, world_size: int | None = None, mode: str = "contiguous",
                  block: int = 1) -> torch.Tensor:
    """The indices (sorted, int64) of ``n`` examples that ``rank`` of ``world_size`` handles.

    Examples are grouped in blocks of ``block`` (the last may be shorter). ``"contiguous"``: rank r
    gets blocks ``[r B / W, (r + 1) B / W)`` of the B blocks; ``"strided"``: blocks r, r + W, ...
    Every example belongs to exactly one rank; a rank may get none (B < W). Defaults: this process's
    rank and world size.
    """
    if rank is None or world_size is None:
        rank, world_size = world()
    if mode not in SHARD_MODES:
        raise ValueError(f"mode must be one of {SHARD_MODES}, got {mode!r}")
    if n < 0 or block < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need n >= 0, block >= 1 and 0 <= rank < world_size; got n={n}, block={block}, rank={rank}, world_size={world_size}")
    n_blocks = -(-n // block)
    if mode == "contiguous":
        blocks = torch.arange(rank * n_blocks // world_size, (rank + 1) * n_blocks // world_size)
    else:
        blocks = torch.arange(rank, max(n_blocks, rank), world_size)
    idx = (blocks[:, None] * block + torch.arange(block)[None]).reshape(-1)
    return idx[idx < n]


class Shard:
    """The examples of ``data`` (a split with ``tensors``/``__len__``, or an ``(x, y)`` pair) at ``indices``.

    Behaves like a split (``len``, ``tensors(indices)``), so the engine's chunked loops run over a
    shard unchanged.
    """

    def __init__(self, data, indices: torch.Tensor):
        self.data = data
        self.indices = torch.as_tensor(indices, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices)

    def tensors(self, indices=None) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.indices if indices is None else self.indices[torch.as_tensor(indices, dtype=torch.long)]
        return as_tensors(self.data, idx)


def shard(data, n: int, block: int = 1, mode: str = "contiguous"):
    """This rank's :class:`Shard` of ``data`` (``n`` examples); ``data`` itself in one process."""
    if not is_distributed():
        return data
    return Shard(data, shard_indices(n, mode=mode, block=block))


# -- collectives (identities in one process) ---------------------------------------------------

def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks (a new tensor on ``tensor``'s device; ``tensor`` itself in one process)."""
    if not is_distributed():
        return tensor
    buf = tensor.to(_comm_device(), copy=True).contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(tensor.device)


def broadcast_from_main(*tensors: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Rank 0's tensors on every rank (other ranks pass None; shapes and dtypes travel first)."""
    if not is_distributed():
        return tensors
    meta = [[(tuple(t.shape), t.dtype, str(t.device)) for t in tensors] if is_main() else None]
    dist.broadcast_object_list(meta, src=0)
    out = []
    for t, (shape, dtype, device) in zip(tensors, meta[0], strict=True):
        buf = t.to(_comm_device()).contiguous() if is_main() else torch.empty(shape, dtype=dtype, device=_comm_device())
        dist.broadcast(buf, src=0)
        out.append(t if is_main() else buf.to(_local_device(device)))
    return tuple(out)


def broadcast_object(obj):
    """Rank 0's picklable ``obj`` on every rank (a flag, a small dict)."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _local_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda":  # rank 0's CUDA device means "this rank's" here
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _padded(local: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    pad = list(local.shape)
    pad[dim] = length - local.shape[dim]
    return torch.cat([local, local.new_zeros(pad)], dim=dim).to(_comm_device()).contiguous()


def all_gather_rows(local: torch.Tensor, n: int, block: int = 1, mode: str = "contiguous") -> torch.Tensor:
    """Every rank's rows, in global order: (n_mine, ...) on each rank -> (n, ...) on every rank.

    Rank r's rows are those of ``shard_indices(n, r, W, mode, block)``.
    """
    if not is_distributed():
        return local
    rank, size = world()
    shards = [shard_indices(n, r, size, mode, block) for r in range(size)]
    if len(local) != len(shards[rank]):
        raise ValueError(f"rank {rank} holds {len(local)} rows, its shard has {len(shards[rank])}")
    longest = max(len(s) for s in shards)
    bufs = [torch.empty_like(_padded(local, 0, longest)) for _ in range(size)]
    dist.all_gather(bufs, _padded(local, 0, longest))
    out = local.new_empty((n, *local.shape[1:]))
    for idx, buf in zip(shards, bufs, strict=True):
        out[idx.to(out.device)] = buf[: len(idx)].to(out.device)
    return out


def gather_columns(local: torch.Tensor, n: int, block: int = 1, mode: str = "contiguous") -> torch.Tensor | None:
    """Columns scored on each rank, assembled on rank 0: (K, n_mine) -> (K, n) on rank 0, None elsewhere."""
    if not is_distributed():
        return local
    rank, size = world()
    shards = [shard_indices(n, r, size, mode, block) for r in range(size)]
    if local.shape[1] != len(shards[rank]):
        raise ValueError(f"rank {rank} scored {local.shape[1]} columns, its shard has {len(shards[rank])}")
    longest = max(len(s) for s in shards)
    mine = _padded(local, 1, longest)
    bufs = [torch.empty_like(mine) for _ in range(size)] if rank == 0 else None
    dist.gather(mine, bufs, dst=0)
    if rank != 0:
        return None
    out = local.new_empty((local.shape[0], n))
    for idx, buf in zip(shards, bufs, strict=True):
        out[:, idx.to(out.device)] = buf[:, : len(idx)].to(out.device)
    return out


# -- process group from torchrun's environment ------------------------------------------------

def leave(finished: bool = True) -> None:
    """Destroy the process group; first wait for every rank (a barrier) when this one ``finished`` its work.

    gloo's ``gather`` returns on the sending ranks before rank 0 has received: a rank that tears down
    its connections at once can abort while rank 0 still reads its last columns (a two-process test
    died with SIGABRT, "terminate called without an active exception", in one of 14 runs before this). After
    an error no barrier: the other ranks may never reach it.
    """
    if not is_distributed():
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def init_from_env(device: str | torch.device = "cpu") -> torch.device | None:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

    Returns this rank's device (``cuda:LOCAL_RANK`` for a CUDA ``device``), or None when the
    environment names no group of more than one process or one is already initialised (then
    nothing is done). Backend: ``nccl`` for CUDA, ``gloo`` for the CPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return None
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    log.info("rank %d of %d on %s", dist.get_rank(), dist.get_world_size(), device)
    return device
