"""Training configurations: dataclasses that the CLI fills in and checkpoints store.

Defaults are the official ones (showlab/FQGAN ``tokenizer/vq_train_{dual,triple}.py`` argparse
defaults and ``train_fqgan_*.sh``; ``autoregressive/train/train_c2i_*.py`` for the generator), so a
run with no flags is the released recipe at the chosen preset, except where a comment says why not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fqgan.tokenizer.config import TokenizerConfig, TokenizerLossConfig, get_preset


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass
class RunConfig:
    """What every training loop shares: data, optimisation, bookkeeping."""

    out_dir: str = "runs/tokenizer"
    data: str = "sample"  # "sample" (built-in set) or an image folder
    sample_length: int = 512  # crops per epoch of the built-in set
    num_workers: int = 4  # DataLoader workers per process (0: load in the training process)
    global_batch_size: int = 128  # split evenly over the processes
    max_steps: int | None = None  # None: epochs * steps per epoch
    epochs: int = 40
    lr: float = 1e-4  # the released scripts pass --lr 2e-4 at global batch 256
    beta1: float = 0.9
    beta2: float = 0.95
    # The official scripts declare --weight-decay 5e-2 but build torch.optim.Adam without it, so the
    # effective value is 0; a non-zero value here switches to AdamW (decoupled decay).
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    ema: bool = False
    ema_decay: float = 0.9999
    seed: int = 0  # global seed: rank r seeds with seed * world_size + r (official)
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU), bf16, fp32
    compile: bool = False
    log_every: int = 100  # steps between metrics records (and rank-averaged loss lines)
    ckpt_every: int = 5000  # steps between checkpoints (last.pt is rewritten; 0: only at the end)
    keep_every: int = 0  # also keep step_XXXXXXX.pt every this many steps (0: only last.pt)
    resume: str | None = None  # a checkpoint path, or "auto": out_dir/last.pt when it exists
    quiet: bool = False  # no progress bar

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        _positive("global_batch_size", self.global_batch_size)
        _positive("epochs", self.epochs)
        _positive("log_every", self.log_every)
        _positive("sample_length", self.sample_length)
        if self.max_steps is not None:
            _positive("max_steps", self.max_steps)
        for name in ("ckpt_every", "keep_every", "num_workers", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("weight_decay and max_grad_norm must be >= 0")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")


@dataclass
class TokenizerTrainConfig(RunConfig):
    """``fqgan train-tokenizer``: the model, its losses, and the run."""

    model: TokenizerConfig = field(default_factory=lambda: get_preset("fqgan-dual-16"))
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    # Semantic teachers per feature head, overriding the model config's names (e.g. "tiny-teacher",
    # or a local folder of weights); None: the model config's ``teachers``.
    teachers: tuple[str | None, ...] | None = None
    # The official loop runs the discriminator step from step 1, with weight 0 before disc_start (its
    # gradients are zero; Adam's step count and BatchNorm statistics still move). True skips it until
    # disc_start: about a quarter less compute per step there, for runs that never reach disc_start.
    skip_disc_until_start: bool = False
    vgg16_weights: str | None = None  # LPIPS backbone file (else $FQGAN_VGG16_WEIGHTS, torch hub cache)
    lpips_weights: str | None = None  # LPIPS v0.1 heads (else $FQGAN_LPIPS_WEIGHTS, the lpips wheel's copy)

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.model, TokenizerConfig):
            raise TypeError(f"model must be a TokenizerConfig, got {type(self.model).__name__}")
        if not isinstance(self.loss, TokenizerLossConfig):
            raise TypeError(f"loss must be a TokenizerLossConfig, got {type(self.loss).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for the checkpoint and ``config.json``)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("model", "loss")}
        out["teachers"] = None if self.teachers is None else list(self.teachers)
        out["model"] = self.model.to_dict()
        out["loss"] = dataclasses.asdict(self.loss)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenizerTrainConfig:
        data = dict(data)
        model = TokenizerConfig.from_dict(data.pop("model"))
        loss = TokenizerLossConfig(**data.pop("loss"))
        teachers = data.pop("teachers", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TokenizerTrainConfig fields: {unknown}")
        return cls(model=model, loss=loss, teachers=None if teachers is None else tuple(teachers), **data)


@dataclass
class GeneratorTrainConfig(RunConfig):
    """``fqgan train-generator``: a FAR preset sized by the code folder, and the run.

    Defaults are the official ``train_c2i_{dual,triple}.py`` ones: AdamW (decay 0.05 on matrices and
    embeddings, none on biases and norms), lr 1e-4, betas (0.9, 0.95), clipping 1.0, global batch 256,
    300 epochs, dropout 0.1 (residual, FFN, token), class dropout 0.1.
    """

    out_dir: str = "runs/generator"
    codes: str = "codes"  # a folder written by `fqgan extract-codes`
    preset: str = "FAR-B"
    # FARConfig fields to override (k, V, T and the class count come from the code folder).
    model_overrides: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None  # None: the code folder's class count
    global_batch_size: int = 256
    epochs: int = 300
    weight_decay: float = 0.05
    ckpt_every: int = 5000

    def validate(self) -> None:
        super().validate()
        if self.num_classes is not None:
            _positive("num_classes", self.num_classes)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["model_overrides"] = dict(self.model_overrides)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GeneratorTrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown GeneratorTrainConfig fields: {unknown}")
        return cls(**data)
