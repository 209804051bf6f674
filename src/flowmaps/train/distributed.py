"""Multi-process training on PyTorch's own engine: ``torchrun`` + ``torch.distributed``.

``flowmaps train|distill`` run unchanged under ``torchrun --nproc_per_node=N``: :func:`init` reads the
environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), joins the process group (``gloo`` on
CPU, ``nccl`` on CUDA, chosen from the device) and the trainer wraps its loss in
``DistributedDataParallel``. Each rank draws its own data, base samples and times from its own seed
(:func:`rank_seed`); metrics and checkpoints are written by rank 0 only.

**Forward-mode derivatives and DDP (the pitfall, and how it is handled here).** DDP synchronises
gradients through autograd hooks that it arms in ``DDP.forward``. Two things go wrong with JVP
objectives: ``torch.func.jvp`` applied to a DDP-wrapped module fails outright, and the tempting
workaround — calling ``ddp.module`` (the bare network) inside the JVP so that the wrapper's forward is
never run — trains *without any gradient synchronisation*: every rank steps on its own gradient and
the replicas drift apart silently. The fix used by :class:`~flowmaps.train.trainer.Trainer`: DDP wraps a
small module whose ``forward`` computes the *whole objective* (every primal pass and every JVP of the
bare network happens inside one ``DDP.forward``), so the one ``backward`` of the returned loss fires
DDP's hooks for every parameter, whether it was reached through the primal or through a tangent. The
test ``tests/test_distributed.py`` runs two processes and asserts that the parameters are bit-identical
across ranks after every step and equal a one-process run on the concatenated batch.

**Sharded sampling and evaluation.** :func:`map_sharded` applies a function to fixed chunks of rows
(``[0, c)``, ``[c, 2c)``, ...) of a batch every rank holds in full, each rank taking a contiguous share of
the chunks, and gathers the results in order on every rank. The chunks are the same whatever the
number of processes, so a sample of a given global index is computed from the same inputs in the same
batch as in a one-process run: sharded results equal unsharded ones bit for bit
(``tests/test_sharding.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init", "info", "rank_seed", "all_reduce_sum", "barrier", "is_main",
           "shutdown", "broadcast_flag", "all_gather_bytes", "all_gather_rows", "shard_rows",
           "map_sharded"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size`` (``1`` when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device | str = "cpu") -> DistInfo:
    """Join the process group torchrun describes (no-op for a single process); returns :func:`info`.

    The backend is ``nccl`` for CUDA devices and ``gloo`` otherwise; on CUDA each rank takes the device
    ``cuda:LOCAL_RANK``.
    """
    device = torch.device(device)
    if not launched_by_torchrun():
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return info()


def info() -> DistInfo:
    """The current process group's view (world size 1 when none is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                    dist.get_backend())


def is_main() -> bool:
    return info().is_main


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s data/time generator: ``seed`` itself on rank 0 (so a one-process run is
    unchanged) and well-separated seeds on the others."""
    return int(seed) + 1_000_003 * int(rank)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place; identity for one process). A tensor on another device than
    the backend moves (gloo: CPU, nccl: CUDA) goes there and back."""
    if info().enabled:
        device = _comm_device()
        if values.device == device:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        else:
            moved = values.to(device)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            values.copy_(moved)
    return values


def broadcast_flag(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is true on any rank (e.g. a stop request seen by one rank)."""
    if not info().enabled:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_gather_bytes(data: torch.Tensor) -> list[torch.Tensor]:
    """Gather a 1-D ``uint8`` tensor of the same length from every rank (RNG states); rank order."""
    if not info().enabled:
        return [data]
    device = _comm_device()
    data = data.to(device)
    out = [torch.empty_like(data) for _ in range(dist.get_world_size())]
    dist.all_gather(out, data)
    return [o.cpu() for o in out]


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows along dim 0, in rank order, on every rank (on the CPU); the
    ranks may hold different numbers of rows (the other dimensions and the dtype agree)."""
    if not info().enabled:
        return x
    device = _comm_device()
    x = x.to(device).contiguous()
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([x.shape[0]], device=device))
    counts = [int(c) for c in torch.cat(counts).cpu()]
    most = max(counts)
    if x.shape[0] < most:  # all_gather moves equal shapes: pad, then trim
        x = torch.cat([x, x.new_zeros(most - x.shape[0], *x.shape[1:])])
    out = [torch.empty_like(x) for _ in counts]
    dist.all_gather(out, x)
    return torch.cat([o[:c] for o, c in zip(out, counts)]).cpu()


