"""Training of the small image classifier (:class:`~fqgan.tokenizer.classifier.PhotoClassifier`), as a task
of the one loop (:func:`fqgan.train.loop.fit`).

Per step: ``loss = cross_entropy(model(images), labels)`` (optionally label-smoothed) under the run's
precision, clip, AdamW step. The demo trains it on the training region of the sample photographs (one
class per photograph) and uses it twice: its penultimate feature is the semantic sub-codebook's teacher
(:class:`~fqgan.tokenizer.classifier.ClassifierTeacher`), and it scores generated samples (CAS).
Checkpoints (``kind = "fqgan-classifier"``) hold ``model``, ``optimizer``, ``steps``, the RNG states,
``model_config`` and the class names; :func:`~fqgan.tokenizer.classifier.load_classifier` reads them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from fqgan.data import build_dataset, collate
from fqgan.runtime.errors import UsageError, UsageTypeError
from fqgan.runtime.options import option
from fqgan.tokenizer.classifier import CHECKPOINT_KIND, ClassifierConfig, PhotoClassifier

from .config import RunConfig
from .loop import Phase, TrainResult, fit

__all__ = ["ClassifierTask", "ClassifierTrainConfig", "train_classifier"]


@dataclass
class ClassifierTrainConfig(RunConfig):
    """A :class:`PhotoClassifier` and its run (AdamW with decay; small-image defaults)."""

    out_dir: str = option("runs/classifier", "writes last.pt, metrics.jsonl and config.json here", group="run")
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    image_size: int = option(32, "image side", group="data")
    lr: float = option(2e-3, "learning rate", group="optimisation")
    weight_decay: float = option(5e-4, "AdamW weight decay", group="optimisation")
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy", group="optimisation")

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.model, ClassifierConfig):
            raise UsageTypeError(f"model must be a ClassifierConfig, got {type(self.model).__name__}")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1:
            raise UsageError(f"image_size must be a positive int, got {self.image_size!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UsageError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        out["model"] = self.model.to_dict()
        return out


class ClassifierTask:
    """The classifier's part of :func:`~fqgan.train.loop.fit` (see the module docstring).

    :param dataset: the training images as ``(image, label)`` items (default: ``build_dataset(cfg.data)``
        with the training augmentation); its ``classes`` are stored with the checkpoint
    """

    kind = CHECKPOINT_KIND
    command = "train-classifier"
    rate_key = "images_per_sec"
    report_keys = ("loss",)
    progress_keys = ("loss", "accuracy")
    required = ("model", "optimizer", "steps")

    def __init__(self, cfg: ClassifierTrainConfig, dataset: Dataset | None = None) -> None:
        self.cfg, self._dataset = cfg, dataset

    def dataset(self) -> tuple[Dataset, Callable]:
        c = self.cfg
        data = self._dataset if self._dataset is not None else build_dataset(
            c.data, c.image_size, augment=True, seed=c.seed, sample_length=c.sample_length)
        self.classes = list(getattr(data, "classes", []))
        if self.classes and len(self.classes) > c.model.num_classes:
            raise UsageError(f"the data has {len(self.classes)} classes but the classifier has "
                             f"{c.model.num_classes} outputs")
        return data, collate

    def check_resume(self, checkpoint: Mapping[str, Any], path: str) -> None:
        saved = checkpoint.get("model_config")
        if saved is not None and saved != self.cfg.model.to_dict():
            raise UsageError(f"cannot resume from {path!r}: it holds a classifier of another shape ({saved}); "
                             "use the same settings or a new --out-dir")

    def build(self, device: torch.device) -> dict[str, nn.Module]:
        self.model = PhotoClassifier(self.cfg.model).to(device)
        return {"model": self.model}

    def blocks(self, name: str) -> tuple[type[nn.Module], ...] | None:
        return None  # small: replicated under DDP and FSDP alike

    def optimizers(self, modules: Mapping[str, nn.Module]) -> dict[str, tuple[str, torch.optim.Optimizer]]:
        c = self.cfg
        return {"optimizer": ("model", torch.optim.AdamW(modules["model"].parameters(), lr=c.lr,
                                                         betas=(c.beta1, c.beta2), weight_decay=c.weight_decay))}

    def phases(self, wrapped: Mapping[str, nn.Module], precision: str) -> list[Phase]:
        model, smoothing = wrapped["model"], self.cfg.label_smoothing

        def loss(i: int, batch: tuple[Tensor, Tensor], step: int) -> tuple[Tensor, dict[str, Tensor]]:
            images, labels = batch  # [B, 3, H, W], [B]
            logits = model(images).float()
            value = F.cross_entropy(logits, labels, label_smoothing=smoothing)
            return value, {"loss": value, "accuracy": (logits.argmax(1) == labels).float().mean()}

        return [Phase("optimizer", model, list(self.model.parameters()), loss, "grad_norm")]

    def checkpoint_state(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "model_config": self.cfg.model.to_dict(), "classes": self.classes}

    def config_json(self) -> dict[str, Any]:
        return self.cfg.to_dict()


def train_classifier(cfg: ClassifierTrainConfig, *, dataset: Dataset | None = None,
                     on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train (or resume) a :class:`PhotoClassifier` as ``cfg`` says, on ``dataset`` (default: ``cfg.data``).

    :param on_step: called on rank 0 after each step with ``(step, {"loss": ...})`` (host sync: tests)
    """
    cfg.validate()
    return fit(cfg, ClassifierTask(cfg, dataset), on_step)
