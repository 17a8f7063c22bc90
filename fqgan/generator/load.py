"""Loading a generator from a file: a ``fqgan train-generator`` checkpoint (``last.pt`` or a sharded
``last.dcp/``) or an official FAR checkpoint, beside :func:`~fqgan.generator.official.from_official`."""

from __future__ import annotations

import os
from typing import Any

import torch

from fqgan.runtime.checkpoint import META_FILE, load_checkpoint, load_torch_file
from fqgan.runtime.errors import UsageError

from .config import FARConfig
from .model import FAR
from .official import from_official

__all__ = ["CHECKPOINT_KIND", "load_generator"]

CHECKPOINT_KIND = "fqgan-generator"  # what `fqgan train-generator` writes


def load_generator(path: str | os.PathLike, weights: str = "auto",
                   device: str | torch.device = "cpu") -> tuple[FAR, dict[str, Any]]:
    """A FAR in eval mode from a ``train-generator`` checkpoint (``weights``: ``auto`` = EMA when present,
    ``ema``, ``model``) or an official FAR checkpoint (through :func:`fqgan.generator.from_official`),
    and the checkpoint's code-folder description (``{}`` for official files)."""
    if weights not in ("auto", "ema", "model"):
        raise UsageError(f"weights must be 'auto', 'ema' or 'model', got {weights!r}")
    # A sharded (FSDP) run's folder is gathered here; official training checkpoints also pickle their
    # argparse namespace, which load_torch_file allows.
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, META_FILE)):
        ckpt = load_checkpoint(path, CHECKPOINT_KIND)
    else:
        ckpt = load_torch_file(path, "generator checkpoint")
    if not isinstance(ckpt, dict):
        raise UsageError(f"generator checkpoint {os.fspath(path)!r} holds a {type(ckpt).__name__}, not a dict")
    kind = ckpt.get("kind")
    if kind is None:
        # "auto" means "EMA when present" for official files too (the released FAR checkpoints hold both).
        use_ema = weights == "ema" or (weights == "auto" and "ema" in ckpt)
        return from_official(ckpt, use_ema=use_ema).to(device).eval(), {}
    if kind != CHECKPOINT_KIND:
        raise UsageError(f"{os.fspath(path)!r} is a {kind!r} checkpoint, not a generator (train-generator) one")
    if weights == "ema" and "ema" not in ckpt:
        raise UsageError(f"generator checkpoint {os.fspath(path)!r} has no EMA weights (trained without --ema)")
    model = FAR(FARConfig(**ckpt["model_config"]))
    use_ema = weights != "model" and "ema" in ckpt
    model.load_state_dict(ckpt["ema"] if use_ema else ckpt["model"])
    return model.to(device).eval(), dict(ckpt.get("codes_meta") or {})
