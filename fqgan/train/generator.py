"""``fqgan train-generator``: the FAR training loop (official ``autoregressive/train/train_c2i_*.py``).

Per step: ``loss = model(codes, labels).loss`` (the mean over the k heads of the cross-entropy, through
``fk.linear_cross_entropy``; labels dropped to the null class with ``class_dropout_prob``) under bf16
autocast on GPU, backward, clip to ``max_grad_norm``, AdamW step, EMA update. Single process or torchrun
DDP; checkpoints and exact resume as the tokenizer loop (:mod:`fqgan.train.common`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from fqgan.codes import CodeDataset, CodesMeta
from fqgan.generator import FAR, FARConfig

from .common import (
    EMA,
    DistInfo,
    MetricsLogger,
    Progress,
    ResumableSampler,
    StepTimer,
    TrainResult,
    all_reduce_mean,
    autocast,
    barrier,
    epoch_batches,
    gather_rng,
    init_distributed,
    load_checkpoint,
    resolve_precision,
    restore_rng,
    save_checkpoint,
    seed_everything,
    teardown_distributed,
)
from .config import GeneratorTrainConfig

CHECKPOINT_KIND = "fqgan-generator"


def model_config_for(cfg: GeneratorTrainConfig, meta: CodesMeta) -> FARConfig:
    """The FAR config of ``cfg.preset`` sized by the code folder: k = its sub-codebooks, V = its
    codebook size, T = its grid squared, classes = ``cfg.num_classes`` or its class count.

    As the official ``train_c2i_*.py``, a ``drop_path_rate > 0`` turns the residual and FFN dropout off
    (token and label dropout stay) unless ``resid_dropout_p`` / ``ffn_dropout_p`` are overridden too."""
    num_classes = cfg.num_classes if cfg.num_classes is not None else max(meta.num_classes, 1)
    if num_classes < meta.num_classes:
        raise ValueError(f"--num-classes {num_classes} is smaller than the {meta.num_classes} classes of the codes")
    sized = {"num_factors": meta.num_codebooks, "vocab_size": meta.codebook_size,
             "block_size": meta.grid_size ** 2, "num_classes": num_classes}
    clash = {k: v for k, v in cfg.model_overrides.items() if k in sized and v != sized[k]}
    if clash:
        name = next(iter(clash))
        raise ValueError(f"model override {name}={clash[name]} does not match the codes ({name}={sized[name]}: "
                         f"k, codebook size and grid come from the tokenizer that wrote them)")
    config = FARConfig.from_preset(cfg.preset, **{**cfg.model_overrides, **sized})
    if config.drop_path_rate > 0:
        # Official: `dropout_p = 0.0 if args.drop_path_rate > 0.0 else args.dropout_p` (resid and FFN only).
        off = {name: 0.0 for name in ("resid_dropout_p", "ffn_dropout_p") if name not in cfg.model_overrides}
        config = dataclasses.replace(config, **off)
    return config


def far_optimizer(model: nn.Module, cfg: GeneratorTrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Official ``creat_optimizer``: AdamW, weight decay on parameters with >= 2 dims only (fused on CUDA)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)


def _resume_path(cfg: GeneratorTrainConfig) -> str | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        path = os.path.join(cfg.out_dir, "last.pt")
        return path if os.path.exists(path) else None
    return cfg.resume


def train_generator(cfg: GeneratorTrainConfig, *,
                    on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train (or resume) a FAR generator on a code folder as described by ``cfg`` (module docstring).

    :param on_step: called on rank 0 after each step with ``(step, {"loss": ...})`` (host sync: tests)
    """
    cfg.validate()
    owns_group = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(cfg.device)
    try:
        return _train(cfg, info, on_step)
    finally:
        if owns_group:
            teardown_distributed()


