"""Generated samples in ADM's ``.npz`` format, written in resumable shards: ``fqgan sample --npz`` uses it.

The final file is what OpenAI's ADM evaluator (and ``fqgan eval-generator``) reads: ``arr_0`` uint8
``[N, H, W, 3]``, as the official ``sample_c2i_ddp_*_code.py`` writes it, plus ``labels`` int64 ``[N]`` (the
class of each image; ADM reads only ``arr_0``).

Sharding: images ``0..N-1`` are cut into shards of ``shard_size`` consecutive indices; under torchrun rank r
takes shards ``r, r + W, ...``. A finished shard is one file, ``OUT.npz.shards/shard_XXXXX.npz`` (``arr_0``,
``labels``, ``start``), written under a temporary name and renamed, so a killed run leaves only finished
shards; a restarted run (any number of processes) skips them. ``plan.json`` in the shard folder records what
the shards are samples of (checkpoints, seed, sampling settings, N, shard size): a restart with other settings
is refused rather than mixed in. Rank 0 waits for every shard, then streams them into ``OUT.npz`` (a ZIP64
archive written member by member: memory is one shard, whatever N) and removes the shard folder.

This module knows no model: the caller passes ``make(indices, labels) -> uint8 [n, H, W, 3]``, which must
give each image from its global index alone (per-image seeds), so the images do not depend on the number
of processes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fqgan.runtime.errors import UsageError
from fqgan.runtime.signals import stop_on_signals

__all__ = ["SamplesResult", "assemble_npz", "shard_dir", "to_uint8", "write_samples_npz"]

PLAN_KIND = "fqgan-samples-plan"


@dataclass(frozen=True)
class SamplesResult:
    """What :func:`write_samples_npz` did on this process."""

    path: Path  # the final .npz (written by rank 0)
    num_images: int
    generated: int  # images this process generated
    skipped_shards: int  # finished shards found at the start (all ranks' shards, counted on every rank)
    seconds: float  # this process's generation time


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images ``[B, 3, H, W]`` in [-1, 1] -> uint8 ``[B, H, W, 3]`` as the official sampling script converts them:
    ``clamp(127.5 * x + 128, 0, 255)`` truncated to uint8."""
    x = torch.clamp(127.5 * images.float() + 128.0, 0, 255).permute(0, 2, 3, 1)
    return x.to("cpu", dtype=torch.uint8).numpy()


def shard_dir(out: str | os.PathLike) -> Path:
    """The shard folder of the final file ``out``: ``OUT.npz.shards``."""
    return Path(str(out) + ".shards")


