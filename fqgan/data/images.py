"""Image files in and out: loading with the ADM/LlamaGen center crop, uint8 conversion, PNG grids.

Shared by every command that reads or writes pictures (``reconstruct``, ``sample``, the demo,
``eval-tokenizer``). Model-side images are float tensors in ``[-1, 1]``, shape ``[B, 3, H, W]``
(or ``[3, H, W]`` for one image), RGB, the LlamaGen/FQGAN convention.

uint8 conversion follows LlamaGen/FQGAN's reconstruction and sampling scripts:
``clamp(127.5 * x + 128, 0, 255)`` truncated to uint8, i.e. ``127.5 * (x + 1)`` rounded half up.
It is the exact inverse of ``u / 127.5 - 1`` on 8-bit images, so an image loaded from a PNG and
converted back gives the same bytes.

Grids are torchvision's ``utils.make_grid`` (layout) and ``utils.save_image`` (PNG writing) on the bytes
of :func:`to_uint8`. ``save_image`` alone, given ``(x + 1) / 2``, computes ``floor(255 * (x + 1) / 2 + 0.5)``,
the same formula, but in a different float32 order: it is one level off on about 2 in a million random
values (100 of 5e7 measured), those within rounding of a half-integer. It is therefore handed ``u / 255``,
which its ``mul(255).add_(0.5)`` maps back to ``u`` exactly for every level.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fqgan.runtime.checkpoint import MissingFileError
from fqgan.runtime.errors import UsageError, UsageTypeError
from fqgan.runtime.vision import import_torchvision

from .datasets import IMAGE_EXTENSIONS, center_crop_arr


def _check_images(images: Tensor, name: str = "images", ndims: tuple[int, ...] = (4,)) -> None:
    if not isinstance(images, Tensor):
        raise UsageTypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise UsageTypeError(f"{name} must be a floating-point tensor in [-1, 1], got dtype {images.dtype}")
    if images.dim() not in ndims:
        want = " or ".join({3: "[3, H, W]", 4: "[B, 3, H, W]"}[d] for d in ndims)
        raise UsageError(f"{name} must have shape {want}, got {list(images.shape)}")
    if images.shape[-3] != 3:
        raise UsageError(f"{name} must be RGB (3 channels at dim -3), got shape {list(images.shape)}")
    if images.numel() and not bool(torch.isfinite(images).all()):
        raise UsageError(f"{name} contains NaN or Inf values")


def to_uint8(images: Tensor) -> Tensor:
    """``clamp(127.5 * images + 128, 0, 255).to(uint8)`` (LlamaGen/FQGAN), same shape, channel-first.

    :param images: float tensor in [-1, 1], shape ``[B, 3, H, W]`` or ``[3, H, W]``; values outside
        are clamped.
    :returns: uint8 tensor on the same device and of the same shape.
    """
    _check_images(images, ndims=(3, 4))
    # float32 at least: 127.5 * x + 128 in bf16 cannot represent every integer step up to 255.
    x = images.float() if images.dtype in (torch.float16, torch.bfloat16) else images
    return torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)


def from_uint8(pixels: Tensor | np.ndarray) -> Tensor:
    """``pixels / 127.5 - 1`` as float32, channel-first: ``[H, W, 3]`` (PIL/numpy layout) -> ``[3, H, W]``.

    :param pixels: uint8 array or tensor of shape ``[H, W, 3]``.
    """
    # np.array copies: arrays from PIL images are read-only, which torch.from_numpy warns about.
    t = torch.from_numpy(np.array(pixels)) if isinstance(pixels, np.ndarray) else pixels
    if t.dtype != torch.uint8:
        raise UsageTypeError(f"pixels must be uint8, got {t.dtype}")
    if t.dim() != 3 or t.shape[-1] != 3:
        raise UsageError(f"pixels must have shape [H, W, 3], got {list(t.shape)}")
    return t.permute(2, 0, 1).float() / 127.5 - 1.0


def load_image(path: str | Path, size: int | None = None) -> Tensor:
    """Read an image file as a float32 tensor in [-1, 1], shape ``[3, H, W]`` (RGB).

    :param path: any format PIL reads (PNG, JPEG, WebP, ...); grey, palette and alpha images are
        converted to RGB (alpha dropped).
    :param size: if given, :func:`fqgan.data.center_crop_arr` to ``size`` x ``size`` (BOX halvings,
        short side resized bicubically to ``size``, centre crop), LlamaGen/FQGAN's evaluation transform.
    :raises MissingFileError: the file does not exist (message gives the absolute path).
    :raises ValueError: the file exists but is not a readable image.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"image file not found: {p} (looked for {p.resolve()})")
    if not p.is_file():
        raise UsageError(f"not an image file: {p} is a {'directory' if p.is_dir() else 'special file'}")
    try:
        with Image.open(p) as im:
            im.load()
            image = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UsageError(f"cannot read image {p}: {e}") from e
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise UsageError(f"size must be a positive int, got {size!r}")
        image = center_crop_arr(image, size)
    return from_uint8(np.asarray(image, dtype=np.uint8))