def shard_rows(n: int, chunk: int, rank: int | None = None, world_size: int | None = None
               ) -> tuple[int, int]:
    """Rows ``[start, end)`` of rank ``rank``: a contiguous run of whole chunks of ``chunk`` rows (the
    last chunk of the batch may be short), the ``ceil(n / chunk)`` chunks split as evenly as possible."""
    here = info()
    rank = here.rank if rank is None else rank
    world_size = here.world_size if world_size is None else world_size
    if chunk < 1:
        raise ValueError("chunk must be >= 1")
    chunks = -(-n // chunk)
    per, extra = divmod(chunks, world_size)
    first = rank * per + min(rank, extra)
    count = per + (rank < extra)
    return min(first * chunk, n), min((first + count) * chunk, n)


def map_sharded(fn, x: torch.Tensor, *others: torch.Tensor | None, chunk: int) -> torch.Tensor:
    """``fn(x_chunk, *other_chunks)`` over the chunks of rows of ``x`` (``others`` sliced alike;
    ``None`` passes through) that fall to this rank (:func:`shard_rows`), gathered in order on every
    rank (on the CPU). One process: every chunk, the same result."""
    start, end = shard_rows(x.shape[0], chunk)

    def rows(i: int, j: int):
        return [x[i:j]] + [None if o is None else o[i:j] for o in others]

    outs = [fn(*rows(i, min(i + chunk, end))) for i in range(start, end, chunk)]
    if not outs:  # a rank with no rows still joins the gather: an empty result of the right
        outs = [fn(*rows(0, 1))[:0]]  # shape and dtype (networks refuse empty batches)
    return all_gather_rows(torch.cat([o.detach().cpu() for o in outs]))


def _comm_device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo moves CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if info().enabled:
        dist.barrier()


def shutdown(sync: bool = True) -> None:
    """Leave the process group. With ``sync`` every rank first meets at a barrier: a rank that tears the
    group down while a peer still finishes its last collective aborts the process ("terminate called
    without an active exception"). A gloo barrier alone is not enough: a rank returns from it once it
    has heard from its peers, while its own last message may still be in flight to a peer that has not
    returned yet; so the ranks then meet once more through the rendezvous store (no gloo traffic), and
    only when every rank has left the barrier is the group destroyed. The ranks meet in the store a
    last time after destroying it, so that no rank exits (closing its sockets) while a peer is still
    tearing its connections down. After an error pass ``sync=False`` (the peers may never arrive)."""
    if dist.is_available() and dist.is_initialized():
        if not sync:
            dist.destroy_process_group()
            return
        store, world = dist.distributed_c10d._get_default_store(), dist.get_world_size()
        dist.barrier()
        _store_barrier(store, world, "flowmaps/shutdown")
        dist.destroy_process_group()
        _store_barrier(store, world, "flowmaps/destroyed")


def _store_barrier(store, world: int, key: str, timeout: float = 120.0) -> None:
    """Wait until every rank has reached this point, counting arrivals in the rendezvous store."""
    import time

    store.add(key, 1)
    deadline = time.monotonic() + timeout
    while store.add(key, 0) < world:
        if time.monotonic() > deadline:
            raise RuntimeError(f"ranks did not all reach {key!r} within {timeout:.0f} s")
        time.sleep(0.005)
