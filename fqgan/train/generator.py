"""``fqgan train-generator``: the FAR training step (official ``autoregressive/train/train_c2i_*.py``), as a
task of the one loop (:func:`fqgan.train.loop.fit`).

Per step: ``loss = model(codes, labels).loss`` (the mean over the k heads of the cross-entropy, through
``fk.linear_cross_entropy``; labels dropped to the null class with ``class_dropout_prob``) under bf16
autocast on GPU, backward, clip to ``max_grad_norm``, AdamW step, EMA update. Under FSDP each transformer
block (trunk and factorized AR head) is a sharded unit and an activation-checkpointing block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from fqgan.data.codes import CodeDataset, CodesMeta
from fqgan.generator import FAR, FARConfig
from fqgan.generator.load import CHECKPOINT_KIND
from fqgan.generator.model import TransformerBlock
from fqgan.runtime.errors import UsageError

from .config import GeneratorTrainConfig
from .loop import Phase, TrainResult, fit

__all__ = ["GeneratorTask", "far_optimizer", "model_config_for", "train_generator"]


def model_config_for(cfg: GeneratorTrainConfig, meta: CodesMeta) -> FARConfig:
    """The FAR config of ``cfg.preset`` sized by the code folder: k = its sub-codebooks, V = its
    codebook size, T = its grid squared, classes = ``cfg.num_classes`` or its class count.

    As the official ``train_c2i_*.py``, a ``drop_path_rate > 0`` turns the residual and FFN dropout off
    (token and label dropout stay) unless ``resid_dropout_p`` / ``ffn_dropout_p`` are overridden too."""
    num_classes = cfg.num_classes if cfg.num_classes is not None else max(meta.num_classes, 1)
    if num_classes < meta.num_classes:
        raise UsageError(f"--num-classes {num_classes} is smaller than the {meta.num_classes} classes of the codes")
    sized = {"num_factors": meta.num_codebooks, "vocab_size": meta.codebook_size,
             "block_size": meta.grid_size ** 2, "num_classes": num_classes}
    clash = {k: v for k, v in cfg.model_overrides.items() if k in sized and v != sized[k]}
    if clash:
        name = next(iter(clash))
        raise UsageError(f"model override {name}={clash[name]} does not match the codes ({name}={sized[name]}: "
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


class GeneratorTask:
    """FAR's part of :func:`~fqgan.train.loop.fit` (see the module docstring)."""

    kind = CHECKPOINT_KIND
    command = "train-generator"
    rate_key = "codes_per_sec"
    report_keys = ("loss",)
    progress_keys = ("loss",)
    required = ("model", "optimizer", "steps")

    def __init__(self, cfg: GeneratorTrainConfig) -> None:
        self.cfg = cfg

    def dataset(self) -> tuple[Dataset, None]:
        data = CodeDataset(self.cfg.codes, augment=True, seed=self.cfg.seed)
        self.meta = data.meta
        self.names = list(data.meta.codebook_names)
        self.model_cfg = model_config_for(self.cfg, data.meta)
        return data, None

    def check_resume(self, checkpoint: Mapping[str, Any], path: str) -> None:
        saved, mine = checkpoint.get("model_config"), dataclasses.asdict(self.model_cfg)
        if saved is not None and saved != mine:
            diff = sorted(k for k in saved if saved.get(k) != mine.get(k))
            raise UsageError(f"cannot resume from {path!r}: it holds a FAR with other settings "
                             f"({', '.join(f'{k}: {saved[k]!r}' for k in diff[:6])}); use the same codes, "
                             f"--preset and model flags, or a new --out-dir")

    def build(self, device: torch.device) -> dict[str, nn.Module]:
        self.model = FAR(self.model_cfg).to(device)
        return {"model": self.model}

    def blocks(self, name: str) -> tuple[type[nn.Module], ...]:
        return (TransformerBlock,)

    def optimizers(self, modules: Mapping[str, nn.Module]) -> dict[str, tuple[str, torch.optim.Optimizer]]:
        return {"optimizer": ("model", far_optimizer(modules["model"], self.cfg,
                                                     next(modules["model"].parameters()).device))}

    def phases(self, wrapped: Mapping[str, nn.Module], precision: str) -> list[Phase]:
        model, names = wrapped["model"], self.names

        def loss(i: int, batch: tuple[Tensor, Tensor], step: int) -> tuple[Tensor, dict[str, Tensor]]:
            codes, labels = batch  # [B, k, T], [B]
            out = model(codes, labels)
            values = {"loss": out.loss}
            values.update({f"loss_{n}": out.per_head[j] for j, n in enumerate(names[: out.per_head.numel()])})
            return out.loss, values

        return [Phase("optimizer", model, list(self.model.parameters()), loss, "grad_norm", ema=True)]

    def checkpoint_state(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "model_config": dataclasses.asdict(self.model_cfg),
                "codes_meta": self.meta.to_dict()}

    def config_json(self) -> dict[str, Any]:
        return {**self.cfg.to_dict(), "model": dataclasses.asdict(self.model_cfg)}


def train_generator(cfg: GeneratorTrainConfig, *,
                    on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train (or resume) a FAR generator on a code folder as described by ``cfg`` (module docstring).

    :param on_step: called on rank 0 after each step with ``(step, {"loss": ...})`` (host sync: tests)
    """
    cfg.validate()
    return fit(cfg, GeneratorTask(cfg), on_step)
