"""``fqgan train-tokenizer``: the official two-optimizer FQGAN tokenizer step, as a task of the one loop
(:func:`fqgan.train.loop.fit`).

Per step, as showlab/FQGAN ``tokenizer/vq_train_{dual,triple}.py`` (from LlamaGen ``vq_train.py``):

1. generator step: ``out = model(x)`` (bf16 autocast on GPU), ``TokenizerLoss.generator_loss``
   (pixel + perceptual + adaptive * disc_weight(step) * GAN + quantizer terms + feature-prediction
   InfoNCE), backward, clip to ``max_grad_norm``, Adam step, EMA update;
2. discriminator step: ``TokenizerLoss.discriminator_loss`` on ``x`` and ``sg[out.reconstruction]``
   (weight 0 before ``disc_start``, where the official loop still runs it; ``skip_disc_until_start``
   skips it there), backward, clip, Adam step.

The task owns the tokenizer, its loss (LPIPS, teachers, the discriminator), the two optimizers and
the feature predictors' freezing; the loop owns everything else (resume, DDP/FSDP, accumulation, logs).
Under FSDP the tokenizer's adapters, encoder and decoder are the sharded units; the discriminator,
small, is replicated.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from fqgan.data import ImageFolder, build_dataset, collate
from fqgan.data.scan import FolderIndex, read_classes_file, scan_image_folder
from fqgan.runtime.dist import all_ranks_reach_here, rank_world
from fqgan.runtime.errors import UsageError
from fqgan.tokenizer import FQTokenizer
from fqgan.tokenizer.adapter import FactorizedAdapter
from fqgan.tokenizer.blocks import Decoder, Encoder
from fqgan.tokenizer.load import CHECKPOINT_KIND
from fqgan.tokenizer.losses import TokenizerLoss

from .config import TokenizerTrainConfig
from .loop import Phase, TrainResult, fit

__all__ = ["TokenizerTask", "build_loss", "train_tokenizer"]


def _optimizer(params, cfg: TokenizerTrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.weight_decay > 0:
        return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def build_loss(cfg: TokenizerTrainConfig, teachers: Mapping[int, nn.Module] | None,
               lpips: nn.Module | None) -> TokenizerLoss:
    """The :class:`TokenizerLoss` of ``cfg`` (loading teachers and LPIPS from local files when needed)."""
    model_cfg = cfg.model
    if teachers is None and model_cfg.semantic_codebooks and cfg.loss.semantic_weight > 0:
        from fqgan.tokenizer.teachers import load_teachers

        paths = None
        if cfg.teachers is not None:
            if len(cfg.teachers) != len(model_cfg.semantic_codebooks):
                raise UsageError(f"{len(cfg.teachers)} teachers given for {len(model_cfg.semantic_codebooks)} "
                                 f"feature predictors (sub-codebooks {list(model_cfg.semantic_codebooks)})")
            paths = {i: t for i, t in zip(model_cfg.semantic_codebooks, cfg.teachers) if t is not None}
        teachers = load_teachers(model_cfg, paths)
    return TokenizerLoss(cfg.loss, model_cfg, teachers=teachers, lpips=lpips,
                         vgg16_weights=cfg.vgg16_weights, lpips_weights=cfg.lpips_weights)


class TokenizerTask:
    """The FQGAN tokenizer's part of :func:`~fqgan.train.loop.fit` (see the module docstring)."""

    kind = CHECKPOINT_KIND
    command = "train-tokenizer"
    rate_key = "images_per_sec"
    report_keys = ("loss_gen", "loss_disc")
    required = ("model", "optimizer", "discriminator", "optimizer_disc", "steps")

    def __init__(self, cfg: TokenizerTrainConfig, teachers: Mapping[int, nn.Module] | None = None,
                 lpips: nn.Module | None = None) -> None:
        if cfg.parallel == "fsdp" and cfg.loss.disc_adaptive_weight:
            raise UsageError("--disc-adaptive-weight takes a gradient at the decoder's last layer, which FSDP "
                             "shards: use --parallel ddp with it")
        self.cfg, self._teachers, self._lpips = cfg, teachers, lpips
        self.names = cfg.model.codebook_names
        self.progress_keys = ("loss_gen", "rec", *(f"usage_{n}" for n in self.names))
        self._recons: list[Tensor] = []  # reconstructions of this step's micro-batches, for the D step

    def dataset(self) -> tuple[Dataset, Callable]:
        c = self.cfg
        if c.data == "sample":
            return build_dataset(c.data, c.model.image_size, augment=True, seed=c.seed,
                                 sample_length=c.sample_length), collate
        return ImageFolder(c.data, c.model.image_size, augment=True, seed=c.seed, index=self._index(),
                           skip_unreadable=True), collate

    def _index(self) -> FolderIndex:
        """The image folder's checked index: scanned by rank 0 (kept in the run folder, where a resumed run
        finds it and does not scan again), read by the other ranks."""
        c = self.cfg
        cache = os.path.join(c.out_dir, "data_index.json")
        rank, _ = rank_world()
        if rank == 0:
            index = FolderIndex.load(cache) if c.resume is not None else None
            if index is None or index.root != os.path.abspath(os.path.expanduser(c.data)):
                classes = read_classes_file(c.classes) if c.classes else None
                index = scan_image_folder(os.path.abspath(os.path.expanduser(c.data)), classes=classes,
                                          bad_images=c.bad_images, progress=not c.quiet)
                os.makedirs(c.out_dir, exist_ok=True)
                index.save(cache)
                if index.bad:
                    with open(os.path.join(c.out_dir, "bad_images.txt"), "w") as f:
                        f.writelines(f"{p}\t{r}\n" for p, r in index.bad)
                    print(f"train-tokenizer: {len(index.bad)} unreadable images left out (--bad-images skip), listed "
                          f"in {os.path.join(c.out_dir, 'bad_images.txt')}", file=sys.stderr)
        all_ranks_reach_here()
        return index if rank == 0 else FolderIndex.load(cache)

    def check_resume(self, checkpoint: Mapping[str, Any], path: str) -> None:
        saved = checkpoint.get("config", {}).get("model")
        if saved is None:
            return
        mine = self.cfg.model.to_dict()
        diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if diff:
            details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {mine.get(k)!r}" for k in diff[:6])
            raise UsageError(f"cannot resume from {path!r}: it was trained with another model config ({details}); "
                             f"use the same --preset/model flags, or start a new --out-dir")

    def build(self, device: torch.device) -> dict[str, nn.Module]:
        self.model = FQTokenizer(self.cfg.model).to(device)
        self.loss = build_loss(self.cfg, self._teachers, self._lpips).to(device)
        # Feature predictors without a teacher (semantic loss off) get no gradient: freeze them, so that DDP
        # does not wait for their gradients and the optimizer holds no state for them.
        for i in self.cfg.model.semantic_codebooks:
            if str(i) not in self.loss.teachers:
                self.model.feature_predictors[str(i)].requires_grad_(False)
        return {"model": self.model, "discriminator": self.loss.discriminator}

    def blocks(self, name: str) -> tuple[type[nn.Module], ...] | None:
        return (FactorizedAdapter, Encoder, Decoder) if name == "model" else None

    def optimizers(self, modules: Mapping[str, nn.Module]) -> dict[str, tuple[str, torch.optim.Optimizer]]:
        return {"optimizer": ("model", _optimizer(modules["model"].parameters(), self.cfg)),
                "optimizer_disc": ("discriminator", _optimizer(modules["discriminator"].parameters(), self.cfg))}

    def phases(self, wrapped: Mapping[str, nn.Module], precision: str) -> list[Phase]:
        self.loss.train()  # LPIPS dropout and the discriminator's BatchNorm, as the official loop
        model, loss_fn, disc = wrapped["model"], self.loss, wrapped["discriminator"]
        names, semantic = self.names, self.cfg.model.semantic_codebooks

        def generator(i: int, images: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor]]:
            if i == 0:
                self._recons = []
            out = model(images)
            g = loss_fn.generator_loss(images, out, step, last_layer=self.model.last_layer)
            self._recons.append(out.reconstruction.detach())
            values = {"loss_gen": g.loss, "rec": g.reconstruction, "perceptual": g.perceptual,
                      "adversarial": g.adversarial, "disentangle": g.quantizer.disentangle,
                      "adaptive_weight": g.adaptive_weight, "disc_weight": g.disc_weight}
            for j, name in enumerate(names):
                values[f"codebook_{name}"] = g.quantizer.codebook[j]
                values[f"commit_{name}"] = g.quantizer.commitment[j]
                values[f"entropy_{name}"] = g.quantizer.entropy[j]
                values[f"perplexity_{name}"] = out.losses.perplexity[j]
                # Codes used within the quantizer's window: averaged over the log interval and the ranks.
                values[f"usage_{name}"] = out.losses.usage[j]
            for j, s in enumerate(semantic[: g.semantic.numel()]):
                values[f"semantic_{names[s]}"] = g.semantic[j]
            return g.loss, values

        def discriminator(i: int, images: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor]]:
            d = loss_fn.discriminator_loss(images, self._recons[i], step, discriminator=disc)
            return d.loss, {"loss_disc": d.loss, "logits_real": d.logits_real, "logits_fake": d.logits_fake}

        disc_always = not self.cfg.skip_disc_until_start
        return [
            Phase("optimizer", model, list(self.model.parameters()), lambda i, b, s: generator(i, b[0], s),
                  "grad_norm", ema=True),
            Phase("optimizer_disc", disc, list(self.loss.discriminator.parameters()),
                  lambda i, b, s: discriminator(i, b[0], s), "grad_norm_disc",
                  active=lambda s: disc_always or loss_fn.discriminator_active(s),
                  idle=("loss_disc", "logits_real", "logits_fake", "grad_norm_disc")),
        ]

    def checkpoint_state(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "model_config": self.cfg.model.to_dict()}

    def config_json(self) -> dict[str, Any]:
        return self.cfg.to_dict()


def train_tokenizer(cfg: TokenizerTrainConfig, *, teachers: Mapping[int, nn.Module] | None = None,
                    lpips: nn.Module | None = None,
                    on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train (or resume) an FQGAN tokenizer as described by ``cfg``; see the module docstring.

    :param teachers: frozen feature teachers ``{sub-codebook index: module}``; default: loaded from
        ``cfg.teachers`` / the model config's names (:func:`fqgan.tokenizer.teachers.load_teachers`) when
        the semantic loss is on
    :param lpips: a ready perceptual-loss module (default: built from local weight files when
        ``cfg.loss.perceptual_weight > 0``)
    :param on_step: called on rank 0 after each step with ``(step, {"loss_gen": ..., "loss_disc": ...})``
        (host-synchronising: for tests and small runs)
    """
    cfg.validate()
    return fit(cfg, TokenizerTask(cfg, teachers, lpips), on_step)
