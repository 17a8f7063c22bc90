"""Token codes for generator training: ``fqgan extract-codes`` writes them, :class:`CodeDataset` reads them.

As the official ``autoregressive/train/extract_codes_c2i_{dual,triple}_code.py``: every image is
centre-cropped (``center_crop_arr``), encoded together with its horizontal flip, and both k index maps
are kept; generator training picks one of the augmentations per item and epoch. That is the official
script's default path. The released FAR run, ``train_far_dual.sh``, extracts with ``--ten-crop
--crop-range 1.1`` instead (``fqgan extract-codes --ten-crop``): a centre crop of ``int(1.1 * image_size)``
cut by torchvision ``TenCrop(image_size)`` -- the four corners and the centre, then the same five of the
flipped image -- so A = 10 (:class:`~fqgan.data.datasets.TenCropImages`).

A code folder holds:

* ``codes.npy``: ``[N, A, k, h, w]`` (uint16 when K <= 65536, else int32): image n, augmentation a
  (flip: 0 = as is, 1 = flipped; ten-crop: TenCrop's order), sub-codebook i (the tokenizer's order), token grid;
* ``labels.npy``: ``[N]`` int64 class ids;
* ``meta.json``: ``kind = "fqgan-codes"``, N, A, k, K, grid size, image size, class names, sub-codebook
  names, the augmentations (``none``, ``flip``, ``ten-crop x1.1``), the tokenizer checkpoint and its config
  (so a generator can be checked against a tokenizer).

Under torchrun each rank encodes images ``rank, rank + W, ...`` into one shared memory-mapped file.
The files are written under temporary names and renamed when complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from fqgan.runtime.errors import MissingFileError, UsageError
from fqgan.runtime.sampler import worker_errors_as_one_line

from .datasets import collate

CODES_KIND = "fqgan-codes"
CODES_FORMAT = 1


@dataclass(frozen=True)
class CodesMeta:
    """What ``meta.json`` says about a code folder."""

    num_images: int
    num_aug: int
    num_codebooks: int
    codebook_size: int
    grid_size: int
    image_size: int
    classes: tuple[str, ...]
    codebook_names: tuple[str, ...]
    tokenizer: str | None = None
    tokenizer_config: dict[str, Any] | None = None
    tokenizer_fingerprint: str | None = None  # FQTokenizer.fingerprint() of the tokenizer that wrote the codes
    augmentation: str | None = None  # "none", "flip" or "ten-crop x<crop_range>" (None: written before it was kept)
    left_out: tuple[tuple[str, str], ...] = ()  # (path, reason) of the folder's unreadable files (--bad-images skip)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": CODES_KIND, "format": CODES_FORMAT, "num_images": self.num_images, "num_aug": self.num_aug,
                "num_codebooks": self.num_codebooks, "codebook_size": self.codebook_size,
                "grid_size": self.grid_size, "image_size": self.image_size, "classes": list(self.classes),
                "codebook_names": list(self.codebook_names), "tokenizer": self.tokenizer,
                "tokenizer_config": self.tokenizer_config, "tokenizer_fingerprint": self.tokenizer_fingerprint,
                "augmentation": self.augmentation, "left_out": [list(item) for item in self.left_out]}


def _code_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.uint16) if codebook_size <= 65536 else np.dtype(np.int32)


def _flip(x: Tensor) -> Tensor:
    return torch.flip(x, dims=[-1])


@torch.no_grad()
def extract_codes(tokenizer: nn.Module, dataset: Dataset, out_dir: str | os.PathLike, *, flip: bool = True,
                  ten_crop: float | None = None, batch_size: int = 32, num_workers: int = 0,
                  device: torch.device | str = "cpu", tokenizer_path: str | None = None,
                  classes: list[str] | None = None, left_out: Sequence[tuple[str, str]] = (),
                  on_batch: Callable[[int], None] | None = None) -> CodesMeta:
    """Encode every image of ``dataset`` (items ``(image [3, H, W], label)``, evaluation crops) with
    ``tokenizer`` (an :class:`~fqgan.tokenizer.FQTokenizer`) and write a code folder to ``out_dir``.

    :param flip: also encode each image's horizontal flip (official extraction): ``A = 2``
    :param ten_crop: the crop range of a :class:`~fqgan.data.datasets.TenCropImages` data set, whose items are
        the official ten crops ``[10, 3, H, W]``: ``A = 10`` in TenCrop's order (``flip`` must be False: the
        crops hold the flips). None: items are single images
    :param batch_size: images per batch (ten-crop: 10 crops each)
    :param classes: class names (default: ``dataset.classes``)
    :param left_out: ``(path, reason)`` of the folder's files the data set leaves out as unreadable (recorded
        in ``meta.json``)
    :returns: the :class:`CodesMeta` written
    """
    if batch_size < 1:
        raise UsageError(f"batch_size must be positive, got {batch_size}")
    if ten_crop is not None and flip:
        raise UsageError("ten_crop and flip exclude each other: the ten crops include the flipped image's five")
    device = torch.device(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    c = tokenizer.config
    n = len(dataset)
    if n == 0:
        raise UsageError("the data set is empty: nothing to encode")
    num_aug = 10 if ten_crop is not None else 2 if flip else 1
    augmentation = f"ten-crop x{ten_crop:g}" if ten_crop is not None else "flip" if flip else "none"
    grid = c.image_size // c.down_factor
    classes = list(classes if classes is not None else getattr(dataset, "classes", []))
    meta = CodesMeta(n, num_aug, c.num_codebooks, c.codebook_size, grid, c.image_size, tuple(classes),
                     tuple(c.codebook_names), tokenizer_path, c.to_dict(),
                     tokenizer.fingerprint() if hasattr(tokenizer, "fingerprint") else None, augmentation,
                     tuple((str(p), str(r)) for p, r in left_out))
    out = os.fspath(out_dir)
    tmp_codes = os.path.join(out, ".codes.npy.tmp")
    shape = (n, num_aug, c.num_codebooks, grid, grid)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        np.lib.format.open_memmap(tmp_codes, mode="w+", dtype=_code_dtype(c.codebook_size), shape=shape).flush()
    if world > 1:
        dist.barrier()
    codes = np.lib.format.open_memmap(tmp_codes, mode="r+")
    labels = np.zeros(n, dtype=np.int64)
    mine = list(range(rank, n, world))
    loader = DataLoader(Subset(dataset, mine), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate, pin_memory=device.type == "cuda")
    was_training = tokenizer.training
    tokenizer.eval()
    pos = 0
    try:
        with worker_errors_as_one_line():  # a worker's error as one line naming the file
            for images, y in loader:
                x = images.to(device, non_blocking=True)
                b = x.shape[0]
                if ten_crop is not None:
                    if x.ndim != 5 or x.shape[1] != num_aug:
                        raise UsageError(f"ten_crop: data set items must be [10, 3, H, W] crops (TenCropImages), "
                                         f"got a batch of {tuple(x.shape)}")
                    idx = tokenizer.encode(x.flatten(0, 1)).cpu().numpy()  # [b*A, k, h, w], image-major
                    idx = idx.reshape(b, num_aug, *idx.shape[1:])  # [b, A, k, h, w]
                else:
                    if flip:
                        x = torch.cat([x, _flip(x)])
                    idx = tokenizer.encode(x).cpu().numpy()  # [A*b, k, h, w]
                    idx = idx.reshape(num_aug, b, *idx.shape[1:]).transpose(1, 0, 2, 3, 4)  # [b, A, k, h, w]
                rows = mine[pos:pos + b]
                codes[rows] = idx.astype(codes.dtype)
                labels[rows] = y.numpy()
                pos += b
                if on_batch is not None:
                    on_batch(b)
    finally:
        tokenizer.train(was_training)
    codes.flush()
    del codes
    if world > 1:
        t = torch.from_numpy(labels).to(device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)  # each label is non-zero on one rank only
        labels = t.cpu().numpy()
        dist.barrier()
    if rank == 0:
        _save_npy_atomic(os.path.join(out, "labels.npy"), labels)
        os.replace(tmp_codes, os.path.join(out, "codes.npy"))
        _write_atomic(os.path.join(out, "meta.json"), json.dumps(meta.to_dict(), indent=2) + "\n")
    if world > 1:
        dist.barrier()
    return meta


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_npy_atomic(path: str, array: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def load_codes_meta(path: str | os.PathLike) -> CodesMeta:
    """Read and check ``meta.json`` of a code folder; errors name the folder and what is wrong."""
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise MissingFileError(f"code folder {folder!r} not found (looked at {os.path.abspath(folder)}); "
                                f"write one with `fqgan extract-codes --tokenizer CKPT --out {folder}`")
    meta_path = os.path.join(folder, "meta.json")
    for name in ("meta.json", "codes.npy", "labels.npy"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise MissingFileError(f"code folder {folder!r} has no {name} (an interrupted `fqgan extract-codes`? "
                                    f"run it again)")
    try:
        with open(meta_path) as f:
            m = json.load(f)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{meta_path} is not readable JSON ({exc}): the code folder is damaged; write it again "
                         "with `fqgan extract-codes`") from exc
    if not isinstance(m, dict) or m.get("kind") != CODES_KIND:
        kind = m.get("kind") if isinstance(m, dict) else type(m).__name__
        raise UsageError(f"{meta_path} is not an fqgan code folder's meta.json (kind {kind!r})")
    fields = {"num_images": int, "num_aug": int, "num_codebooks": int, "codebook_size": int, "grid_size": int,
              "image_size": int, "classes": list, "codebook_names": list}
    missing = [k for k in fields if k not in m]
    wrong = [f"{k} = {m[k]!r}" for k, t in fields.items() if k in m and not isinstance(m[k], t)]
    if missing or wrong:
        what = "; ".join(([f"no {', '.join(missing)}"] if missing else []) + ([f"bad {', '.join(wrong)}"] if wrong
                                                                                else []))
        raise UsageError(f"{meta_path} is damaged ({what}): write the code folder again with `fqgan extract-codes`")
    return CodesMeta(m["num_images"], m["num_aug"], m["num_codebooks"], m["codebook_size"], m["grid_size"],
                     m["image_size"], tuple(m["classes"]), tuple(m["codebook_names"]), m.get("tokenizer"),
                     m.get("tokenizer_config"), m.get("tokenizer_fingerprint"), m.get("augmentation"),
                     tuple((str(p), str(r)) for p, r in m.get("left_out", ())))


def _load_array(path: str, mmap: bool) -> np.ndarray:
    """``np.load`` with errors that name the file and say what is wrong (a truncated copy, another format)."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as exc:
        size = os.path.getsize(path) if os.path.exists(path) else 0
        raise UsageError(f"{path} ({size} bytes) is damaged or truncated and cannot be read as a .npy array "
                         f"({exc}): write the code folder again with `fqgan extract-codes`") from exc


