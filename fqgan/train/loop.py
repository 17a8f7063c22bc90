"""The one training loop, ``fit(config, task)``, for every model this package trains.

The loop owns what the tokenizer and the generator share: the process group, TF32, the batch split
over processes and micro-batches, the restartable data order, resume (checks, weights, optimizers,
EMA, every RNG), ``config.json``, the parallel wrapping (DDP or FSDP2, activation checkpointing,
``torch.compile``), gradient accumulation and clipping, the EMA update, metrics, the progress bar,
checkpoints (``last.pt``, or a sharded ``last.dcp/`` under FSDP) and the :class:`TrainResult`.

A task (:class:`Task`: :class:`~fqgan.train.tokenizer.TokenizerTask`,
:class:`~fqgan.train.generator.GeneratorTask`) provides the rest: its data set, its modules and
optimizers, the :class:`Phase` list of one step (each phase is one optimizer step: a loss over the
micro-batches, returning metrics), and the entries it adds to checkpoints.

The loop is one file (under 400 lines): every behaviour a run has, read in the order it happens.

Gradient accumulation (``grad_accum = N``): each process's share of the global batch is cut into N
micro-batches; each phase runs its loss on all of them (gradients synchronised over processes on the
last only), scaled by 1 / N, then clips and steps once. For losses that are means over the batch this
equals one step on the whole batch; batch statistics (BatchNorm, the entropy loss's code
distribution, InfoNCE's negatives) are per micro-batch, as they are per process under DDP.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from fqgan.runtime.checkpoint import gather_rng as _gather_rng
from fqgan.runtime.checkpoint import load_checkpoint, restore_rng, resume_path, save_checkpoint, seed_everything
from fqgan.runtime.device import autocast, enable_tf32, resolve_precision
from fqgan.runtime.dist import DistInfo, barrier, distributed
from fqgan.runtime.ema import EMA
from fqgan.runtime.errors import UsageError
from fqgan.runtime.logging import MetricMeans, MetricsLogger, Progress, StepTimer, read_means
from fqgan.runtime.options import run_defining_diff
from fqgan.runtime.parallel import (
    apply_activation_checkpointing,
    clip_grad_norm,
    grad_sync,
    load_sharded,
    save_sharded,
    set_full_optimizer_state,
    shard,
    unwrap,
    wrap_ddp,
)
from fqgan.runtime.rundir import clean_stale_files, prepare_run_dir
from fqgan.runtime.sampler import ResumableSampler, epoch_batches
from fqgan.runtime.signals import StopRequest, parse_signals

from .config import RunConfig

__all__ = ["Phase", "Task", "TrainResult", "fit"]


@dataclass
class TrainResult:
    """What a finished run leaves: final step, where its files are, the last logged metrics."""

    step: int
    out_dir: str
    checkpoint: str | None
    metrics_path: str
    metrics: dict[str, float]
    seconds: float
    preempted: bool = False  # stopped by a signal, with a checkpoint at ``step``


class Phase(NamedTuple):
    """One optimizer step within a training step.

    ``loss(i, micro_batch, step)`` returns the loss to differentiate and the metrics of micro-batch
    ``i`` (tensors; averaged over micro-batches); ``step`` counts from 1, as the official losses do.
    """

    optimizer: str  # key of the task's optimizers (and of the checkpoint entry)
    module: nn.Module  # the wrapped module whose gradients the phase synchronises (DDP / FSDP)
    params: Sequence[nn.Parameter]  # clipped to max_grad_norm
    loss: Callable[[int, Any, int], tuple[Tensor, dict[str, Tensor]]]
    grad_norm_key: str  # metric name of the pre-clipping gradient norm
    active: Callable[[int], bool] = lambda step: True
    idle: tuple[str, ...] = ()  # metrics reported as 0 on steps where the phase does not run
    ema: bool = False  # update the EMA after this phase's optimizer step


class Task(Protocol):
    """What :func:`fit` needs from a model's training."""

    kind: str  # checkpoint kind, e.g. "fqgan-tokenizer"
    command: str  # progress bar label, e.g. "train-tokenizer"
    rate_key: str  # metric of items per second, e.g. "images_per_sec"
    report_keys: tuple[str, ...]  # metrics passed to on_step
    progress_keys: tuple[str, ...]  # metrics the progress bar shows (updated once per log interval)
    required: tuple[str, ...]  # entries a resumable single-file checkpoint must hold

    def dataset(self) -> tuple[Dataset, Callable | None]: ...
    def check_resume(self, checkpoint: Mapping[str, Any], path: str) -> None: ...
    def build(self, device: torch.device) -> dict[str, nn.Module]: ...
    def blocks(self, name: str) -> tuple[type[nn.Module], ...] | None: ...
    def optimizers(self, modules: Mapping[str, nn.Module]) -> dict[str, tuple[str, torch.optim.Optimizer]]: ...
    def phases(self, wrapped: Mapping[str, nn.Module], precision: str) -> list[Phase]: ...
    def checkpoint_state(self) -> dict[str, Any]: ...
    def config_json(self) -> dict[str, Any]: ...


