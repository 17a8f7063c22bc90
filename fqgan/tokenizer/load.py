"""Loading a tokenizer from a file: a ``fqgan train-tokenizer`` checkpoint (``last.pt`` or a sharded
``last.dcp/``) or a released FQGAN-Dual/Triple checkpoint, beside :func:`~fqgan.tokenizer.official.from_official`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fqgan.runtime.checkpoint import (
    META_FILE,
    CheckpointError,
    MissingFileError,
    load_checkpoint,
    load_torch_file,
)
from fqgan.runtime.errors import UsageError

from .config import TokenizerConfig, get_preset
from .model import FQTokenizer
from .official import from_official

__all__ = ["CHECKPOINT_KIND", "checkpoint_file", "load_tokenizer"]

CHECKPOINT_KIND = "fqgan-tokenizer"  # what `fqgan train-tokenizer` writes


def checkpoint_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path when it is a file or a sharded checkpoint folder, else :class:`MissingFileError`."""
    p = Path(path).expanduser()
    if not (p.is_file() or (p / META_FILE).is_file()):
        what = "a directory: pass the checkpoint file inside it" if p.is_dir() else "not found"
        raise MissingFileError(f"tokenizer checkpoint {p} is {what} (looked for {p.resolve()})")
    return p


def load_tokenizer(path: str | os.PathLike, device: torch.device | str = "cpu", weights: str = "auto",
                   official_config: Any = None) -> FQTokenizer:
    """An :class:`~fqgan.tokenizer.FQTokenizer` in eval mode on ``device`` from either checkpoint kind:

    * ``fqgan train-tokenizer`` (``kind == "fqgan-tokenizer"``: ``model_config``, ``model``, ``ema``), a
      ``last.pt`` file or a sharded ``last.dcp`` folder;
    * an official FQGAN-Dual/Triple file (``{"model"|"ema"|"state_dict": ...}`` or a bare state
      dict), through :func:`~fqgan.tokenizer.official.from_official`.

    :param weights: ``"auto"`` (EMA weights when the file has them, as the official script),
        ``"ema"`` or ``"model"``.
    :param official_config: the :class:`~fqgan.tokenizer.TokenizerConfig` (or preset name) of an
        official checkpoint; default: inferred from its tensor shapes, with the released models'
        GroupNorm and attention-head counts. Ignored for ``train-tokenizer`` checkpoints (they store theirs).
    :raises MissingFileError: no file at ``path`` (a ``ValueError`` and a ``FileNotFoundError``).
    :raises CheckpointError: the file is unreadable or holds no tokenizer.
    """
    if weights not in ("auto", "ema", "model"):
        raise UsageError(f"weights must be 'auto', 'ema' or 'model', got {weights!r}")
    p = checkpoint_file(path)
    # A sharded (FSDP) run's folder is gathered here; official training checkpoints also pickle their
    # argparse namespace, which load_torch_file allows.
    ckpt = load_checkpoint(p, CHECKPOINT_KIND) if p.is_dir() else load_torch_file(p, "tokenizer checkpoint")
    if isinstance(ckpt, dict) and ckpt.get("kind") == CHECKPOINT_KIND:
        if "model_config" not in ckpt or "model" not in ckpt:
            raise CheckpointError(f"tokenizer checkpoint {p} lacks its 'model_config' or 'model' entry")
        if weights == "ema" and "ema" not in ckpt:
            raise CheckpointError(f"tokenizer checkpoint {p} has no EMA weights (trained without --ema)")
        model = FQTokenizer(TokenizerConfig.from_dict(ckpt["model_config"]))
        use_ema = weights != "model" and "ema" in ckpt
        model.load_state_dict(ckpt["ema"] if use_ema else ckpt["model"])
    elif isinstance(ckpt, dict) and "kind" in ckpt:
        raise CheckpointError(f"{p} is a {ckpt['kind']!r} checkpoint, not a tokenizer")
    else:
        if isinstance(official_config, str):
            official_config = get_preset(official_config)
        model = from_official(ckpt, official_config, weights=weights)
    return model.to(device).eval()