class CodeDataset(Dataset):
    """Items ``(codes [k, T] int64, label)`` of a code folder (T = grid_size ** 2, raster order), the
    augmentation (as is / flipped, or one of the ten crops) drawn per item from ``(seed, epoch, index)`` as
    the official ``CustomDataset*Code`` draws one at random. ``set_epoch`` before each epoch.

    :param path: a folder written by :func:`extract_codes`
    :param augment: draw the augmentation (training); False: always augmentation 0
    """

    def __init__(self, path: str | os.PathLike, augment: bool = True, seed: int = 0) -> None:
        self.path = os.fspath(path)
        self.meta = load_codes_meta(self.path)
        self.codes = _load_array(os.path.join(self.path, "codes.npy"), mmap=True)
        self.labels = _load_array(os.path.join(self.path, "labels.npy"), mmap=False)
        m = self.meta
        expect = (m.num_images, m.num_aug, m.num_codebooks, m.grid_size, m.grid_size)
        if self.codes.shape != expect or self.labels.shape != (m.num_images,):
            raise UsageError(f"code folder {self.path!r}: codes.npy has shape {self.codes.shape} and labels.npy "
                             f"{self.labels.shape}, but meta.json says {expect} and ({m.num_images},)")
        self.augment = bool(augment)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise UsageError(f"seed must be a non-negative int, got {seed!r}")
        self.seed = seed
        self.epoch = 0
        self.classes = list(m.classes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.meta.num_images

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        a = 0
        if self.augment and self.meta.num_aug > 1:
            a = int(np.random.default_rng([3, self.seed, self.epoch, index]).integers(self.meta.num_aug))
        k = self.meta.num_codebooks
        codes = torch.from_numpy(np.asarray(self.codes[index, a], dtype=np.int64)).view(k, -1)
        return codes, int(self.labels[index])


def resolve_classes(requested: list[str], num_classes: int, names: list[str] | tuple[str, ...] = ()) -> list[int]:
    """Class ids from ``requested`` (ids, or names listed in ``names``), each checked against ``num_classes``."""
    out = []
    for r in requested:
        text = str(r).strip()
        if text.lstrip("-").isdigit():
            cid = int(text)
        elif text in names:
            cid = list(names).index(text)
        else:
            known = f"; names: {', '.join(names)}" if names else ""
            raise UsageError(f"unknown class {text!r}: give an id in [0, {num_classes}){known}")
        if not 0 <= cid < num_classes:
            raise UsageError(f"unknown class id {cid}: this generator has classes 0..{num_classes - 1}")
        out.append(cid)
    return out