def fit(cfg: RunConfig, task: Task, on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train (or resume) ``task`` as ``cfg`` says; see the module docstring.

    :param on_step: called on rank 0 after each step with ``(step, {key: value})`` for the task's
        ``report_keys`` (host-synchronising: for tests and small runs)
    """
    cfg.validate()
    with distributed(cfg.device) as info:
        return _Run(cfg, task, info).run(on_step)


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    return type(batch)(_to(x, device) for x in batch)


def _split(batch: Any, n: int) -> list[Any]:
    """A batch (a tensor or a tuple/list of tensors, batch dim 0) as ``n`` equal micro-batches."""
    if n == 1:
        return [batch]
    if isinstance(batch, Tensor):
        return list(batch.chunk(n))
    parts = [_split(x, n) for x in batch]
    return [type(batch)(p[i] for p in parts) for i in range(n)]


class _Run:
    def __init__(self, cfg: RunConfig, task: Task, info: DistInfo) -> None:
        self.cfg, self.task, self.info = cfg, task, info
        self.device = info.device
        self.sharded = cfg.parallel == "fsdp"

    # -- set-up --------------------------------------------------------------------------------
    def _batch_sizes(self) -> int:
        cfg, world = self.cfg, self.info.world_size
        if cfg.global_batch_size % world:
            raise UsageError(f"global batch size {cfg.global_batch_size} is not divisible by the {world} "
                             f"processes: pick a multiple of {world}")
        local = cfg.global_batch_size // world
        if local % cfg.grad_accum:
            raise UsageError(f"the per-process batch of {local} (global {cfg.global_batch_size} over {world} "
                             f"processes) does not split into --grad-accum {cfg.grad_accum} equal micro-batches")
        return local

    def _resume(self) -> tuple[str | None, dict[str, Any] | None]:
        path = resume_path(self.cfg.resume, self.cfg.out_dir)
        if path is None:
            return None, None
        ckpt = load_checkpoint(path, kind=self.task.kind, map_location="cpu", tensors=False)
        self.task.check_resume(ckpt, path)
        changed = run_defining_diff(self.cfg, ckpt.get("config") or {})
        if changed and not self.cfg.allow_config_change:
            details = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, a, b in changed[:6])
            raise UsageError(f"cannot resume from {path!r} with other settings ({details}): the run would silently "
                             "change. Use the checkpoint's settings, --allow-config-change to resume anyway, or a "
                             "new --out-dir")
        need = ("steps",) if os.path.isdir(path) else self.task.required
        missing = [k for k in need if k not in ckpt]
        if missing:
            raise UsageError(f"checkpoint {path!r} lacks {missing}: not a training checkpoint")
        return path, ckpt

    def _restore_rng(self, ckpt: Mapping[str, Any], path: str, step: int) -> None:
        info = self.info
        rngs = ckpt.get("rng") or []
        if len(rngs) == info.world_size:
            restore_rng(rngs[info.rank], self.device)
        else:
            warnings.warn(f"{path} was written by {len(rngs)} process(es), this run has {info.world_size}: "
                          "data order and model state resume exactly, random draws (dropout) do not", stacklevel=3)
            seed_everything(self.cfg.seed * info.world_size + info.rank + step)

    def _wrap(self, modules: dict[str, nn.Module], ema: EMA | None) -> dict[str, nn.Module]:
        cfg, info = self.cfg, self.info
        wrapped = {}
        for name, module in modules.items():
            blocks = self.task.blocks(name)  # None: a small module, replicated (DDP) even under FSDP
            if cfg.activation_checkpointing and blocks:
                apply_activation_checkpointing(module, blocks)
            if self.sharded and blocks is not None:
                shard(module, blocks, info, mixed_precision=self.device.type == "cuda")
                wrapped[name] = module
            else:
                wrapped[name] = wrap_ddp(module, info)
        if self.sharded and ema is not None:
            # The EMA copy shards as the model does, so its update stays local to each rank.
            shard(ema.model, self.task.blocks("model"), info)
        if cfg.compile:
            wrapped["model"] = torch.compile(wrapped["model"])
        return wrapped

    # -- the run -------------------------------------------------------------------------------
    def run(self, on_step: Callable[[int, dict[str, float]], None] | None) -> TrainResult:
        t_start = time.perf_counter()
        cfg, task, info, device = self.cfg, self.task, self.info, self.device
        self.precision = precision = resolve_precision(cfg.precision, device)
        enable_tf32(device)
        local_batch = self._batch_sizes()
        # The run folder before anything else: an earlier run is continued or moved aside, never rewritten.
        moved = prepare_run_dir(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite, is_main=info.is_main)
        if info.is_main:
            for line in clean_stale_files(cfg.out_dir) + ([f"the earlier run moved to {moved}"] if moved else []):
                print(f"{task.command}: {line}", file=sys.stderr)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(cfg.out_dir, "PREEMPTED"))
        barrier(info)

        # Data first: a bad folder should fail before any model is built.
        dataset, collate_fn = task.dataset()
        sampler = ResumableSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                   seed=cfg.seed)
        steps_per_epoch = sampler.num_samples // local_batch
        if steps_per_epoch == 0:
            raise UsageError(f"the data has {len(dataset)} items, fewer than one global batch of "
                             f"{cfg.global_batch_size}: lower --batch-size or add data")
        max_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch

        # A bad checkpoint should fail before any model is built, too.
        path, meta = self._resume()
        full = load_checkpoint(path, map_location="cpu") if path and not os.path.isdir(path) else None

        # The same initial weights on every rank (DDP would broadcast rank 0's anyway), whatever the world size.
        torch.manual_seed(cfg.seed)
        modules = task.build(device)
        self.model = model = modules["model"]
        if full is not None:
            for name, module in modules.items():
                module.load_state_dict(full[name])
        ema = EMA(model, cfg.ema_decay) if cfg.ema else None
        if ema is not None and full is not None:
            if "ema" in full:
                ema.load_state_dict(full["ema"])
            else:
                warnings.warn(f"{path}: no EMA weights in the checkpoint; the EMA restarts from the model",
                              stacklevel=2)
                ema.update(model, decay=0.0)
        step = 0
        if meta is not None:
            step = int(meta["steps"])
            self._restore_rng(meta, path, step)
        else:
            # Official per-rank seed for everything random after the initialisation.
            seed_everything(cfg.seed * info.world_size + info.rank)

        if info.is_main:
            os.makedirs(cfg.out_dir, exist_ok=True)
            with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
                json.dump(task.config_json(), f, indent=2)

        wrapped = self._wrap(modules, ema)
        optimizers = task.optimizers(modules)
        owned = {key: (modules[owner], opt) for key, (owner, opt) in optimizers.items()}
        if full is not None:
            for key, (owner, opt) in owned.items():
                if self.sharded:
                    set_full_optimizer_state(full[key], owner, opt)
                else:
                    opt.load_state_dict(full[key])
        elif path is not None:  # a sharded checkpoint: every rank reads its part, resharded to this run
            load_sharded(path, modules, owned, ema.model if ema is not None else None, info)
        del full
        for module in modules.values():
            module.train()
        phases = task.phases(wrapped, precision)

        metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
        logger = MetricsLogger(metrics_path, enabled=info.is_main, resume_step=step if path else None)
        progress = Progress(max_steps, initial=step, desc=task.command, enabled=info.is_main and not cfg.quiet)
        timer = StepTimer(device)
        means = MetricMeans(info)
        stop = StopRequest(parse_signals(cfg.stop_signals), info)
        pending: tuple[int, dict[str, float], Any] | None = None  # a log record whose values are in flight
        last_metrics: dict[str, float] = {}
        ckpt_path = None
        preempted = False

        def write_log() -> None:
            nonlocal pending, last_metrics
            if pending is not None:
                at, extra, values = pending
                last_metrics = {**read_means(values), **extra}
                logger.log(at, **last_metrics)
                progress.show({k: v for k, v in last_metrics.items() if k in task.progress_keys})
                pending = None

        def checkpoint(final: bool) -> str | None:
            state: dict[str, Any] = {"steps": step, "epoch": step // steps_per_epoch, "rng": _gather_rng(info),
                                     "world_size": info.world_size, **task.checkpoint_state()}
            keep = bool(cfg.keep_every) and (step % cfg.keep_every == 0 or final)
            if self.sharded:
                for name in ["last.dcp"] + ([f"step_{step:07d}.dcp"] if keep else []):
                    save_sharded(os.path.join(cfg.out_dir, name), modules, owned,
                                 ema.model if ema is not None else None, state, task.kind, info)
                return os.path.join(cfg.out_dir, "last.dcp")
            saved = None
            if info.is_main:
                state.update({name: unwrap(m).state_dict() for name, m in modules.items()})
                state.update({key: opt.state_dict() for key, (_, opt) in owned.items()})
                if ema is not None:
                    state["ema"] = ema.state_dict()
                saved = save_checkpoint(os.path.join(cfg.out_dir, "last.pt"), state, task.kind)
                if keep:
                    save_checkpoint(os.path.join(cfg.out_dir, f"step_{step:07d}.pt"), state, task.kind)
            barrier(info)
            return saved

        try:
            batches = epoch_batches(dataset, sampler, local_batch, step, max_steps, cfg.num_workers, device,
                                    collate_fn)
            for epoch, batch in batches:
                values = self._step(phases, owned, ema, _split(_to(batch, device), cfg.grad_accum), step + 1)
                step += 1
                timer.tick()
                means.add(values)
                write_log()  # the previous interval's record: its copy to the host is done by now
                if on_step is not None and info.is_main:
                    on_step(step, {key: values[key].item() for key in task.report_keys})
                progress.update(1)
                preempted = stop.poll()
                if step % cfg.log_every == 0 or step == max_steps or preempted:
                    sec, rate = timer.rate()
                    extra = {"lr": next(iter(owned.values()))[1].param_groups[0]["lr"], "epoch": epoch,
                             "sec_per_step": sec, task.rate_key: rate * cfg.global_batch_size}
                    if hasattr(dataset, "failed_reads"):  # images unreadable since the scan, skipped (this rank)
                        extra["skipped_images"] = dataset.failed_reads.value
                    pending = (step, extra, means.flush())
                if preempted:
                    break
                if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < max_steps:
                    ckpt_path = checkpoint(final=False)
            write_log()
            ckpt_path = checkpoint(final=not preempted)
            if preempted and info.is_main:
                with open(os.path.join(cfg.out_dir, "PREEMPTED"), "w") as f:
                    f.write(f"{step}\n")
        finally:
            stop.close()
            progress.close()
            logger.close()
        return TrainResult(step, cfg.out_dir, ckpt_path, metrics_path, last_metrics, time.perf_counter() - t_start,
                           preempted)

    def _step(self, phases: list[Phase], owned: Mapping[str, tuple[nn.Module, Any]], ema: EMA | None,
              micro: list[Any], gstep: int) -> dict[str, Tensor]:
        """One training step: each phase over the micro-batches, then its clip and optimizer step."""
        device, n_micro = self.device, len(micro)
        values: dict[str, Tensor] = {}
        for phase in phases:
            if not phase.active(gstep):
                zero = torch.zeros((), device=device)
                values.update({key: zero for key in phase.idle})
                continue
            opt = owned[phase.optimizer][1]
            opt.zero_grad(set_to_none=True)
            for i, mb in enumerate(micro):
                with grad_sync(phase.module, i == n_micro - 1):
                    with autocast(device, self.precision):
                        loss, vals = phase.loss(i, mb, gstep)
                    (loss / n_micro if n_micro > 1 else loss).backward()
                for key, v in vals.items():
                    v = v.detach().float() / n_micro if n_micro > 1 else v.detach().float()
                    values[key] = values[key] + v if key in values else v
            values[phase.grad_norm_key] = clip_grad_norm(phase.params, self.cfg.max_grad_norm, device)
            opt.step()
            if phase.ema and ema is not None:
                ema.update(self.model)
        return values
