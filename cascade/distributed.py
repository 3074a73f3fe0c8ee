"""Data-parallel training and sharded work on top of ``torch.distributed`` (no cluster layer of our own).

A job is started by ``torchrun`` (or ``torch.multiprocessing.spawn`` in tests), which sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` for every process; :func:`init_from_env`
turns them into a process group (backend "gloo" on CPU, "nccl" on CUDA) and is a no-op in a single process.
Everything else here is a thin helper over the initialised group: who is rank 0, barriers, one object broadcast,
and how rows are split between ranks.

How rows are split (all splits are deterministic functions of (n, rank, world), so ranks never talk about it):

- :func:`shard_rows`: contiguous, equal shards; the last ``n % world`` rows are DROPPED so every rank holds the
  same number of rows (and so takes the same number of optimizer steps). Use it when each rank reads only its
  own part of a table.
- :func:`rank_batch_indices`: every rank draws the SAME seeded permutation of all n rows and cuts it into global
  batches of ``world * batch_size`` rows; rank r takes the r-th block of ``batch_size`` rows of each global
  batch. DDP averages the ranks' gradients, and every loss here is a mean over rows, so one step equals one
  single-process step with batch ``world * batch_size`` on the same rows (up to float summation order). A last,
  short global batch of m rows gives every rank ``m // world`` rows (up to ``world - 1`` rows of it are dropped).

The effective batch of a DDP run is therefore ``world * TrainConfig.batch_size``: scale the learning rate (or
divide the per-rank batch) accordingly when comparing with a single-process run.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank in [0, world_size), local_rank on its node, the backend ("gloo" /
    "nccl", None for a single process) and the device its model should live on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"init_from_env: environment variable {name}={raw!r} is not an integer") from None


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT) and return this process's :class:`DistEnv`.

    backend: None picks "nccl" when torch sees CUDA, else "gloo". With "nccl" the process binds to GPU
    LOCAL_RANK (``torch.cuda.set_device``), so ``device="cuda"`` means that GPU. Without WORLD_SIZE in the
    environment nothing is initialised: a plain single process. Under torchrun a group is initialised even for
    one rank, so a one-GPU job runs the same DDP code path as an N-GPU job. Calling it again once the group
    exists returns the current environment.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"init_from_env: backend {backend!r} is not one of {BACKENDS}")
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        return current_env()
    if "WORLD_SIZE" not in os.environ:
        return DistEnv()
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"init_from_env: RANK={rank} is not in [0, WORLD_SIZE={world})")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ValueError(f"init_from_env: WORLD_SIZE={world} but {name} is not set; start the job with torchrun")
    if not dist.is_available():
        raise RuntimeError("init_from_env: this torch build has no torch.distributed")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("init_from_env: backend 'nccl' needs CUDA, but torch sees no GPU")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"init_from_env: LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(local_rank)  # before the group exists, so NCCL binds this rank to its own GPU
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    env = current_env()
    log.info("torch.distributed: rank %d of %d (local %d), backend %s, device %s", env.rank, env.world_size,
             env.local_rank, env.backend, env.device)
    return env


def current_env() -> DistEnv:
    """The :class:`DistEnv` of the initialised group (a single-process one when there is none)."""
    if not is_distributed():
        return DistEnv()
    backend = str(dist.get_backend())
    device = f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else "cpu"
    return DistEnv(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), backend, device)


def is_distributed() -> bool:
    """True when a torch.distributed process group is initialised (any number of ranks)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one process that writes checkpoints and manifests."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the other ranks (e.g. rank 0 writes a cache the others read)."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; for small control data such as metrics and decisions)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_min_int(value: int) -> int:
    """The minimum of an integer over all ranks."""
    if not is_distributed():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=current_env().device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def finite_on_all_ranks(compute: Callable[[], Any], ddp: bool) -> tuple[Any, FloatingPointError | None]:
    """Run ``compute`` (a loss mix that raises FloatingPointError on a non-finite term) -> (result, None), or
    (None, error) when it failed on this rank or, under DDP, on any other rank: every rank learns it, so all stop
    together and none waits forever in backward's gradient all-reduce."""
    try:
        out, error = compute(), None
    except FloatingPointError as e:
        out, error = None, e
    if ddp and all_reduce_min_int(error is None) == 0:
        error = error or FloatingPointError("a non-finite loss on another rank")
    return (None, error) if error is not None else (out, None)


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Per-key mean over ranks of a dict of floats whose keys are the same on every rank."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=current_env().device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) / world_size() for k, v in zip(keys, t.tolist())}


def shard_rows(n: int, rank: int, world: int) -> slice:
    """Rows of rank ``rank`` among ``world`` ranks: the contiguous slice [rank*s, (rank+1)*s) with s = n // world.

    The last n % world rows belong to no rank (dropped), so every rank gets exactly n // world rows.
    """
    if n < 0 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard_rows: need n >= 0, world >= 1 and 0 <= rank < world (got n={n}, rank={rank}, "
                         f"world={world})")
    s = n // world
    return slice(rank * s, (rank + 1) * s)


def rank_batch_indices(n: int, batch_size: int, rng: np.random.Generator | None, rank: int,
                       world: int) -> Iterator[np.ndarray]:
    """Row indices (int64 [<= batch_size]) of this rank's part of each global batch of ``world * batch_size``.

    Every rank must pass a generator in the same state: all draw the same permutation (rng None: rows in order).
    Rank r takes rows [r*b, (r+1)*b) of each global batch, b = batch_size for full batches and m // world for a
    last global batch of m rows, so all ranks yield the same number of batches of the same size (possibly 0 rows
    at the very end; the caller skips those on every rank alike). With world = 1 this is exactly
    :func:`cascade.data.batches.batch_indices` with the same generator.
    """
    if batch_size <= 0 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank_batch_indices: need batch_size > 0 and 0 <= rank < world (got {batch_size}, "
                         f"{rank}, {world})")
    perm = rng.permutation(n) if rng is not None else np.arange(n)
    step = world * batch_size
    for start in range(0, n, step):
        chunk = perm[start:start + step]
        b = min(batch_size, len(chunk) // world)
        yield chunk[rank * b:(rank + 1) * b]


def destroy() -> None:
    """Leave the process group (no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
