"""Files in and out: atomic checkpoint save, safe loading, RNG state, the resume lookup, local weight
files, and the error types of the package's file input.

Nothing here downloads: every file comes from an argument, an environment variable or a known local
cache path. Every load is ``weights_only`` (tensors and plain containers: no pickled code runs) unless
the caller says the file is trusted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import random
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .dist import DistInfo
from .errors import CheckpointError, MissingFileError

__all__ = ["CHECKPOINT_FORMAT", "LAST", "META_FILE", "CheckpointError", "MissingFileError", "capture_rng",
           "check_state_dict", "find_file", "gather_rng", "load_checkpoint", "load_reason", "load_torch_file",
           "read_sharded", "restore_rng", "resume_path", "save_checkpoint", "seed_everything", "state_fingerprint"]

CHECKPOINT_FORMAT = 1
META_FILE = "meta.pt"  # the non-tensor entries of a sharded (DCP) checkpoint folder
LAST = ("last.pt", "last.dcp")  # what --resume auto looks for in the run folder

def find_file(what: str, path: str | os.PathLike | None, env: str | None, defaults: Iterable[Path] = (),
              how: str = "", directory: bool = False) -> Path:
    """The first existing candidate of: ``path`` (if given, the only candidate), ``$env``, ``defaults``.

    :raises MissingFileError: listing every place looked at and ``how`` to provide the file.
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
    raise MissingFileError(f"{what}: no such {kind}. Looked at: " + "; ".join(looked) + (f". {how}" if how else ""))


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
        raise MissingFileError(f"{what}: no such file {path}")
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


# -- training checkpoints ---------------------------------------------------------------------------
def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any], kind: str) -> str:
    """Write ``state`` (plus ``kind`` and ``format``) to ``path`` atomically: a temporary file in the
    same folder, flushed and fsynced, then ``os.replace`` -- a crash leaves the old file or the new
    one, never a partial one. Returns the path written."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    payload = {"kind": kind, "format": CHECKPOINT_FORMAT, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # The rename itself is durable only once the folder's entry is on disk.
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def load_checkpoint(path: str | os.PathLike, kind: str | tuple[str, ...] | None = None,
                    map_location: str | torch.device = "cpu", tensors: bool = True) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain Python only:
    ``weights_only`` loading, no pickled code runs), or a sharded one (a DCP folder of an FSDP run,
    :func:`fqgan.runtime.parallel.save_sharded`): its ``meta.pt`` entries plus, with ``tensors``, the
    full tensors of every module and optimizer, gathered in this process.

    :raises MissingFileError: no file at ``path`` (the message gives the absolute path)
    :raises CheckpointError: unreadable (truncated, corrupted, not a torch file), or of another
        ``kind`` than asked for
    """
    path = os.fspath(path)
    where = os.path.abspath(path)
    if not os.path.exists(path):
        raise MissingFileError(f"checkpoint not found: {path!r} (looked at {where})")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, META_FILE)):
            raise CheckpointError(f"checkpoint path {path!r} is a folder without {META_FILE} (not a sharded "
                                  "checkpoint); pass the .pt file inside it")
        state = read_sharded(path) if tensors else _load_file(os.path.join(path, META_FILE), map_location)
        return _check_kind(state, kind, path)
    return _check_kind(_load_file(path, map_location), kind, path)


def _load_file(path: str, map_location: str | torch.device) -> dict[str, Any]:
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes): an interrupted copy? Use another one")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError,
            AttributeError, KeyError, IndexError) as exc:
        raise CheckpointError(f"checkpoint {path!r} ({size} bytes) is corrupted or truncated and cannot be "
                              f"loaded: {load_reason(exc)}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(state).__name__}, not a checkpoint dict")
    return state


def _check_kind(state: dict[str, Any], kind: str | tuple[str, ...] | None, path: str) -> dict[str, Any]:
    if kind is not None:
        kinds = (kind,) if isinstance(kind, str) else tuple(kind)
        found = state.get("kind")
        if found not in kinds:
            what = f"a {found!r} checkpoint" if found else "no 'kind' entry (not written by fqgan?)"
            raise CheckpointError(f"checkpoint {path!r} holds {what}; expected {' or '.join(map(repr, kinds))}")
    return state


def read_sharded(path: str | os.PathLike) -> dict[str, Any]:
    """Everything in a sharded checkpoint folder as one plain dict on the CPU: ``meta.pt``'s entries plus
    the full tensors of every module and optimizer (nested as saved), read in this one process."""
    import warnings

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = os.fspath(path)
    meta = _load_file(os.path.join(path, META_FILE), "cpu")
    state: dict[str, Any] = {}
    try:
        with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process, on purpose
            warnings.simplefilter("ignore", UserWarning)
            # The empty planner fills ``state`` from the checkpoint's own metadata (what
            # torch.distributed.checkpoint.format_utils.dcp_to_torch_save does).
            _load_state_dict(state, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(),
                             no_dist=True)
    except Exception as exc:  # DCP wraps the cause in its own CheckpointException
        raise CheckpointError(f"sharded checkpoint {path!r} cannot be read: {load_reason(exc)}") from exc
    meta.update(state)
    return meta

def resume_path(resume: str | None, out_dir: str | os.PathLike) -> str | None:
    """The checkpoint a run continues from: ``None`` (a fresh run), ``"auto"`` (``out_dir/last.pt`` or the
    sharded ``out_dir/last.dcp`` when one exists, else a fresh run), or a path (which must then exist:
    :func:`load_checkpoint` says so)."""
    if resume is None:
        return None
    if resume == "auto":
        found = [p for p in (os.path.join(os.fspath(out_dir), name) for name in LAST) if os.path.exists(p)]
        # Both formats after a switch between --parallel ddp and fsdp: the newer one.
        return max(found, key=_written_at) if found else None
    return os.fspath(resume)


def _written_at(path: str) -> float:
    return os.path.getmtime(os.path.join(path, META_FILE) if os.path.isdir(path) else path)


def state_fingerprint(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> str:
    """A short digest (16 hex digits of SHA-256) of a model's config and weights: equal exactly when both are,
    whatever the file they came from. Tensors are hashed by name, dtype, shape and bytes."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps(dict(config), sort_keys=True, default=str).encode())
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# -- RNG state -------------------------------------------------------------------------------------
def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """Every generator a training step may draw from, as tensors and plain Python (so that the
    checkpoint loads with ``weights_only``): Python ``random``, NumPy's global, torch CPU and, on a
    CUDA device, its CUDA generator."""
    # The legacy global generator is the one third-party code draws from, so it is what to capture.
    np_state = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Mapping[str, Any], device: torch.device | None = None) -> None:
    """Inverse of :func:`capture_rng`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],  # noqa: NPY002
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def gather_rng(info: DistInfo) -> list[dict[str, Any]]:
    """Every rank's :func:`capture_rng`, in rank order (collective: call on all ranks)."""
    mine = capture_rng(info.device)
    if not info.distributed:
        return [mine]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, mine)
    return out


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002 (the global generator, see capture_rng)
    torch.manual_seed(seed)
