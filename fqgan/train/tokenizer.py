"""``fqgan train-tokenizer``: the official two-optimizer FQGAN tokenizer loop.

Per step, as showlab/FQGAN ``tokenizer/vq_train_{dual,triple}.py`` (from LlamaGen ``vq_train.py``):

1. generator step: ``out = model(x)`` (bf16 autocast on GPU), ``TokenizerLoss.generator_loss``
   (pixel + perceptual + adaptive * disc_weight(step) * GAN + quantizer terms + feature-prediction
   InfoNCE), backward, clip to ``max_grad_norm``, Adam step, EMA update;
2. discriminator step: ``TokenizerLoss.discriminator_loss`` on ``x`` and ``sg[out.reconstruction]``
   (weight 0 before ``disc_start``, where the official loop still runs it; ``skip_disc_until_start``
   skips it there), backward, clip, Adam step.

Single process, or one process per device under torchrun (DDP: gloo on CPU, nccl on GPU; the
tokenizer and the discriminator each in their own DDP wrapper). The data order, augmentation and
every RNG are checkpointed, so a resumed run continues exactly as the uninterrupted one would
(bit for bit on CPU).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from fqgan.data import build_dataset, collate
from fqgan.tokenizer import FQTokenizer
from fqgan.tokenizer.losses import DiscriminatorLoss, TokenizerLoss

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
from .config import TokenizerTrainConfig

CHECKPOINT_KIND = "fqgan-tokenizer"


def _optimizer(params, cfg: TokenizerTrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.weight_decay > 0:
        return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def _check_resume_config(ckpt: Mapping[str, Any], cfg: TokenizerTrainConfig, path: str) -> None:
    saved = ckpt.get("config", {}).get("model")
    if saved is None:
        return
    mine = cfg.model.to_dict()
    diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
    if diff:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {mine.get(k)!r}" for k in diff[:6])
        raise ValueError(f"cannot resume from {path!r}: it was trained with another model config ({details}); "
                         f"use the same --preset/model flags, or start a new --out-dir")


def resolve_resume(cfg: TokenizerTrainConfig) -> str | None:
    """The checkpoint to resume from: ``cfg.resume``, or with ``"auto"`` ``out_dir/last.pt`` if present."""
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        path = os.path.join(cfg.out_dir, "last.pt")
        return path if os.path.exists(path) else None
    return cfg.resume


def train_tokenizer(cfg: TokenizerTrainConfig, *, teachers: Mapping[int, nn.Module] | None = None,
                    lpips: nn.Module | None = None,
                    on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train (or resume) an FQGAN tokenizer as described by ``cfg``; see the module docstring.

    :param teachers: frozen feature teachers ``{sub-codebook index: module}``; default: loaded from
        ``cfg.teachers`` / the model config's names (:func:`fqgan.teachers.load_teachers`) when the
        semantic loss is on
    :param lpips: a ready perceptual-loss module (default: built from local weight files when
        ``cfg.loss.perceptual_weight > 0``)
    :param on_step: called on rank 0 after each step with ``(step, {"loss_gen": ..., "loss_disc": ...})``
        (host-synchronising: for tests and small runs)
    """
    cfg.validate()
    owns_group = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(cfg.device)
    try:
        return _train(cfg, info, teachers, lpips, on_step)
    finally:
        if owns_group:
            teardown_distributed()


def build_loss(cfg: TokenizerTrainConfig, teachers: Mapping[int, nn.Module] | None,
               lpips: nn.Module | None) -> TokenizerLoss:
    """The :class:`TokenizerLoss` of ``cfg`` (loading teachers and LPIPS from local files when needed)."""
    model_cfg = cfg.model
    if teachers is None and model_cfg.semantic_codebooks and cfg.loss.semantic_weight > 0:
        from fqgan.teachers import load_teachers

        paths = None
        if cfg.teachers is not None:
            if len(cfg.teachers) != len(model_cfg.semantic_codebooks):
                raise ValueError(f"{len(cfg.teachers)} teachers given for {len(model_cfg.semantic_codebooks)} "
                                 f"feature heads (sub-codebooks {list(model_cfg.semantic_codebooks)})")
            paths = {i: t for i, t in zip(model_cfg.semantic_codebooks, cfg.teachers) if t is not None}
        teachers = load_teachers(model_cfg, paths)
    return TokenizerLoss(cfg.loss, model_cfg, teachers=teachers, lpips=lpips,
                         vgg16_weights=cfg.vgg16_weights, lpips_weights=cfg.lpips_weights)


