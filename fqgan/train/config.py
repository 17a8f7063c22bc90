"""Training configurations: dataclasses that the CLI fills in and checkpoints store.

Defaults are the official ones (showlab/FQGAN ``tokenizer/vq_train_{dual,triple}.py`` argparse
defaults and ``train_fqgan_*.sh``; ``autoregressive/train/train_c2i_*.py`` for the generator), so a
run with no flags is the released recipe at the chosen preset, except where a comment says why not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fqgan.generator.config import PRESETS as FAR_PRESETS
from fqgan.runtime.errors import UsageError, UsageTypeError
from fqgan.runtime.options import option
from fqgan.runtime.parallel import PARALLEL_MODES
from fqgan.runtime.signals import DEFAULT_STOP_SIGNALS, parse_signals
from fqgan.tokenizer.config import TokenizerConfig, TokenizerLossConfig, get_preset

# Fields of the "run" section: how a run executes, not what it computes; a resumed run may change them.
_RUN = {"group": "run", "runtime": True}


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name} must be a positive int, got {value!r}")


@dataclass
class RunConfig:
    """What every training loop shares: data, optimisation, parallelism, bookkeeping."""

    out_dir: str = option("runs/tokenizer", "writes last.pt (last.dcp/ under FSDP), metrics.jsonl and config.json "
                          "here", **_RUN)
    data: str = option("sample", "image folder (any depth; labels from the first-level folders) or 'sample' for the "
                       "built-in photographs", group="data")
    sample_length: int = option(512, "random crops per epoch of the sample set", group="data")
    num_workers: int = option(4, "data-loading processes per training process (0: load in the training process)",
                              group="data", runtime=True)
    global_batch_size: int = option(128, "global batch size, split over the processes (and micro-batches)",
                                    flag="--batch-size", group="optimisation")
    max_steps: int | None = option(None, "training steps (default: --epochs worth)", flag="--steps",
                                   group="optimisation", runtime=True)
    epochs: int = option(40, "epochs (when --steps is not given)", group="optimisation", runtime=True)
    lr: float = option(1e-4, "learning rate (the released scripts pass 2e-4 at global batch 256)",
                       group="optimisation")
    beta1: float = option(0.9, "Adam beta1", group="optimisation")
    beta2: float = option(0.95, "Adam beta2", group="optimisation")
    # The official scripts declare --weight-decay 5e-2 but build torch.optim.Adam without it, so the
    # effective value is 0; a non-zero value here switches to AdamW (decoupled decay).
    weight_decay: float = option(0.0, "weight decay", group="optimisation")
    max_grad_norm: float = option(1.0, "gradient clipping, 0 disables", group="optimisation")
    grad_accum: int = option(1, "micro-batches per optimizer step: each process's share of --batch-size is cut "
                             "into N, their gradients summed (memory of a batch N times smaller)",
                             group="optimisation", runtime=True)
    ema: bool = option(False, "keep an EMA of the weights (saved as 'ema'; may be turned on when resuming)",
                       group="optimisation", runtime=True)
    ema_decay: float = option(0.9999, "EMA decay", group="optimisation")
    seed: int = option(0, "global seed: rank r seeds with seed * world_size + r (official)", group="optimisation")
    device: str = option("auto", "auto, cpu, cuda, cuda:N", **_RUN)
    precision: str = option("auto", "autocast dtype (auto = bf16 on GPU, fp32 on CPU)",
                            choices=("auto", "bf16", "fp32"), **_RUN)
    parallel: str = option("ddp", "data parallelism under torchrun: ddp (full copies) or fsdp (FSDP2: parameters, "
                           "gradients and optimizer state sharded; sharded checkpoints)", choices=PARALLEL_MODES,
                           **_RUN)
    activation_checkpointing: bool = option(False, "recompute the activations of the model's blocks (FAR's "
                                            "transformer blocks; the tokenizer's adapters, encoder and decoder) in "
                                            "backward: less memory, about a third more compute", **_RUN)
    compile: bool = option(False, "torch.compile the model", **_RUN)
    log_every: int = option(100, "steps per metrics.jsonl record", **_RUN)
    ckpt_every: int = option(5000, "steps between rewrites of last.pt, 0: only at the end", **_RUN)
    keep_every: int = option(0, "also keep step_XXXXXXX.pt every this many steps (0: only last.pt)", **_RUN)
    resume: str | None = option(None, "continue from a checkpoint; 'auto': OUT_DIR/last.pt (or last.dcp) when it "
                                "exists", metavar="CKPT|auto", **_RUN)
    quiet: bool = option(False, "no progress bar", **_RUN)
    overwrite: bool = option(False, "start a new run in an --out-dir that holds one: its files move to "
                             "OUT_DIR/previous/<time>/ (nothing is deleted)", **_RUN)
    stop_signals: str = option(DEFAULT_STOP_SIGNALS, "signals that end the run with a checkpoint at the current "
                               "step and exit code 75 (comma-separated; '' for none)", **_RUN)
    allow_config_change: bool = option(False, "resume although the batch size, seed, data, optimiser, model or "
                                       "loss settings differ from the checkpoint's", **_RUN)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        _positive("global_batch_size", self.global_batch_size)
        _positive("epochs", self.epochs)
        _positive("log_every", self.log_every)
        _positive("sample_length", self.sample_length)
        _positive("grad_accum", self.grad_accum)
        parse_signals(self.stop_signals)
        if self.parallel not in PARALLEL_MODES:
            raise UsageError(f"parallel must be one of {PARALLEL_MODES}, got {self.parallel!r}")
        if self.max_steps is not None:
            _positive("max_steps", self.max_steps)
        for name in ("ckpt_every", "keep_every", "num_workers", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise UsageError(f"{name} must be an int >= 0, got {v!r}")
        if not self.lr > 0:
            raise UsageError(f"lr must be > 0, got {self.lr}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UsageError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise UsageError("weight_decay and max_grad_norm must be >= 0")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise UsageError(f"ema_decay must be in [0, 1], got {self.ema_decay}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise UsageError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")


@dataclass
class TokenizerTrainConfig(RunConfig):
    """``fqgan train-tokenizer``: the model, its losses, and the run."""

    model: TokenizerConfig = field(default_factory=lambda: get_preset("fqgan-dual-16"))
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    # Semantic teachers per feature predictor, overriding the model config's names (e.g. "tiny-teacher",
    # or a local folder of weights); None: the model config's ``teachers``.
    teachers: tuple[str | None, ...] | None = option(
        None, "a teacher's save_pretrained folder, once per feature predictor in sub-codebook order (default: the "
        "preset's teacher names, looked up under $FQGAN_TEACHERS_DIR and the Hugging Face cache)", flag="--teacher",
        metavar="DIR", group="weight files (local only: nothing is downloaded)", runtime=True)
    # The official loop runs the discriminator step from step 1, with weight 0 before disc_start (its
    # gradients are zero; Adam's step count and BatchNorm statistics still move). True skips it until
    # disc_start: about a quarter less compute per step there, for runs that never reach disc_start.
    classes: str | None = option(None, "a file of class names, one per line, in label order: fixes the labels of "
                                 "an image folder (a listed class may then be empty or missing)", metavar="FILE",
                                 group="data")
    bad_images: str = option("error", "unreadable images found by the check before step 1: 'error' stops and lists "
                             "them, 'skip' trains without them (listed in OUT_DIR/bad_images.txt)",
                             choices=("error", "skip"), group="data", runtime=True)
    skip_disc_until_start: bool = option(False, "skip the discriminator step before --disc-start (the official "
                                         "loop runs it with weight 0)", group="losses (official VQLoss options)")
    vgg16_weights: str | None = option(None, "torchvision vgg16-397923af.pth for LPIPS (default: "
                                       "$FQGAN_VGG16_WEIGHTS, torch hub cache)", metavar="FILE",
                                       group="weight files (local only: nothing is downloaded)", runtime=True)
    lpips_weights: str | None = option(None, "LPIPS v0.1 vgg.pth linear layers (default: $FQGAN_LPIPS_WEIGHTS, the "
                                       "lpips wheel's copy)", metavar="FILE",
                                       group="weight files (local only: nothing is downloaded)", runtime=True)

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.model, TokenizerConfig):
            raise UsageTypeError(f"model must be a TokenizerConfig, got {type(self.model).__name__}")
        if not isinstance(self.loss, TokenizerLossConfig):
            raise UsageTypeError(f"loss must be a TokenizerLossConfig, got {type(self.loss).__name__}")

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
            raise UsageError(f"unknown TokenizerTrainConfig fields: {unknown}")
        return cls(model=model, loss=loss, teachers=None if teachers is None else tuple(teachers), **data)


@dataclass
class GeneratorTrainConfig(RunConfig):
    """``fqgan train-generator``: a FAR preset sized by the code folder, and the run.

    Defaults are the official ``train_c2i_{dual,triple}.py`` ones: AdamW (decay 0.05 on matrices and
    embeddings, none on biases and norms), lr 1e-4, betas (0.9, 0.95), clipping 1.0, global batch 256,
    300 epochs, dropout 0.1 (residual, FFN, token), class dropout 0.1.
    """

    out_dir: str = option("runs/generator", "writes last.pt (last.dcp/ under FSDP), metrics.jsonl and config.json "
                          "here", **_RUN)
    codes: str = option("codes", "code folder from `fqgan extract-codes` (sets k, the codebook size, the grid, the "
                        "classes)", metavar="DIR", group="model")
    preset: str = option("FAR-B", "FAR size (FAR-tiny for CPU runs)", choices=tuple(sorted(FAR_PRESETS)), group="model")
    # FARConfig fields to override (k, V, T and the class count come from the code folder).
    model_overrides: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = option(None, "class count of the label table (default: the code folder's)",
                                     group="model")
    global_batch_size: int = option(256, "global batch size, split over the processes (and micro-batches)",
                                    flag="--batch-size", group="optimisation")
    epochs: int = option(300, "epochs (when --steps is not given)", group="optimisation", runtime=True)
    weight_decay: float = option(0.05, "AdamW weight decay on matrices and embeddings", group="optimisation")

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
            raise UsageError(f"unknown GeneratorTrainConfig fields: {unknown}")
        return cls(**data)