def _train(cfg: GeneratorTrainConfig, info: DistInfo, on_step) -> TrainResult:
    t_start = time.perf_counter()
    device = info.device
    precision = resolve_precision(cfg.precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.global_batch_size % info.world_size:
        raise ValueError(f"global batch size {cfg.global_batch_size} is not divisible by the {info.world_size} "
                         f"processes: pick a multiple of {info.world_size}")
    local_batch = cfg.global_batch_size // info.world_size

    dataset = CodeDataset(cfg.codes, augment=True, seed=cfg.seed)
    meta = dataset.meta
    sampler = ResumableSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed)
    steps_per_epoch = sampler.num_samples // local_batch
    if steps_per_epoch == 0:
        raise ValueError(f"the code folder has {len(dataset)} images, fewer than one global batch of "
                         f"{cfg.global_batch_size}: lower --batch-size")
    max_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    model_cfg = model_config_for(cfg, meta)

    resume_path = _resume_path(cfg)
    ckpt = None
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path, kind=CHECKPOINT_KIND, map_location="cpu")
        saved = ckpt.get("model_config")
        if saved is not None and saved != dataclasses.asdict(model_cfg):
            diff = sorted(k for k in saved if saved.get(k) != dataclasses.asdict(model_cfg).get(k))
            raise ValueError(f"cannot resume from {resume_path!r}: it holds a FAR with other settings "
                             f"({', '.join(f'{k}: {saved[k]!r}' for k in diff[:6])}); use the same codes, "
                             f"--preset and model flags, or a new --out-dir")
        missing = [k for k in ("model", "optimizer", "steps") if k not in ckpt]
        if missing:
            raise ValueError(f"checkpoint {resume_path!r} lacks {missing}: not a training checkpoint")

    torch.manual_seed(cfg.seed)
    model = FAR(model_cfg).to(device)
    ema = EMA(model, cfg.ema_decay) if cfg.ema else None
    opt = far_optimizer(model, cfg, device)

    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if ema is not None:
            if "ema" in ckpt:
                ema.load_state_dict(ckpt["ema"])
            else:
                warnings.warn(f"{resume_path}: no EMA weights in the checkpoint; the EMA restarts from the model",
                              stacklevel=2)
                ema.update(model, decay=0.0)
        step = int(ckpt["steps"])
        rngs = ckpt.get("rng") or []
        if len(rngs) == info.world_size:
            restore_rng(rngs[info.rank], device)
        else:
            warnings.warn(f"{resume_path} was written by {len(rngs)} process(es), this run has {info.world_size}: "
                          "data order and model state resume exactly, random draws (dropout) do not", stacklevel=2)
            seed_everything(cfg.seed * info.world_size + info.rank + step)
        del ckpt
    else:
        seed_everything(cfg.seed * info.world_size + info.rank)

    if info.is_main:
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump({**cfg.to_dict(), "model": dataclasses.asdict(model_cfg)}, f, indent=2)

    train_model: nn.Module = model
    if info.distributed:
        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)
    model.train()

    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    logger = MetricsLogger(metrics_path, enabled=info.is_main, resume_step=step if resume_path else None)
    progress = Progress(max_steps, initial=step, desc="train-generator", enabled=info.is_main and not cfg.quiet)
    timer = StepTimer(device)
    names = list(meta.codebook_names)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    last_metrics: dict[str, float] = {}
    last_postfix = 0.0
    ckpt_path = None

    def checkpoint(final: bool) -> str | None:
        rngs = gather_rng(info)
        path = None
        if info.is_main:
            state: dict[str, Any] = {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "steps": step,
                "epoch": step // steps_per_epoch, "rng": rngs, "world_size": info.world_size,
                "config": cfg.to_dict(), "model_config": dataclasses.asdict(model_cfg),
                "codes_meta": meta.to_dict(),
            }
            if ema is not None:
                state["ema"] = ema.state_dict()
            path = save_checkpoint(os.path.join(cfg.out_dir, "last.pt"), state, CHECKPOINT_KIND)
            if cfg.keep_every and (step % cfg.keep_every == 0 or final):
                save_checkpoint(os.path.join(cfg.out_dir, f"step_{step:07d}.pt"), state, CHECKPOINT_KIND)
        barrier(info)
        return path

    try:
        for epoch, (codes, labels) in epoch_batches(dataset, sampler, local_batch, step, max_steps,
                                                     cfg.num_workers, device):
            codes = codes.to(device, non_blocking=True)  # [B, k, T]
            labels = labels.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with autocast(device, precision):
                out = train_model(codes, labels)
            out.loss.backward()
            gnorm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                     if cfg.max_grad_norm > 0 else torch.zeros((), device=device))
            opt.step()
            if ema is not None:
                ema.update(model)
            step += 1
            timer.tick()

            values: dict[str, torch.Tensor] = {"loss": out.loss.detach(), "grad_norm": gnorm.detach()}
            for i, n in enumerate(names[: out.per_head.numel()]):
                values[f"loss_{n}"] = out.per_head[i].detach()
            for key, v in values.items():
                v = v.float()
                sums[key] = sums[key] + v if key in sums else v.clone()
            count += 1

            now = time.perf_counter()
            if on_step is not None and info.is_main:
                on_step(step, {"loss": out.loss.item()})
            if progress.bar is not None and (now - last_postfix > 0.5 or step == max_steps):
                last_postfix = now
                progress.update(1, loss=out.loss.item(),
                                **{f"loss_{n}": out.per_head[i].item() for i, n in enumerate(names)})
            else:
                progress.update(1)

            if step % cfg.log_every == 0 or step == max_steps:
                means = all_reduce_mean({k: (v / count).item() for k, v in sums.items()}, info)
                sec, rate = timer.rate()
                last_metrics = {**means, "lr": opt.param_groups[0]["lr"], "epoch": epoch, "sec_per_step": sec,
                                "codes_per_sec": rate * cfg.global_batch_size}
                logger.log(step, **last_metrics)
                sums.clear()
                count = 0
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < max_steps:
                ckpt_path = checkpoint(final=False)
        ckpt_path = checkpoint(final=True)
    finally:
        progress.close()
        logger.close()
    return TrainResult(step, cfg.out_dir, ckpt_path, metrics_path, last_metrics, time.perf_counter() - t_start)


