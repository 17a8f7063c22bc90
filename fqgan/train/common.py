"""Training components shared by the tokenizer and generator loops.

Each piece stands alone (torchtitan style); the loops in :mod:`fqgan.train.tokenizer` and
:mod:`fqgan.train.generator` compose them. Models know nothing of any of this.

* :func:`init_distributed` / :func:`teardown_distributed`: process group from torchrun's
  environment (gloo on CPU, nccl on GPU); one process without it.
* :class:`ResumableSampler`: ``DistributedSampler`` order, restartable mid-epoch.
* :func:`save_checkpoint` / :func:`load_checkpoint`: atomic ``torch.save`` (temporary file, fsync,
  ``os.replace``), loading with errors that name the file and the problem.
* :class:`EMA`: exponential moving average of a model's parameters.
* :func:`capture_rng` / :func:`restore_rng`: Python, NumPy, torch CPU and CUDA generator states.
* :class:`MetricsLogger`: JSON lines, rank 0. :class:`Progress`: tqdm bar with live values.
* :class:`StepTimer`, :func:`autocast`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import pickle
import random
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data.distributed import DistributedSampler

# One error type for unusable weight files across fqgan (a ValueError): corrupted, truncated, wrong kind.
from fqgan.tokenizer.weights import CheckpointError, load_reason

__all__ = [
    "EMA",
    "CheckpointError",
    "DistInfo",
    "MetricsLogger",
    "Progress",
    "ResumableSampler",
    "StepTimer",
    "all_reduce_mean",
    "autocast",
    "barrier",
    "capture_rng",
    "gather_rng",
    "init_distributed",
    "load_checkpoint",
    "read_metrics",
    "resolve_device",
    "resolve_precision",
    "restore_rng",
    "save_checkpoint",
    "seed_everything",
    "teardown_distributed",
    "unwrap",
]

CHECKPOINT_FORMAT = 1


# -- distributed -----------------------------------------------------------------------------------
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
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: ``cuda:<local_rank>`` when CUDA is usable, else ``cpu``; otherwise the named device.
    Raises ValueError for a CUDA device on a machine without one."""
    if device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N): {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available here (use --device cpu)")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


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
    from datetime import timedelta

    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


def teardown_distributed() -> None:
    """Leave the process group if one exists (idempotent)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_mean(values: Mapping[str, float], info: DistInfo) -> dict[str, float]:
    """Mean over ranks of scalar metrics (one collective for all of them)."""
    if not info.distributed or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    t /= info.world_size
    return dict(zip(keys, t.tolist()))


# -- data order ------------------------------------------------------------------------------------
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
            raise ValueError(f"skip={skip} outside this rank's {self.num_samples} samples per epoch")
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
        raise ValueError(f"{sampler.num_samples} samples per process is less than one batch of {local_batch}")
    # The DataLoader's own generator keeps its seeding off the global RNG (exact resume).
    gen = torch.Generator()
    while step < max_steps:
        epoch, pos = divmod(step, steps_per_epoch)
        sampler.set_position(epoch, pos * local_batch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler, num_workers=num_workers,
                            collate_fn=collate_fn, drop_last=True, pin_memory=device.type == "cuda", generator=gen)
        for batch in loader:
            yield epoch, batch
            step += 1
            if step >= max_steps:
                return


@dataclass
class TrainResult:
    """What a finished run leaves: final step, where its files are, the last logged metrics."""

    step: int
    out_dir: str
    checkpoint: str | None
    metrics_path: str
    metrics: dict[str, float]
    seconds: float


# -- checkpoints -----------------------------------------------------------------------------------
def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any], kind: str) -> str:
    """Write ``state`` (plus ``kind`` and ``format``) to ``path`` atomically: a temporary file in the
    same folder, flushed and fsynced, then ``os.replace`` -- a crash leaves the old file or the new
    one, never a partial one. Returns the path written."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    payload = {"kind": kind, "format": CHECKPOINT_FORMAT, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # The rename itself is durable only once the folder's entry is on disk.
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def load_checkpoint(path: str | os.PathLike, kind: str | tuple[str, ...] | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain Python only:
    ``weights_only`` loading, no pickled code runs).

    :raises FileNotFoundError: no file at ``path`` (the message gives the absolute path)
    :raises CheckpointError: unreadable (truncated, corrupted, not a torch file), or of another
        ``kind`` than asked for
    """
    path = os.fspath(path)
    where = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r} (looked at {where})")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint path {path!r} is a folder; pass the .pt file inside it")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes): an interrupted copy? Use another one")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError,
            AttributeError, KeyError, IndexError) as exc:
        raise CheckpointError(f"checkpoint {path!r} ({size} bytes) is corrupted or truncated and cannot be "
                              f"loaded: {load_reason(exc)}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(state).__name__}, not a checkpoint dict")
    if kind is not None:
        kinds = (kind,) if isinstance(kind, str) else tuple(kind)
        found = state.get("kind")
        if found not in kinds:
            what = f"a {found!r} checkpoint" if found else "no 'kind' entry (not written by fqgan?)"
            raise CheckpointError(f"checkpoint {path!r} holds {what}; expected {' or '.join(map(repr, kinds))}")
    return state


# -- EMA -------------------------------------------------------------------------------------------
class EMA:
    """``ema = decay * ema + (1 - decay) * param`` after each optimiser step (official
    ``update_ema``, decay 0.9999); buffers (quantizer usage counters, norms' running statistics)
    are copied, so the EMA model is usable as is. The EMA model is a frozen copy in eval mode."""

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        d = self.decay if decay is None else decay
        ema_params = dict(self.model.named_parameters())
        for name, p in model.named_parameters():
            ema_params[name].lerp_(p.detach().to(ema_params[name].dtype), 1.0 - d)
        ema_buffers = dict(self.model.named_buffers())
        for name, b in model.named_buffers():
            ema_buffers[name].copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)


# -- RNG state -------------------------------------------------------------------------------------
def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """Every generator a training step may draw from, as tensors and plain Python (so that the
    checkpoint loads with ``weights_only``): Python ``random``, NumPy's global, torch CPU and, on a
    CUDA device, its CUDA generator."""
    # The legacy global generator is the one third-party code draws from, so it is what to capture.
    np_state = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Mapping[str, Any], device: torch.device | None = None) -> None:
    """Inverse of :func:`capture_rng`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],  # noqa: NPY002
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def gather_rng(info: DistInfo) -> list[dict[str, Any]]:
    """Every rank's :func:`capture_rng`, in rank order (collective: call on all ranks)."""
    mine = capture_rng(info.device)
    if not info.distributed:
        return [mine]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, mine)
    return out


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002 (the global generator, see capture_rng)
    torch.manual_seed(seed)