def list_images(paths: Iterable[str | Path]) -> list[Path]:
    """Expand paths into image files: a file is kept as is, a directory gives its files with an
    image extension (:data:`IMAGE_EXTENSIONS`, not recursive, sorted by name).

    :raises MissingFileError: a path does not exist.
    :raises ValueError: a directory holds no image file, or no path was given.
    """
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise UsageError(f"directory {p} holds no image file ({', '.join(IMAGE_EXTENSIONS)})")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise MissingFileError(f"image file not found: {p} (looked for {p.resolve()})")
    if not out:
        raise UsageError("no image given")
    return out


def save_image(image: Tensor, path: str | Path) -> Path:
    """Write one image ``[3, H, W]`` in [-1, 1] (converted by :func:`to_uint8`) to ``path``.

    The format follows the extension (PNG recommended: lossless). Parent folders are created.
    """
    from PIL import Image

    _check_images(image, "image", ndims=(3,))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image).permute(1, 2, 0).cpu().numpy()).save(p)
    return p


class GridLayout(NamedTuple):
    """Where each tile of a grid lies in the saved picture."""

    path: Path
    rows: int
    cols: int
    tile_height: int
    tile_width: int
    padding: int
    label_width: int  # width of the label column on the left (0 without labels)

    def tile_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """``(top, left, bottom, right)`` pixel box of tile (row, col), bottom/right exclusive."""
        top = self.padding + row * (self.tile_height + self.padding)
        left = self.label_width + self.padding + col * (self.tile_width + self.padding)
        return top, left, top + self.tile_height, left + self.tile_width