def _train(cfg: TokenizerTrainConfig, info: DistInfo, teachers, lpips, on_step) -> TrainResult:
    t_start = time.perf_counter()
    device = info.device
    precision = resolve_precision(cfg.precision, device)
    if device.type == "cuda":
        # As the official script: TF32 for the fp32 matmuls/convs that autocast leaves in fp32.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.global_batch_size % info.world_size:
        raise ValueError(f"global batch size {cfg.global_batch_size} is not divisible by the {info.world_size} "
                         f"processes: pick a multiple of {info.world_size}")
    local_batch = cfg.global_batch_size // info.world_size

    # Data first: a bad folder should fail before any model is built.
    dataset = build_dataset(cfg.data, cfg.model.image_size, augment=True, seed=cfg.seed,
                            sample_length=cfg.sample_length)
    sampler = ResumableSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed)
    steps_per_epoch = sampler.num_samples // local_batch
    if steps_per_epoch == 0:
        raise ValueError(f"the data has {len(dataset)} images, fewer than one global batch of "
                         f"{cfg.global_batch_size}: lower --batch-size or add images")
    max_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch

    # A bad checkpoint should fail before any model is built, too.
    resume_path = resolve_resume(cfg)
    ckpt = None
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path, kind=CHECKPOINT_KIND, map_location="cpu")
        _check_resume_config(ckpt, cfg, resume_path)
        missing = [k for k in ("model", "optimizer", "discriminator", "optimizer_disc", "steps") if k not in ckpt]
        if missing:
            raise ValueError(f"checkpoint {resume_path!r} lacks {missing}: not a training checkpoint")

    # The same initial weights on every rank (DDP would broadcast rank 0's anyway), whatever the world size.
    torch.manual_seed(cfg.seed)
    model = FQTokenizer(cfg.model).to(device)
    loss_fn = build_loss(cfg, teachers, lpips).to(device)
    # Feature heads without a teacher (semantic loss off) get no gradient: freeze them, so that DDP does
    # not wait for their gradients and the optimizer does not hold state for them.
    for i in cfg.model.semantic_codebooks:
        if str(i) not in loss_fn.teachers:
            model.feat_heads[str(i)].requires_grad_(False)
    ema = EMA(model, cfg.ema_decay) if cfg.ema else None
    opt = _optimizer(model.parameters(), cfg)
    opt_disc = _optimizer(loss_fn.discriminator.parameters(), cfg)

    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        loss_fn.discriminator.load_state_dict(ckpt["discriminator"])
        opt.load_state_dict(ckpt["optimizer"])
        opt_disc.load_state_dict(ckpt["optimizer_disc"])
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
        # Official per-rank seed for everything random after the initialisation.
        seed_everything(cfg.seed * info.world_size + info.rank)

    if info.is_main:
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)

    train_model: nn.Module = model
    disc: nn.Module = loss_fn.discriminator
    if info.distributed:
        ids = [device.index] if device.type == "cuda" else None
        train_model = DDP(model, device_ids=ids)
        disc = DDP(loss_fn.discriminator, device_ids=ids)
    if cfg.compile:
        train_model = torch.compile(train_model)
    model.train()
    loss_fn.train()

    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    logger = MetricsLogger(metrics_path, enabled=info.is_main, resume_step=step if resume_path else None)
    progress = Progress(max_steps, initial=step, desc="train-tokenizer", enabled=info.is_main and not cfg.quiet)
    timer = StepTimer(device)
    names = cfg.model.codebook_names
    sums: dict[str, torch.Tensor] = {}
    count = 0
    last_metrics: dict[str, float] = {}
    last_postfix = 0.0
    ckpt_path = None

    def accumulate(values: Mapping[str, torch.Tensor]) -> None:
        for key, v in values.items():
            v = v.detach().float()
            sums[key] = sums[key] + v if key in sums else v.clone()

    def checkpoint(final: bool) -> str | None:
        rngs = gather_rng(info)  # collective: every rank
        path = None
        if info.is_main:
            state = {
                "model": model.state_dict(),
                "discriminator": loss_fn.discriminator.state_dict(),
                "optimizer": opt.state_dict(),
                "optimizer_disc": opt_disc.state_dict(),
                "steps": step,
                "epoch": step // steps_per_epoch,
                "rng": rngs,
                "world_size": info.world_size,
                "config": cfg.to_dict(),
                "model_config": cfg.model.to_dict(),
            }
            if ema is not None:
                state["ema"] = ema.state_dict()
            path = save_checkpoint(os.path.join(cfg.out_dir, "last.pt"), state, CHECKPOINT_KIND)
            if cfg.keep_every and (step % cfg.keep_every == 0 or final):
                save_checkpoint(os.path.join(cfg.out_dir, f"step_{step:07d}.pt"), state, CHECKPOINT_KIND)
        barrier(info)
        return path

    try:
        batches = epoch_batches(dataset, sampler, local_batch, step, max_steps, cfg.num_workers, device, collate)
        for epoch, (images, _labels) in batches:
            images = images.to(device, non_blocking=True)
            gstep = step + 1  # the official loss counts steps from 1

            # -- generator (tokenizer) step
            opt.zero_grad(set_to_none=True)
            with autocast(device, precision):
                out = train_model(images)
                g = loss_fn.generator_loss(images, out, gstep, last_layer=model.last_layer)
            g.loss.backward()
            gnorm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                     if cfg.max_grad_norm > 0 else torch.zeros((), device=device))
            opt.step()
            if ema is not None:
                ema.update(model)

            # -- discriminator step
            if cfg.skip_disc_until_start and not loss_fn.discriminator_active(gstep):
                zero = torch.zeros((), device=device)
                d = DiscriminatorLoss(zero, zero, zero, zero)
                dnorm = zero
            else:
                opt_disc.zero_grad(set_to_none=True)
                with autocast(device, precision):
                    d = loss_fn.discriminator_loss(images, out.reconstruction.detach(), gstep,
                                                   discriminator=disc)
                d.loss.backward()
                dnorm = (torch.nn.utils.clip_grad_norm_(loss_fn.discriminator.parameters(), cfg.max_grad_norm)
                         if cfg.max_grad_norm > 0 else torch.zeros((), device=device))
                opt_disc.step()
            step += 1
            timer.tick()

            values = {"loss_gen": g.loss, "loss_disc": d.loss, "rec": g.reconstruction,
                      "perceptual": g.perceptual, "adversarial": g.adversarial, "disentangle": g.disentangle,
                      "adaptive_weight": g.adaptive_weight, "disc_weight": g.disc_weight,
                      "logits_real": d.logits_real, "logits_fake": d.logits_fake,
                      "grad_norm": gnorm, "grad_norm_disc": dnorm}
            for i, name in enumerate(names):
                values[f"codebook_{name}"] = g.codebook[i]
                values[f"commit_{name}"] = g.commitment[i]
                values[f"entropy_{name}"] = g.entropy[i]
                values[f"perplexity_{name}"] = out.losses.perplexity[i]
            for j, i in enumerate(cfg.model.semantic_codebooks[: g.semantic.numel()]):
                values[f"semantic_{names[i]}"] = g.semantic[j]
            accumulate(values)
            count += 1

            now = time.perf_counter()
            if on_step is not None and info.is_main:
                on_step(step, {"loss_gen": g.loss.item(), "loss_disc": d.loss.item()})
            if progress.bar is not None and (now - last_postfix > 0.5 or step == max_steps):
                last_postfix = now
                usage = out.losses.usage
                live = {"loss": g.loss.item(), "rec": g.reconstruction.item()}
                live.update({f"use_{n}": usage[i].item() for i, n in enumerate(names)})
                progress.update(1, **live)
            else:
                progress.update(1)

            if step % cfg.log_every == 0 or step == max_steps:
                means = {k: (v / count).item() for k, v in sums.items()}
                means = all_reduce_mean(means, info)
                for i, n in enumerate(names):
                    means[f"usage_{n}"] = out.losses.usage[i].item()
                sec, rate = timer.rate()
                last_metrics = {**means, "lr": opt.param_groups[0]["lr"], "epoch": epoch,
                                "sec_per_step": sec, "images_per_sec": rate * cfg.global_batch_size}
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
