"""Finding and reading local weight files, with errors that say where we looked and what to do.

Nothing here downloads: every file comes from an argument, an environment variable or a known
local cache path.
"""

from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "WeightsNotFoundError", "check_state_dict", "find_file", "load_reason",
           "load_torch_file"]


class WeightsNotFoundError(FileNotFoundError, ValueError):
    """A weights file or directory is missing. Also a ``ValueError`` (bad input) and a
    ``FileNotFoundError``, so either ``except`` catches it."""


class CheckpointError(ValueError):
    """A weights file exists but cannot be used: corrupted, truncated, or not the expected layout."""


def find_file(what: str, path: str | os.PathLike | None, env: str | None, defaults: Iterable[Path] = (),
              how: str = "", directory: bool = False) -> Path:
    """The first existing candidate of: ``path`` (if given, the only candidate), ``$env``, ``defaults``.

    :raises WeightsNotFoundError: listing every place looked at and ``how`` to provide the file.
    """
    looked: list[str] = []
    if path is not None:
        candidates = [(Path(path).expanduser(), "argument")]
    else:
        candidates = []
        value = os.environ.get(env) if env else None
        if env and value:
            candidates.append((Path(value).expanduser(), f"${env}"))
        elif env:
            looked.append(f"${env} (not set)")
        candidates += [(Path(p), "default") for p in defaults]
    for candidate, source in candidates:
        ok = candidate.is_dir() if directory else candidate.is_file()
        if ok:
            return candidate
        looked.append(f"{candidate} ({source})")
    kind = "directory" if directory else "file"
    raise WeightsNotFoundError(f"{what}: no such {kind}. Looked at: " + "; ".join(looked) + (f". {how}" if how else ""))


def load_reason(exc: BaseException) -> str:
    """Why ``torch.load`` failed, in one line. For ``weights_only`` loads torch wraps the reason in advice
    that fits a trusted file with custom classes ("re-running with weights_only=False will likely
    succeed", "please file an issue"), which is wrong for a corrupted one: keep only the reason
    after "WeightsUnpickler error:" (e.g. "Unsupported operand 189")."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        tail = [line.strip() for line in text.split(marker, 1)[1].splitlines() if line.strip()]
        return tail[0] if tail else "the unpickler stopped"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def load_torch_file(path: str | os.PathLike, what: str, trusted: bool = False) -> Any:
    """``torch.load(path, map_location="cpu")`` restricted to tensors and plain containers (plus
    ``argparse.Namespace``, which the official training checkpoints hold under ``"args"``), unless
    ``trusted``. Unreadable files raise :class:`CheckpointError` naming the file and the cause."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"{what}: no such file {path}")
    try:
        if trusted:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, AttributeError,
            KeyError, IndexError) as e:
        reason = load_reason(e)
        if reason.startswith("Unsupported global"):  # a well-formed file that pickles classes
            raise CheckpointError(f"{what}: {path} holds Python objects beyond tensors and containers; if you trust "
                                  f"the file, load it with trusted=True. ({reason})") from e
        raise CheckpointError(f"{what}: {path} is not a readable PyTorch file (corrupted or truncated?): "
                              f"{reason}") from e


def check_state_dict(state: Any, what: str) -> Mapping[str, torch.Tensor]:
    """``state`` if it is a ``{str: Tensor}`` mapping, else :class:`CheckpointError`."""
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{what}: expected a state dict {{name: tensor}}, got {type(state).__name__}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{what}: entries that are not tensors: {bad[:8]}")
    return state