def _label_column(labels: Sequence[str], rows: int, tile_h: int, padding: int) -> Tensor:
    """The white label column, uint8 ``[3, height of the grid, width of the longest label]``."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=max(10, min(16, tile_h // 3)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(probe.textbbox((0, 0), str(t), font=font)[2] for t in labels)
    width = text_w + 2 * max(padding, 4)
    height = padding + rows * (tile_h + padding)
    column = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(column)
    for r, text in enumerate(labels):
        top = padding + r * (tile_h + padding)
        box = draw.textbbox((0, 0), str(text), font=font)
        draw.text((max(padding, 4), top + (tile_h - (box[3] - box[1])) // 2 - box[1]), str(text),
                  fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.array(column)).permute(2, 0, 1)  # np.array: a writable copy


def save_grid(images: Tensor, path: str | Path, nrow: int = 8, padding: int = 2,
              row_labels: Sequence[str] | None = None, pad_value: int = 255, scale: int = 1) -> GridLayout:
    """Save ``images`` ``[N, 3, H, W]`` in [-1, 1] as one picture: rows of ``nrow`` tiles, filled row
    by row (image ``i`` at row ``i // nrow``, column ``i % nrow``), ``padding`` pixels of
    ``pad_value`` (grey level 0..255) around and between tiles; unused cells of the last row stay
    ``pad_value``. The tiles are :func:`to_uint8`'s bytes, laid out by torchvision's ``make_grid`` and
    written by its ``save_image`` (see the module docstring).

    :param row_labels: optional text per grid row (``ceil(N / nrow)`` of them), drawn in a white
        column on the left (torchvision has no labels).
    :param scale: each tile drawn ``scale`` times larger, every pixel a ``scale x scale`` block (nearest
        neighbour: small images stay legible and their pixels visible).
    :returns: the :class:`GridLayout`, which locates each tile in the file.
    """
    tv = import_torchvision()
    _check_images(images)
    if not isinstance(nrow, int) or nrow < 1:
        raise UsageError(f"nrow must be a positive int, got {nrow!r}")
    if not isinstance(padding, int) or padding < 0:
        raise UsageError(f"padding must be a non-negative int, got {padding!r}")
    if not 0 <= int(pad_value) <= 255:
        raise UsageError(f"pad_value must be a grey level in 0..255, got {pad_value!r}")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise UsageError(f"scale must be a positive int, got {scale!r}")
    n, _, h, w = images.shape
    if n == 0:
        raise UsageError("images is empty: nothing to put in a grid")
    cols = min(nrow, n)
    rows = math.ceil(n / nrow)
    if row_labels is not None and len(row_labels) != rows:
        raise UsageError(f"row_labels has {len(row_labels)} entries, the grid has {rows} rows "
                         f"({n} images, nrow={nrow})")
    tiles = to_uint8(images).cpu()  # [N, 3, H, W]
    if scale > 1:
        tiles = tiles.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        h, w = h * scale, w * scale
    if n == 1:  # make_grid returns a lone image as it is, without the padding
        grid = F.pad(tiles[0], (padding,) * 4, value=int(pad_value))
    else:
        grid = tv.utils.make_grid(tiles, nrow=nrow, padding=padding, pad_value=int(pad_value))  # [3, H', W']
    layout = GridLayout(Path(path), rows, cols, h, w, padding, 0)
    if row_labels is not None:
        column = _label_column(row_labels, rows, h, padding)
        grid = torch.cat([column, grid], dim=2)
        layout = layout._replace(label_width=column.shape[2])
    layout.path.parent.mkdir(parents=True, exist_ok=True)
    tv.utils.save_image(grid.float().div_(255), layout.path)  # writes back exactly these bytes
    return layout


def save_comparison_grid(originals: Tensor, reconstructions: Tensor, path: str | Path, nrow: int = 8,
                         padding: int = 2, labels: tuple[str, str] = ("original", "reconstruction"),
                         scale: int = 1) -> GridLayout:
    """Save originals above their reconstructions: for each chunk of ``nrow`` images, one grid row of
    originals and, right below it, the row of their reconstructions (image ``i`` at grid row
    ``2 * (i // nrow)`` and ``2 * (i // nrow) + 1``, column ``i % nrow``), rows labelled.

    :param originals: ``[N, 3, H, W]`` in [-1, 1].
    :param reconstructions: same shape as ``originals``.
    :param scale: as :func:`save_grid`'s.
    """
    _check_images(originals, "originals")
    _check_images(reconstructions, "reconstructions")
    if originals.shape != reconstructions.shape:
        raise UsageError(f"originals {list(originals.shape)} and reconstructions {list(reconstructions.shape)} "
                         "must have the same shape")
    if not isinstance(nrow, int) or nrow < 1:
        raise UsageError(f"nrow must be a positive int, got {nrow!r}")
    n = originals.shape[0]
    if n == 0:
        raise UsageError("originals is empty: nothing to put in a grid")
    cols = min(nrow, n)
    chunks, row_labels = [], []
    for start in range(0, n, nrow):
        for source, label in zip((originals, reconstructions), labels):
            chunk = source[start:start + nrow].detach().float().cpu()
            if chunk.shape[0] < cols:  # pad the last chunk so that each pair of rows stays aligned
                chunk = torch.cat([chunk, chunk.new_ones(cols - chunk.shape[0], *chunk.shape[1:])])
            chunks.append(chunk)
            row_labels.append(label)
    return save_grid(torch.cat(chunks), path, nrow=cols, padding=padding, row_labels=row_labels, scale=scale)
