"""Frozen feature teachers for FQGAN's representation loss: CLIP ViT and DINOv2 vision towers
(Hugging Face ``transformers``) loaded from local directories, with the official preprocessing.

Official (showlab/FQGAN ``tokenizer/models/{clip,dino}_encoder.py``): images in [-1, 1] are mapped to
[0, 1], resized to 224x224 with ``F.interpolate``'s default *nearest* mode, normalised with the
teacher's mean/std (OpenAI CLIP or ImageNet), and the teacher's CLS token is the target:
CLIP ``hidden_states[-1][:, 0]`` (the last encoder layer, before ``post_layernorm``), DINOv2
``last_hidden_state[:, 0]`` (after its final layernorm). FQGAN-Dual learns from CLIP ViT-L/14
(1024-d), FQGAN-Triple from DINOv2-S (384-d, mid level) and CLIP ViT-B/16 (768-d, high level).

DINOv2-S was trained at 518 pixels (a 37x37 patch grid); at 224 its position table is resampled to
16x16. FQGAN pins ``transformers==4.41.1`` (its ``requirements.txt``), whose ``Dinov2Embeddings``
resamples bicubically with ``scale_factor = (16 + 0.1) / 37``; newer releases pass ``size=(16, 16)``,
which samples other points (up to 0.22 of a source cell apart) and so gives other teacher features.
:func:`official_dinov2_positions` does the 4.41.1 resampling once, whatever version is installed.

A teacher directory is a ``save_pretrained`` directory (``config.json`` + weights), e.g. made with
``huggingface-cli download openai/clip-vit-large-patch14 --local-dir <root>/openai/clip-vit-large-patch14``
on a machine with network access. Lookup of a name: the ``root`` argument, else ``$FQGAN_TEACHERS_DIR``,
as ``<root>/<org>/<name>`` or ``<root>/<name>``; then the Hugging Face cache (offline).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fqgan.runtime.checkpoint import CheckpointError, MissingFileError
from fqgan.runtime.errors import UsageError
from fqgan.runtime.vision import import_torchvision

if TYPE_CHECKING:
    from fqgan.tokenizer.config import TokenizerConfig

__all__ = ["TEACHERS_ENV", "FeatureTeacher", "FrozenTeacher", "find_teacher", "load_teacher", "load_teachers",
           "official_dinov2_positions"]

TEACHERS_ENV = "FQGAN_TEACHERS_DIR"

# (mean, std) of each teacher family's official preprocessing.
OPENAI_CLIP_NORM = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_KINDS = {"clip_vision_model": "clip", "clip": "clip", "dinov2": "dinov2"}


def official_dinov2_positions(table: Tensor, patch_size: int, input_size: int) -> Tensor:
    """The position table a DINOv2 tower adds at ``input_size`` x ``input_size`` pixels under
    ``transformers==4.41.1`` (FQGAN's pinned version): ``[1, 1 + n*n, dim] -> [1, 1 + g*g, dim]``,
    g = ``input_size // patch_size``. The class position stays; the n x n patch grid is resampled
    bicubically (``align_corners=False``, in float32) with ``scale_factor = (g + 0.1) / n``, not to
    ``size=(g, g)`` as newer transformers do. The table itself when g = n.
    """
    n_pos = table.shape[1] - 1
    side = int(math.sqrt(n_pos))
    if side * side != n_pos:
        raise UsageError(f"DINOv2 position table of {n_pos} patch positions is not a square grid")
    g = input_size // patch_size
    if g == side:
        return table
    grid = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    scale = (g + 0.1) / math.sqrt(n_pos)
    grid = F.interpolate(grid, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    if tuple(grid.shape[-2:]) != (g, g):  # pragma: no cover - (g + 0.1) / n * n floors to g
        raise UsageError(f"resampled DINOv2 positions to {tuple(grid.shape[-2:])}, expected {(g, g)}")
    grid = grid.to(table.dtype).permute(0, 2, 3, 1).reshape(1, g * g, -1)
    return torch.cat([table[:, :1], grid], dim=1)


class FrozenTeacher(nn.Module):
    """What the tokenizer's semantic loss needs of a teacher: ``forward(images [B, 3, H, W] in [-1, 1]) ->
    features [B, hidden_size]``, and ``hidden_size``. It never trains: no gradients, and eval mode whatever
    ``train()`` is asked (a training loop's ``model.train()`` must not switch its dropout or BatchNorm on)."""

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Stays in eval mode (a frozen teacher), whatever ``mode``."""
        super().train(False)
        return self

    @property
    def hidden_size(self) -> int:
        """Width of the feature (the tokenizer's feature predictor must predict this many dimensions)."""
        raise NotImplementedError


class FeatureTeacher(FrozenTeacher):
    """A frozen vision tower that maps images ``[B, 3, H, W]`` in [-1, 1] to its CLS feature ``[B, hidden]``.

    :param model: a ``transformers`` ``CLIPVisionModel`` or ``Dinov2Model``
    :param kind: ``"clip"`` or ``"dinov2"`` (decides the normalisation and which output is the CLS)
    :param input_size: side of the resized input (224 officially, for both teachers)

    A DINOv2 tower's ``embeddings.position_embeddings`` is replaced, once, by the table of
    :func:`official_dinov2_positions` at ``input_size`` (so the tower no longer resamples it).
    """

    def __init__(self, model: nn.Module, kind: str, input_size: int = 224) -> None:
        super().__init__()
        if kind not in ("clip", "dinov2"):
            raise UsageError(f"kind must be 'clip' or 'dinov2', got {kind!r}")
        self.model, self.kind, self.input_size = model, kind, int(input_size)
        mean, std = OPENAI_CLIP_NORM if kind == "clip" else IMAGENET_NORM
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        if kind == "dinov2":
            embeddings = model.embeddings
            patch = model.config.patch_size
            patch = patch if isinstance(patch, int) else patch[0]
            with torch.no_grad():
                table = official_dinov2_positions(embeddings.position_embeddings.detach(), patch, self.input_size)
            # Both transformers lines skip their own resampling when the table fits the patch grid.
            embeddings.position_embeddings = nn.Parameter(table, requires_grad=False)
        self.model.requires_grad_(False)
        self.model.eval()

    @property
    def hidden_size(self) -> int:
        """Width of the CLS feature."""
        return int(self.model.config.hidden_size)

    def preprocess(self, images: Tensor) -> Tensor:
        """``normalize(interpolate(images * 0.5 + 0.5, (s, s), mode="nearest"))``, s = input_size."""
        x = images * 0.5 + 0.5
        x = F.interpolate(x, (self.input_size, self.input_size))  # official: the default, nearest
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise UsageError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=self.preprocess(images).to(dtype))
        # CLIP: last_hidden_state is the last encoder layer's output (= hidden_states[-1]), before
        # post_layernorm; DINOv2: after its final layernorm. Both as the official code reads them.
        return out.last_hidden_state[:, 0].to(images.dtype)


def _model_type(directory: Path) -> str:
    cfg = directory / "config.json"
    try:
        model_type = json.loads(cfg.read_text()).get("model_type", "")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"teacher directory {directory}: cannot read {cfg}: {e}") from e
    if model_type not in _KINDS:
        raise CheckpointError(f"teacher directory {directory}: config.json has model_type {model_type!r}; "
                              f"expected one of {sorted(_KINDS)} (a CLIP or DINOv2 vision model)")
    return _KINDS[model_type]


def _hf_cache_candidates(name: str) -> list[Path]:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return []
    snapshots = Path(HF_HUB_CACHE) / f"models--{name.replace('/', '--')}" / "snapshots"
    return sorted(snapshots.glob("*"), reverse=True) if snapshots.is_dir() else [snapshots / "<revision>"]


def find_teacher(name_or_path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """The local directory of a teacher: ``name_or_path`` itself if it is a directory, else (for a
    name such as ``"openai/clip-vit-large-patch14"``) ``<root>/<name>``, ``<root>/<last part of name>``
    with root = ``root`` or ``$FQGAN_TEACHERS_DIR``, then the Hugging Face cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    looked: list[str] = []
    base = root if root is not None else os.environ.get(TEACHERS_ENV)
    candidates: list[Path] = []
    if base:
        candidates += [Path(base).expanduser() / name, Path(base).expanduser() / Path(name).name]
    else:
        looked.append(f"${TEACHERS_ENV} (not set)")
    if not path.is_absolute():
        candidates += _hf_cache_candidates(name)
    for c in candidates:
        if (c / "config.json").is_file():
            return c
        looked.append(str(c))
    raise MissingFileError(
        f"teacher {name!r}: no local directory with a config.json. Looked at: {'; '.join(looked)}. Download it "
        f"where there is network access (huggingface-cli download {name} --local-dir <dir>) and pass that "
        f"directory, or put it under <root>/{name} and set {TEACHERS_ENV}=<root>; or set semantic_weight=0.")


def load_teacher(name_or_path: str | os.PathLike, root: str | os.PathLike | None = None,
                 input_size: int = 224, dtype: torch.dtype | None = None) -> FeatureTeacher:
    """A :class:`FeatureTeacher` from a local ``save_pretrained`` directory (see :func:`find_teacher`);
    its kind (CLIP or DINOv2) is read from ``config.json``. Never touches the network."""
    directory = find_teacher(name_or_path, root)
    kind = _model_type(directory)
    with contextlib.suppress(ModuleNotFoundError):  # transformers imports torchvision whenever it is installed,
        import_torchvision()  # which beside the CPU torch only this door can (fqgan/runtime/vision.py)
    from transformers import CLIPVisionModel, Dinov2Model
    from transformers.utils import logging as hf_logging

    cls = CLIPVisionModel if kind == "clip" else Dinov2Model
    verbosity = hf_logging.get_verbosity()
    # A full CLIP directory (text + vision) makes transformers print every text key as unexpected;
    # we check the keys that matter -- the missing ones -- ourselves.
    hf_logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(str(directory), local_files_only=True, output_loading_info=True,
                                          **({"dtype": dtype} if dtype else {}))
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"teacher directory {directory}: cannot load a {cls.__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys", ())) + [str(m) for m in info.get("mismatched_keys", ())]
    if missing:
        raise CheckpointError(f"teacher directory {directory}: the {cls.__name__} weights are incomplete (they would "
                              f"be random): missing or misshapen {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return FeatureTeacher(model, kind, input_size)


def load_teachers(config: TokenizerConfig, paths: Mapping[int, str | os.PathLike] | None = None,
                  root: str | os.PathLike | None = None, input_size: int = 224) -> dict[int, FeatureTeacher]:
    """The teachers of ``config``'s feature predictors, ``{sub-codebook index: teacher}``, each from
    ``paths[i]`` if given, else by its name ``config.teachers[i]`` (see :func:`find_teacher`); checks
    that each teacher's hidden size equals its head's width."""
    teachers = {}
    for i in config.semantic_codebooks:
        source = (paths or {}).get(i, config.teachers[i])
        if source is None:
            raise UsageError(f"sub-codebook {i} has a feature predictor but config.teachers[{i}] is None and no path "
                             "was given")
        teacher = load_teacher(source, root, input_size)
        if teacher.hidden_size != config.feat_pred_dims[i]:
            raise UsageError(f"teacher {source} has hidden size {teacher.hidden_size} but the feature predictor of "
                             f"sub-codebook {i} predicts {config.feat_pred_dims[i]}-d features")
        teachers[i] = teacher
    return teachers
