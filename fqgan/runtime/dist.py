"""The process group: joined from torchrun's environment (gloo on CPU, nccl on GPU), rank helpers,
all-reduce. One process without torchrun: no group, ``world_size == 1``, every helper a no-op."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from .device import resolve_device
from .errors import UsageError

T = TypeVar("T")

__all__ = ["DistInfo", "all_ranks_reach_here", "all_reduce_mean", "all_reduce_sum", "barrier", "distributed",
           "init_distributed", "on_main_then_shared", "rank_world", "teardown_distributed"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process runs: ``rank`` of ``world_size``, its ``device``, the collective backend."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the one that writes logs, checkpoints and progress bars)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group that torchrun describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``): nccl for CUDA devices, gloo otherwise. Without torchrun
    (``WORLD_SIZE`` unset or 1) no group is created. A group made by the caller is reused."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        dev = resolve_device(device, local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(rank, world, local_rank, dev, dist.get_backend())
    dev = resolve_device(device, local_rank)
    if world <= 1:
        return DistInfo(0, 1, 0, dev, None)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


def teardown_distributed() -> None:
    """Leave the process group if one exists (idempotent)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(device: str = "auto") -> Iterator[DistInfo]:
    """:func:`init_distributed` for the block; the group is left at the end only if this call made it
    (a group the caller made, e.g. in a test, stays)."""
    owns_group = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(device)
    try:
        yield info
    finally:
        if owns_group:
            teardown_distributed()


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the current group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in one process)."""
    if info.distributed:
        dist.barrier()


def all_ranks_reach_here() -> None:
    """A barrier over the current group (no-op without one)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def on_main_then_shared(fn: Callable[[], T]) -> T:
    """``fn()`` run by rank 0 only, its result handed to every rank (``broadcast_object_list``); a
    :class:`UsageError` it raises is raised on every rank, so all stop with the same one line. Without a
    process group, just ``fn()``."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return fn()
    box: list[object] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = fn()
        except UsageError as exc:
            box[0] = exc
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], UsageError):
        if dist.get_rank() != 0:
            box[0].printed_by_rank_0 = True  # the CLI prints one copy, rank 0's
        raise box[0]
    return box[0]  # type: ignore[return-value]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op without a group); returns ``t``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def all_reduce_mean(values: Mapping[str, float], info: DistInfo) -> dict[str, float]:
    """Mean over ranks of scalar metrics (one collective for all of them)."""
    if not info.distributed or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    t /= info.world_size
    return dict(zip(keys, t.tolist()))
