"""Data order that survives a restart: ``DistributedSampler``'s order per epoch, entered mid-epoch."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data.distributed import DistributedSampler

from .errors import UsageError

__all__ = ["ResumableSampler", "epoch_batches", "worker_errors_as_one_line"]


@contextlib.contextmanager
def worker_errors_as_one_line() -> Iterator[None]:
    """An error raised in a DataLoader worker reaches the user as the worker's own last line (e.g.
    ``cannot read image 'x.jpg': ...``), not as "Caught ValueError in DataLoader worker process 0. Original
    Traceback ...": a ValueError or OSError becomes a :class:`UsageError` (a fault of the data: the CLI prints
    it as one line), anything else a RuntimeError (a fault of the code: a traceback), both with the hint to
    run with ``--num-workers 0`` for the worker's traceback."""
    try:
        yield
    except Exception as exc:
        text = str(exc)
        if "in DataLoader worker process" not in text:
            raise
        last = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), type(exc).__name__)
        if isinstance(exc, (ValueError, OSError)):
            # "fqgan.runtime.errors.UsageError: cannot read ..." -> "cannot read ..." (the package's own
            # message says what is wrong); a built-in's name stays ("OSError: ...").
            last = re.sub(r"^fqgan[\w.]*\.\w+: ", "", last)
            raise UsageError(f"{last} (raised while loading data; --num-workers 0 shows where)") from None
        raise RuntimeError(f"{last} (raised while loading data; --num-workers 0 shows where)") from None


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (same order for the same seed and epoch) that can start mid-epoch:
    ``set_position(epoch, skip)`` drops this rank's first ``skip`` indices of that epoch."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.skip = 0

    def set_position(self, epoch: int, skip: int = 0) -> None:
        """Start at index ``skip`` of this rank's share of ``epoch``."""
        if skip < 0 or skip > self.num_samples:
            raise UsageError(f"skip={skip} outside this rank's {self.num_samples} samples per epoch")
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip


def epoch_batches(dataset, sampler: ResumableSampler, local_batch: int, step: int, max_steps: int,
                  num_workers: int, device: torch.device, collate_fn=None) -> Iterator[tuple[int, Any]]:
    """Yield ``(epoch, batch)`` for steps ``step .. max_steps - 1``: epoch ``e`` covers steps
    ``[e * S, (e + 1) * S)`` with ``S = sampler.num_samples // local_batch`` (the last partial batch of an
    epoch is dropped, as the official loaders), each epoch in ``sampler``'s order for that epoch,
    starting mid-epoch when ``step`` is. Sets ``dataset.set_epoch`` (when it has one) before each epoch."""
    from torch.utils.data import DataLoader

    steps_per_epoch = sampler.num_samples // local_batch
    if steps_per_epoch < 1:
        raise UsageError(f"{sampler.num_samples} samples per process is less than one batch of {local_batch}")
    # The DataLoader's own generator keeps its seeding off the global RNG (exact resume).
    gen = torch.Generator()
    while step < max_steps:
        epoch, pos = divmod(step, steps_per_epoch)
        sampler.set_position(epoch, pos * local_batch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler, num_workers=num_workers,
                            collate_fn=collate_fn, drop_last=True, pin_memory=device.type == "cuda", generator=gen)
        with worker_errors_as_one_line():
            for batch in loader:
                yield epoch, batch
                step += 1
                if step >= max_steps:
                    return