def _shard_path(folder: Path, s: int) -> Path:
    return folder / f"shard_{s:05d}.npz"


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shard_done(path: Path, n: int) -> bool:
    """A shard file that holds n images (a complete rename; anything else is regenerated)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return "arr_0" in data and "labels" in data and data["labels"].shape == (n,)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False


def _save_shard(path: Path, images: np.ndarray, labels: np.ndarray, start: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, arr_0=images, labels=labels, start=np.int64(start))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_plan(folder: Path, plan: dict[str, Any], write: bool) -> None:
    """Refuse a shard folder whose ``plan.json`` records other settings; with ``write``, create it when missing."""
    path = folder / "plan.json"
    want = {"kind": PLAN_KIND, **plan}
    if path.is_file():
        try:
            have = json.loads(path.read_text())
        except ValueError:
            have = {}
        if have != want:
            diff = sorted(k for k in set(want) | set(have) if have.get(k) != want.get(k))
            raise UsageError(f"{folder} holds shards of another sampling run (differs in: {', '.join(diff)}): "
                             f"use the same settings to resume it, or remove the folder to start afresh")
        return
    if write:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(".plan.json.tmp")
        tmp.write_text(json.dumps(want, indent=2) + "\n")
        os.replace(tmp, path)


def write_samples_npz(out: str | os.PathLike, labels: np.ndarray,
                      make: Callable[[np.ndarray, np.ndarray], np.ndarray], *, shard_size: int = 1000,
                      batch_size: int = 32, plan: dict[str, Any] | None = None, keep_shards: bool = False,
                      on_start: Callable[[int, int], None] | None = None,
                      on_batch: Callable[[int], None] | None = None, poll_s: float = 1.0) -> SamplesResult:
    """Generate image ``i`` of class ``labels[i]`` for every ``i < N`` with ``make`` and write ``out``.

    :param out: the final ``.npz`` (rank 0 writes it; its shard folder is ``out + ".shards"``)
    :param labels: [N] class ids, image i's class
    :param make: ``make(indices [n] int64, labels [n]) -> uint8 [n, H, W, 3]``, the images of these global
        indices (each a function of its index alone)
    :param shard_size: images per shard file (the unit of resumption)
    :param batch_size: images per ``make`` call
    :param plan: the settings that define the samples (JSON-able), checked against a resumed shard folder
    :param keep_shards: keep the shard folder after the final file is written
    :param on_start: called once before any image is generated with (images in finished shards, images this
        process will generate)
    :param on_batch: called with the number of images of every finished batch (a progress bar)
    :returns: :class:`SamplesResult`
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = labels.shape[0]
    if labels.ndim != 1 or n < 1:
        raise UsageError(f"labels must be a non-empty [N] array, got shape {labels.shape}")
    if shard_size < 1 or batch_size < 1:
        raise UsageError(f"shard_size and batch_size must be positive, got {shard_size} and {batch_size}")
    rank, world = _rank_world()
    out = Path(out)
    folder = shard_dir(out)
    plan = {"num_images": n, "shard_size": shard_size, **(plan or {})}
    # Every rank reads the folder before any rank writes a shard (the barrier), so all see the same shards done.
    _check_plan(folder, plan, write=rank == 0)
    if rank == 0:
        for stale in folder.glob(".shard_*.tmp"):  # what a killed save left
            stale.unlink(missing_ok=True)
    starts = list(range(0, n, shard_size))
    sizes = [min(shard_size, n - start) for start in starts]
    done = {s for s in range(len(starts)) if _shard_done(_shard_path(folder, s), sizes[s])}
    if world > 1:
        dist.barrier()
    todo = [s for s in range(len(starts)) if s not in done]
    mine = todo[rank::world]
    if on_start is not None:
        on_start(sum(sizes[s] for s in done), sum(sizes[s] for s in mine))
    generated, t0 = 0, time.perf_counter()

    def kept() -> str:
        done_now = sum(_shard_done(_shard_path(folder, s), sizes[s]) for s in range(len(starts)))
        return (f"{done_now} of {len(starts)} shards are finished and kept in {folder}; the same command continues "
                "from them")

    with stop_on_signals(kept):  # SIGTERM / SIGUSR1 (a scheduler's) stop as Ctrl-C does: the shards written stay
        for s in mine:
            start, end = starts[s], min(starts[s] + shard_size, n)
            parts = []
            for b in range(start, end, batch_size):
                idx = np.arange(b, min(b + batch_size, end), dtype=np.int64)
                images = np.asarray(make(idx, labels[idx]))
                if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != idx.shape[0] or \
                        images.shape[3] != 3:
                    raise UsageError(f"make() must return uint8 [{idx.shape[0]}, H, W, 3], got {images.dtype} "
                                     f"{list(images.shape)}")
                parts.append(images)
                generated += idx.shape[0]
                if on_batch is not None:
                    on_batch(idx.shape[0])
            _save_shard(_shard_path(folder, s), np.concatenate(parts), labels[start:end], start)
        seconds = time.perf_counter() - t0
        if rank == 0:
            paths = [_shard_path(folder, s) for s in range(len(starts))]
            waited = False
            while not all(_shard_done(p, m) for p, m in zip(paths, sizes)):
                if not waited:
                    print(f"waiting for the other ranks' shards in {folder}", file=sys.stderr, flush=True)
                    waited = True
                time.sleep(poll_s)
    if rank == 0:
        assemble_npz(out, paths)
        if not keep_shards:
            shutil.rmtree(folder, ignore_errors=True)
    return SamplesResult(out, n, generated, len(done), seconds)


def assemble_npz(out: str | os.PathLike, shards: list[Path]) -> Path:
    """Concatenate the shards' ``arr_0`` and ``labels`` into ``out`` (``np.savez`` layout, ZIP64, uncompressed),
    one shard in memory at a time; written under a temporary name and renamed."""
    out = Path(out)
    with np.load(shards[0], allow_pickle=False) as data:
        _, h, w, c = data["arr_0"].shape
    counts = []
    for p in shards:
        with np.load(p, allow_pickle=False) as data:
            counts.append(data["labels"].shape[0])
    n = sum(counts)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for key, shape, dtype in (("arr_0", (n, h, w, c), np.uint8), ("labels", (n,), np.int64)):
            with z.open(f"{key}.npy", "w", force_zip64=True) as f:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                          "shape": shape}
                np.lib.format.write_array_header_1_0(f, header)
                for p in shards:
                    with np.load(p, allow_pickle=False) as data:
                        part = np.ascontiguousarray(data[key], dtype=dtype)
                    if part.shape[1:] != shape[1:]:
                        raise UsageError(f"{p}: {key} has shape {part.shape}, the other shards {shape[1:]}")
                    f.write(part.tobytes())
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return out
