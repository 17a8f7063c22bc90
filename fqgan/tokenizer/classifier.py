"""A small image classifier and the feature teacher made of it: FQGAN's semantic teacher with no download.

FQGAN trains its semantic sub-codebook to predict a frozen vision model's feature (CLIP or DINOv2,
:mod:`fqgan.tokenizer.teachers`). Where no such weights can be fetched, a classifier trained on the
training images themselves, with one class per photograph, stands in: :class:`ClassifierTeacher` maps
images in [-1, 1] to its penultimate feature ``[B, hidden_size]``, through the same interface as
:class:`~fqgan.tokenizer.teachers.FeatureTeacher` (a frozen module with ``hidden_size``). The same
classifier scores generated samples (the Classification Accuracy Score of Ravuri & Vinyals, 2019).

:class:`PhotoClassifier` is a VGG-style network for small images (the demo's 32x32 crops):
three stages of 3x3 convolutions with BatchNorm and ReLU, each halving the resolution, global average
pooling, ``Linear(widths[-1], feature_dim)`` + ReLU (the penultimate feature) and a linear class head.
Its training is :class:`fqgan.train.classifier.ClassifierTask` (the one loop); its checkpoint
(``kind == "fqgan-classifier"``) loads with :func:`load_classifier`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fqgan.runtime.checkpoint import CheckpointError, load_checkpoint
from fqgan.runtime.errors import UsageError
from fqgan.runtime.options import config_from_dict, config_to_dict

from .teachers import FrozenTeacher

__all__ = ["CHECKPOINT_KIND", "ClassifierConfig", "ClassifierTeacher", "PhotoClassifier", "load_classifier"]

CHECKPOINT_KIND = "fqgan-classifier"


@dataclass(frozen=True)
class ClassifierConfig:
    """:class:`PhotoClassifier`'s shape: class count, stage widths, feature width (the teacher's hidden size)."""

    num_classes: int = 19
    widths: tuple[int, ...] = (16, 32, 64)
    feature_dim: int = 64
    in_channels: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(self.widths))
        for name in ("num_classes", "feature_dim", "in_channels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UsageError(f"{name} must be a positive int, got {v!r}")
        if not self.widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in self.widths):
            raise UsageError(f"widths must be positive ints, got {self.widths}")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassifierConfig:
        return config_from_dict(cls, data)


def _conv(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class PhotoClassifier(nn.Module):
    """``images [B, 3, H, W]`` in [-1, 1] -> class logits ``[B, num_classes]``; :meth:`features` gives the
    penultimate feature ``[B, feature_dim]`` (after its ReLU), the input of the class head.

    Per stage ``s``: two 3x3 conv + BatchNorm + ReLU at width ``widths[s]`` (one at the first stage), then
    2x2 max pooling; then global average pooling, ``Linear -> ReLU`` to ``feature_dim``, ``Linear`` to classes.
    Any image side that survives ``len(widths)`` halvings works (the pooling is global)."""

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = c = config if config is not None else ClassifierConfig()
        layers: list[nn.Module] = []
        c_in = c.in_channels
        for s, width in enumerate(c.widths):
            layers += _conv(c_in, width) + ([] if s == 0 else _conv(width, width)) + [nn.MaxPool2d(2)]
            c_in = width
        self.trunk = nn.Sequential(*layers)
        self.project = nn.Sequential(nn.Linear(c_in, c.feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(c.feature_dim, c.num_classes)

    def features(self, images: Tensor) -> Tensor:
        """The penultimate feature ``[B, feature_dim]``."""
        if images.dim() != 4 or images.shape[1] != self.config.in_channels:
            raise UsageError(f"images must be [B, {self.config.in_channels}, H, W], got {tuple(images.shape)}")
        return self.project(self.trunk(images).mean(dim=(2, 3)))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """Class ids ``[B]`` (argmax of the logits), in eval mode, ``batch_size`` images at a time."""
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            return torch.cat([self(images[i:i + batch_size].to(device)).argmax(1).cpu()
                              for i in range(0, images.shape[0], batch_size)])
        finally:
            self.train(was_training)


class ClassifierTeacher(FrozenTeacher):
    """A frozen :class:`PhotoClassifier` as a feature teacher: ``images [B, 3, H, W]`` in [-1, 1] ->
    its penultimate feature ``[B, hidden_size]`` (what :class:`~fqgan.tokenizer.teachers.FeatureTeacher`'s
    CLS feature is for CLIP and DINOv2). Always in eval mode (BatchNorm uses its running statistics)."""

    def __init__(self, classifier: PhotoClassifier) -> None:
        super().__init__()
        self.classifier = classifier
        self.classifier.requires_grad_(False)
        self.classifier.eval()

    @property
    def hidden_size(self) -> int:
        """Width of the feature (the classifier's ``feature_dim``)."""
        return self.classifier.config.feature_dim

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.classifier.features(images)


def load_classifier(path: str | os.PathLike, device: torch.device | str = "cpu") -> PhotoClassifier:
    """The :class:`PhotoClassifier` of a ``fqgan-classifier`` checkpoint (``last.pt`` of
    :func:`fqgan.train.classifier.train_classifier`), in eval mode on ``device``.

    :raises MissingFileError: no file at ``path``
    :raises CheckpointError: unreadable, another kind of checkpoint, or without its model entries
    """
    ckpt = load_checkpoint(path, CHECKPOINT_KIND)
    if "model_config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"classifier checkpoint {path} lacks its 'model_config' or 'model' entry")
    model = PhotoClassifier(ClassifierConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()
