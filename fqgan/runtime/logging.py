"""What a run shows and leaves: metrics as JSON lines (rank 0), a progress bar with live values, the
wall time per step."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import numpy as np
import torch

__all__ = ["MetricMeans", "MetricsLogger", "Progress", "StepTimer", "read_means", "read_metrics"]


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

    def update(self, n: int = 1) -> None:
        """Advance the bar by ``n`` steps."""
        if self.bar is not None:
            self.bar.update(n)

    def show(self, values: dict[str, float]) -> None:
        """Show ``values`` beside the bar (host floats: the loop passes each log interval's means)."""
        if self.bar is not None and values:
            self.bar.set_postfix({k: _fmt(v) for k, v in values.items()}, refresh=False)

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


class MetricMeans:
    """Per-step metric tensors summed over a log interval on their device, read on the host once per
    interval: :meth:`flush` stacks the means into one tensor, averages it over the ranks (one all-reduce)
    and starts a non-blocking copy to the host; :func:`read` of what it returned waits for that copy, which
    the loop does one step later, when it has long finished. No ``.item()`` per step or per metric."""

    def __init__(self, info: Any) -> None:
        self.info = info
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        """Add one step's metrics (0-d tensors)."""
        for key, v in values.items():
            v = v.detach().float().reshape(())
            self.sums[key] = self.sums[key] + v if key in self.sums else v.clone()
        self.count += 1

    def flush(self) -> tuple[list[str], torch.Tensor, Any] | None:
        """Start reading the interval's means (collective under torchrun); ``None`` for an empty interval."""
        if not self.count:
            return None
        keys = list(self.sums)
        means = torch.stack([self.sums[k] for k in keys]) / self.count
        if self.info.distributed:
            import torch.distributed as dist

            dist.all_reduce(means)
            means /= self.info.world_size
        event = None
        if means.is_cuda:
            host = torch.empty(means.shape, dtype=means.dtype, pin_memory=True)
            host.copy_(means, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = means
        self.sums.clear()
        self.count = 0
        return keys, host, event


def read_means(pending: tuple[list[str], torch.Tensor, Any]) -> dict[str, float]:
    """The values of a :meth:`MetricMeans.flush` (waits for its copy)."""
    keys, host, event = pending
    if event is not None:
        event.synchronize()
    return dict(zip(keys, host.tolist()))