# -- logging ---------------------------------------------------------------------------------------
def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep them visible
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


class MetricsLogger:
    """Appends one JSON object per call to ``path`` (rank 0 only; other ranks no-op).

    On resume from step ``resume_step``, records after that step (written by the interrupted run
    past its last checkpoint) are dropped, so the file reads as one uninterrupted run.
    """

    def __init__(self, path: str | os.PathLike | None, enabled: bool = True, resume_step: int | None = None) -> None:
        self.path = None if path is None else os.fspath(path)
        self.enabled = enabled and self.path is not None
        self._f = None
        if not self.enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if resume_step is None:
            self._f = open(self.path, "w")
            return
        kept = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by the crash
                    if rec.get("step", 0) <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        self._f = open(self.path, "w")
        self._f.writelines(kept)
        self._f.flush()

    def log(self, step: int, **metrics: Any) -> None:
        if self._f is None:
            return
        rec = {"step": int(step), "time": round(time.time(), 3)}
        rec.update({k: _jsonable(v) for k, v in metrics.items()})
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines metrics file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """A tqdm bar over steps with live values (rank 0; ``enabled=False`` prints nothing)."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", enabled: bool = True,
                 unit: str = "step") -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, smoothing=0.1, unit=unit)

    def update(self, n: int = 1, **values: float) -> None:
        if self.bar is None:
            return
        if values:
            self.bar.set_postfix({k: _fmt(v) for k, v in values.items()}, refresh=False)
        self.bar.update(n)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt(v: float) -> str:
    v = float(v)
    return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4f}"


class StepTimer:
    """Wall time per step, averaged since the last :meth:`rate` call (syncs CUDA first)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self._sync()
        self._t0 = time.perf_counter()
        self._steps = 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def tick(self, n: int = 1) -> None:
        self._steps += n

    def rate(self) -> tuple[float, float]:
        """(seconds per step, steps per second) since the last call; resets."""
        self._sync()
        dt = time.perf_counter() - self._t0
        steps = max(self._steps, 1)
        self._t0 = time.perf_counter()
        self._steps = 0
        return dt / steps, steps / max(dt, 1e-9)


def autocast(device: torch.device, precision: str):
    """bf16 autocast (``precision == "bf16"``) on the device, or a no-op for ``"fp32"``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"``: bf16 on CUDA (as the official runs), fp32 on CPU."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    return precision


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP and/or ``torch.compile`` wrapper."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