def load_generator(path: str | os.PathLike, weights: str = "auto",
                   device: str | torch.device = "cpu") -> tuple[FAR, dict[str, Any]]:
    """A FAR in eval mode from a ``train-generator`` checkpoint (``weights``: ``auto`` = EMA when present,
    ``ema``, ``model``) or an official FAR checkpoint (through :func:`fqgan.generator.from_official`),
    and the checkpoint's code-folder description (``{}`` for official files)."""
    if weights not in ("auto", "ema", "model"):
        raise ValueError(f"weights must be 'auto', 'ema' or 'model', got {weights!r}")
    from fqgan.tokenizer.weights import load_torch_file

    # Official training checkpoints also pickle their argparse namespace, which this loader allows.
    ckpt = load_torch_file(path, "generator checkpoint")
    if not isinstance(ckpt, dict):
        raise ValueError(f"generator checkpoint {os.fspath(path)!r} holds a {type(ckpt).__name__}, not a dict")
    kind = ckpt.get("kind")
    if kind is None:
        from fqgan.generator import from_official

        return from_official(ckpt, use_ema=weights == "ema").to(device).eval(), {}
    if kind != CHECKPOINT_KIND:
        raise ValueError(f"{os.fspath(path)!r} is a {kind!r} checkpoint, not a generator (train-generator) one")
    if weights == "ema" and "ema" not in ckpt:
        raise ValueError(f"generator checkpoint {os.fspath(path)!r} has no EMA weights (trained without --ema)")
    model = FAR(FARConfig(**ckpt["model_config"]))
    use_ema = weights != "model" and "ema" in ckpt
    model.load_state_dict(ckpt["ema"] if use_ema else ckpt["model"])
    return model.to(device).eval(), dict(ckpt.get("codes_meta") or {})
