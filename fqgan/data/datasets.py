"""Image data for tokenizer training and evaluation.

Two sources, one item format ``(image, label)``: ``image`` float32 ``[3, H, W]`` in ``[-1, 1]``
(the official ``Normalize(mean=0.5, std=0.5)``), ``label`` an int.

* :class:`ImageFolder`: the semantics of torchvision's ``ImageFolder`` (the official scripts' dataset),
  scanned by its own ``find_classes`` / ``make_dataset``: the label is the first-level class folder
  (sorted names -> 0, 1, ...), images at any depth below it, an empty class folder an error.
* :class:`SampleImages`: the built-in sample set -- random crops of the photographs shipped inside
  scikit-image's wheel (read as files with PIL: no pooch, no network), one class per photograph.

Augmentation follows the official ``dataset/augmentation.py``: training takes ``random_crop_arr``
(resize the shorter side to a random size in ``[size, size / 0.8]``, then a random ``size x size``
crop) and a horizontal flip with probability 0.5; evaluation takes ``center_crop_arr``.

Randomness is a pure function of ``(seed, epoch, index)`` (a NumPy generator per item), not of a
global RNG, so a run resumed mid-epoch sees exactly the images it would have seen, with any number
of DataLoader workers. Call ``dataset.set_epoch(epoch)`` before iterating an epoch.
"""

from __future__ import annotations

import importlib.util
import math
import multiprocessing
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fqgan.runtime.errors import MissingFileError, UsageError, UsageTypeError
from fqgan.runtime.vision import import_torchvision

# torchvision's IMG_EXTENSIONS, as one list for every file search of the package (matched lower-cased).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

# Photographs inside scikit-image's wheel (skimage/data/*), checked to load with PIL alone:
# 9 colour and 10 grey-level pictures (grey ones are repeated on 3 channels). Synthetic images
# (chessboard, phantom, logo, horse, color wheel) and tiny ones (microaneurysms 102 px) are left out.
SAMPLE_PHOTOS = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "ihc.png",
    "retina.jpg", "motorcycle_left.png", "motorcycle_right.png",
    "camera.png", "coins.png", "moon.png", "grass.png", "gravel.png", "brick.png", "cell.png",
    "clock_motion.png", "page.png", "text.png",
)


# -- augmentation (official dataset/augmentation.py behaviour) ----------------------------------
def _halve_while(img: Image.Image, limit: int) -> Image.Image:
    # BOX downsampling by powers of two first, then one bicubic resize (ADM's quality trick).
    while min(img.size) >= 2 * limit:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    return img


def center_crop_arr(img: Image.Image, image_size: int) -> Image.Image:
    """Resize so the shorter side is ``image_size`` (BOX halvings, then bicubic), centre crop
    ``image_size x image_size``. Equals the official/ADM ``center_crop_arr``.

    Kept rather than torchvision's ``Resize(image_size) + CenterCrop(image_size)``: torchvision resizes
    in one step (bicubic or antialiased bilinear), without the BOX halvings by powers of two first, so its
    pixels differ from the official evaluation's; and ADM rounds the crop offset down where ``CenterCrop``
    rounds ``(size - crop) / 2`` to nearest."""
    img = _halve_while(img, image_size)
    scale = image_size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top: top + image_size, left: left + image_size])


def random_crop_arr(img: Image.Image, image_size: int, rng: np.random.Generator,
                    min_crop_frac: float = 0.8, max_crop_frac: float = 1.0) -> Image.Image:
    """Resize the shorter side to a size drawn uniformly from
    ``[ceil(image_size / max_crop_frac), ceil(image_size / min_crop_frac)]``, then take a random
    ``image_size`` square. The official ``random_crop_arr`` with its RNG passed in."""
    lo = math.ceil(image_size / max_crop_frac)
    hi = math.ceil(image_size / min_crop_frac)
    smaller = int(rng.integers(lo, hi + 1))
    img = _halve_while(img, smaller)
    scale = smaller / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top = int(rng.integers(0, arr.shape[0] - image_size + 1))
    left = int(rng.integers(0, arr.shape[1] - image_size + 1))
    return Image.fromarray(arr[top: top + image_size, left: left + image_size])


def ten_crop_arr(img: Image.Image, image_size: int, crop_range: float = 1.1) -> list[Image.Image]:
    """The official ``--ten-crop`` views of one image (``extract_codes_c2i_*_code.py``): ``center_crop_arr`` to
    ``int(image_size * crop_range)``, then torchvision's ``TenCrop(image_size)``: the top-left, top-right,
    bottom-left, bottom-right and centre crops, then the same five of the horizontally flipped image."""
    crop_size = int(image_size * crop_range)  # the official arithmetic: int(256 * 1.1) = 281
    if crop_size < image_size:
        raise UsageError(f"crop_range must be >= 1 (the ten crops of {image_size} px are cut from a centre crop of "
                         f"int({image_size} * crop_range) px), got {crop_range}")
    transforms = import_torchvision().transforms
    return list(transforms.TenCrop(image_size)(center_crop_arr(img, crop_size)))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float32 ``[3, H, W]`` in ``[-1, 1]`` (ToTensor + Normalize(0.5, 0.5))."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous().div_(127.5).sub_(1.0)


# Independent streams of draws per item: the augmentation, and the sample set's patch choice.
_AUGMENT, _PATCH_PER_EPOCH, _PATCH_FIXED = 0, 1, 2


def _item_rng(stream: int, seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([stream, seed, epoch, index])


def _check_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise UsageError(f"image_size must be a positive int, got {image_size!r}")
    return image_size


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"seed must be a non-negative int, got {seed!r}")
    return seed


def _open_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as exc:  # PIL raises several types for bad files
        raise UsageError(f"cannot read image {path!r}: {exc}") from exc


class _AugmentedImages(Dataset):
    """Shared item logic: a PIL image per index, official augmentation, tensor out."""

    image_size: int
    augment: bool
    seed: int
    epoch: int

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` (call before each epoch's iterator)."""
        self.epoch = int(epoch)

    def _load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def _label(self, index: int) -> int:
        raise NotImplementedError

    def _transform(self, img: Image.Image, index: int) -> torch.Tensor:
        if self.augment:
            rng = _item_rng(_AUGMENT, self.seed, self.epoch, index)
            img = random_crop_arr(img, self.image_size, rng)
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            img = center_crop_arr(img, self.image_size)
        return to_tensor(img)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        source = index
        for attempt in range(len(self)):
            try:
                img = self._load(source)
                break
            except ValueError as exc:  # unreadable (_open_rgb): skip it when training, else say which file
                if not getattr(self, "skip_unreadable", False) or attempt == len(self) - 1:
                    raise
                with self.failed_reads.get_lock():
                    self.failed_reads.value += 1
                print(f"warning: {exc}; skipped (using the next image)", file=sys.stderr, flush=True)
                source = (source + 1) % len(self)
        return self._transform(img, index), self._label(source)


class ImageFolder(_AugmentedImages):
    """torchvision's ``ImageFolder`` with the official augmentation: every image under ``root/<class>/``
    at any depth, label = the position of ``<class>`` among the sorted class folders.

    ``root/dog/a.jpg`` and ``root/dog/more/b.png`` are class ``dog``. Classes and files come from
    torchvision's ``datasets.folder.find_classes`` and ``make_dataset`` (same order of samples; images are
    the files with an extension in :data:`IMAGE_EXTENSIONS`, which is torchvision's list). As there, a
    class folder without images is an error: dropping it would shift the label of every later class.

    Differences, on purpose:

    * a folder of loose images and no sub-folder is one class (label 0), so that any folder of pictures
      can be reconstructed or evaluated; torchvision refuses it. Loose images beside sub-folders are an
      error (torchvision would ignore the loose images silently).
    * names starting with ``.`` are skipped, as folders (``.ipynb_checkpoints``, ``.git``) and as files
      (macOS ``._a.jpg`` resource forks, which are no images): torchvision takes a hidden folder as a class
      (an empty one then stops it) and reads ``._a.jpg`` as an image. Without hidden names both agree.
    * items are PIL RGB images through our augmentation, with draws a function of ``(seed, epoch, index)``.

    :param root: the folder
    :param image_size: side of the square output
    :param augment: official training augmentation (random crop + flip) if True, centre crop if False
    :param seed: seeds the per-item augmentation draws
    :param classes: a fixed class list (labels = positions in it; see :func:`scan_folder`)
    :param index: a :class:`~fqgan.data.scan.FolderIndex` to take the samples from instead of listing the folder
    :param skip_unreadable: a file that fails to decode (changed since the scan) is replaced by the next
        readable one, with a warning naming it and a count in ``failed_reads`` (training); else an error
    :raises FileNotFoundError: ``root`` does not exist or is not a folder.
    :raises ValueError: no images, an empty class folder, or loose images beside sub-folders.
    """

    def __init__(self, root: str | os.PathLike, image_size: int, augment: bool = True, seed: int = 0, *,
                 classes: list[str] | None = None, index: Any = None, skip_unreadable: bool = False) -> None:
        self.root = os.path.expanduser(os.fspath(root))
        self.skip_unreadable = skip_unreadable
        self.failed_reads = multiprocessing.Value("l", 0)  # shared with DataLoader workers
        self.image_size = _check_size(image_size)
        self.augment = bool(augment)
        self.seed = _check_seed(seed)
        self.epoch = 0
        if not os.path.isdir(self.root):
            what = "is not a folder" if os.path.exists(self.root) else "does not exist"
            raise MissingFileError(f"image folder {self.root!r} {what} (pass --data PATH to a folder of images, "
                                    f"or --data sample for the built-in sample set)")
        if index is not None:
            self.samples, self.classes = [tuple(s) for s in index.samples], list(index.classes)
        else:
            self.samples, self.classes = scan_folder(self.root, classes)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> Image.Image:
        return _open_rgb(self.samples[index][0])

    def _label(self, index: int) -> int:
        return self.samples[index][1]


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def scan_folder(root: str, classes: list[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """``(samples, classes)`` of an image folder under :class:`ImageFolder`'s rules; with ``classes`` (a fixed
    list, ``--classes FILE``) labels are positions in it, a listed class may be empty or absent, and a class
    folder it does not list is an error."""
    if classes is not None:
        return _scan_fixed_classes(root, classes)
    folder = import_torchvision().datasets.folder
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    loose = [e.path for e in entries if e.is_file() and _is_image(e.name)]
    try:
        found, _ = folder.find_classes(root)
    except FileNotFoundError:  # torchvision's "Couldn't find any class folder"
        found = []
    classes = [name for name in found if not name.startswith(".")]
    if loose and classes:
        raise UsageError(f"image folder {root!r} holds both loose images ({os.path.basename(loose[0])!r}, ...) "
                         f"and sub-folders ({classes[0]!r}, ...), which would be classes: put every image in a class "
                         "folder, or move the sub-folders out")
    if loose:
        return [(p, 0) for p in loose], [os.path.basename(os.path.abspath(root))]
    if not classes:
        raise UsageError(f"image folder {root!r} contains no images (looked for {', '.join(IMAGE_EXTENSIONS)}, "
                         f"loose or in class folders)")
    prefix = os.path.join(root, "")

    def is_valid_file(path: str) -> bool:  # an image, and no hidden folder on the way from root
        return _is_image(os.path.basename(path)) and f"{os.sep}." not in os.sep + path[len(prefix):]

    class_to_idx = {name: i for i, name in enumerate(classes)}
    samples = folder.make_dataset(root, class_to_idx, is_valid_file=is_valid_file, allow_empty=True)
    empty = sorted(set(classes) - {classes[label] for _, label in samples})
    if empty:
        # torchvision raises too; our message names the folders and says what to do.
        raise UsageError(f"class folder {os.path.join(root, empty[0])!r}"
                         + (f" (and {len(empty) - 1} more: {empty[1:4]})" if len(empty) > 1 else "")
                         + f" contains no images (looked for {', '.join(IMAGE_EXTENSIONS)} at any depth). Every "
                         f"sub-folder of {root!r} is a class, labelled by its sorted position, so an empty one "
                         "would shift the labels: put its images in it, or move it out of the image folder")
    return samples, classes


def _scan_fixed_classes(root: str, classes: list[str]) -> tuple[list[tuple[str, int]], list[str]]:
    folder = import_torchvision().datasets.folder
    on_disk = [e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")]
    unknown = sorted(set(on_disk) - set(classes))
    if unknown:
        raise UsageError(f"image folder {root!r} has class folders the --classes file does not list: {unknown[:5]}"
                         + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    prefix = os.path.join(root, "")

    def is_valid_file(path: str) -> bool:
        return _is_image(os.path.basename(path)) and f"{os.sep}." not in os.sep + path[len(prefix):]

    present = {name: i for i, name in enumerate(classes) if name in on_disk}
    samples = folder.make_dataset(root, present, is_valid_file=is_valid_file, allow_empty=True) if present else []
    if not samples:
        raise UsageError(f"image folder {root!r} contains no images in the classes of the --classes file")
    return samples, list(classes)


def sample_photo_dir() -> str:
    """The folder of scikit-image's bundled pictures (``skimage/data``), found without importing
    scikit-image (its data module would route unknown names to pooch downloads)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the built-in sample set needs scikit-image: pip install scikit-image "
                                  "(or pip install 'fqgan-kernels[model]')")
    return os.path.join(os.path.dirname(spec.origin), "data")


_PHOTO_CACHE: dict[str, Image.Image] = {}


def load_sample_photo(name: str) -> Image.Image:
    """One bundled photograph as an RGB PIL image (cached per process)."""
    if name not in _PHOTO_CACHE:
        path = os.path.join(sample_photo_dir(), name)
        if not os.path.isfile(path):
            raise MissingFileError(f"sample photograph {name!r} not found at {path!r} (scikit-image install "
                                    f"without its data files?)")
        _PHOTO_CACHE[name] = _open_rgb(path)
    return _PHOTO_CACHE[name]


class SampleImages(_AugmentedImages):
    """The built-in sample set: ``length`` random crops of the bundled photographs.

    Item ``i`` comes from photograph ``i % len(photos)`` (label = that photograph's position in
    ``photos``), so every photograph appears equally often. A crop is a random square of side
    ``crop_frac * shorter side`` with ``crop_frac`` uniform in ``[min_crop, max_crop]`` (a patch rather
    than the whole picture, so that small images still carry photographic detail), then the official
    augmentation at ``image_size`` when ``augment``, a centre crop otherwise. With ``augment=False``
    the crops are fixed by ``(seed, i)``; with ``augment=True`` they change with the epoch.

    A held-out split that keeps the classes (``region``): every photograph is cut into a *held-out
    region*, its bottom-right quadrant (columns ``W // 2`` onwards, rows ``H // 2`` onwards: a quarter of
    its area), and a *training region*, the L-shaped rest. ``region="train"`` draws crops that lie wholly
    in the training region (uniformly over every position where they fit), ``"heldout"`` crops that lie
    wholly in the quadrant; no training crop shares a pixel with any held-out crop. Both draw the crop side
    from the same range, at most half the shorter side (the largest square that fits in either region),
    so that the two differ in where they come from, not in scale. ``"all"`` (the default) crops anywhere.

    :param image_size: side of the square output
    :param length: number of items (crops) per epoch
    :param augment: draw new crops and flips every epoch (training) or keep them fixed (evaluation)
    :param seed: seeds the draws
    :param photos: file names in ``skimage/data`` (default :data:`SAMPLE_PHOTOS`)
    :param min_crop: smallest crop side as a fraction of the photograph's shorter side
    :param max_crop: largest crop side as that fraction (default 1 for ``"all"``, 0.5 for a region;
        at most 0.5 for a region)
    :param region: ``"all"``, ``"train"`` or ``"heldout"`` (see above)
    """

    REGIONS = ("all", "train", "heldout")

    def __init__(self, image_size: int, length: int = 512, augment: bool = True, seed: int = 0,
                 photos: Sequence[str] = SAMPLE_PHOTOS, min_crop: float = 0.3, max_crop: float | None = None,
                 region: str = "all") -> None:
        self.image_size = _check_size(image_size)
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise UsageError(f"length must be a positive int, got {length!r}")
        if region not in self.REGIONS:
            raise UsageError(f"region must be one of {self.REGIONS}, got {region!r}")
        limit = 1.0 if region == "all" else 0.5
        max_crop = limit if max_crop is None else float(max_crop)
        if not 0.0 < max_crop <= limit:
            raise UsageError(f"max_crop must be in (0, {limit}] for region {region!r}, got {max_crop}"
                             + (" (a crop must fit in the quadrant of the held-out split)" if limit < 1 else ""))
        if not 0.0 < min_crop <= max_crop:
            raise UsageError(f"min_crop must be in (0, max_crop = {max_crop}], got {min_crop}")
        if len(photos) == 0:
            raise UsageError("photos is empty")
        self.length = length
        self.augment = bool(augment)
        self.seed = _check_seed(seed)
        self.epoch = 0
        self.photos = tuple(photos)
        self.classes = [os.path.splitext(p)[0] for p in self.photos]
        self.min_crop = float(min_crop)
        self.max_crop = max_crop
        self.region = region
        sample_photo_dir()  # fail early, with the install hint, when scikit-image is missing

    def __len__(self) -> int:
        return self.length

    def _label(self, index: int) -> int:
        return index % len(self.photos)

    def _load(self, index: int) -> Image.Image:
        photo = load_sample_photo(self.photos[self._label(index)])
        # The patch depends on the epoch only when augmenting.
        rng = (_item_rng(_PATCH_PER_EPOCH, self.seed, self.epoch, index) if self.augment
               else _item_rng(_PATCH_FIXED, self.seed, 0, index))
        width, height = photo.size
        side = max(1, round(min(photo.size) * rng.uniform(self.min_crop, self.max_crop)))
        if self.region == "all":
            left = int(rng.integers(0, width - side + 1))
            top = int(rng.integers(0, height - side + 1))
        else:
            left, top = _region_corner(rng, width, height, side, self.region)
        return photo.crop((left, top, left + side, top + side))


def _region_corner(rng: np.random.Generator, width: int, height: int, side: int, region: str) -> tuple[int, int]:
    """Top-left corner of a ``side`` square drawn uniformly over the positions where it lies wholly in
    ``region`` of a ``width x height`` photograph (:class:`SampleImages`: the held-out region is the
    quadrant ``[W // 2, W) x [H // 2, H)``, the training region the rest)."""
    half_w, half_h = width // 2, height // 2
    side = max(1, min(side, half_w, half_h))  # fits in the quadrant and in either band of the L
    if region == "heldout":
        return (half_w + int(rng.integers(0, width - half_w - side + 1)),
                half_h + int(rng.integers(0, height - half_h - side + 1)))
    # The L is the union of the top band (rows < H // 2) and the left band (columns < W // 2): number the
    # corners of the top band first, then those of the left band that are not in the top band.
    cols, rows = width - side + 1, height - side + 1
    top_rows, left_cols = half_h - side + 1, half_w - side + 1
    r = int(rng.integers(0, top_rows * cols + left_cols * (rows - top_rows)))
    if r < top_rows * cols:
        return r % cols, r // cols
    r -= top_rows * cols
    return r % left_cols, top_rows + r // left_cols


def build_dataset(source: str, image_size: int, augment: bool = True, seed: int = 0,
                  sample_length: int = 512) -> ImageFolder | SampleImages:
    """``source == "sample"``: :class:`SampleImages`; otherwise an :class:`ImageFolder` at that path."""
    if source == "sample":
        return SampleImages(image_size, length=sample_length, augment=augment, seed=seed)
    return ImageFolder(source, image_size, augment=augment, seed=seed)


class TenCropImages(Dataset):
    """Items ``(crops [10, 3, S, S], label)`` of an :class:`ImageFolder` or :class:`SampleImages`: the image
    it would load, cut into the official ten crops (:func:`ten_crop_arr`) instead of its own transform, for
    ``fqgan extract-codes --ten-crop`` (stored as 10 augmentations of one image)."""

    NUM_CROPS = 10

    def __init__(self, images: ImageFolder | SampleImages, crop_range: float = 1.1) -> None:
        if not isinstance(images, _AugmentedImages):
            raise UsageTypeError(f"images must be an ImageFolder or SampleImages, got {type(images).__name__}")
        if int(images.image_size * crop_range) < images.image_size:
            raise UsageError(f"crop_range must be >= 1, got {crop_range}")
        self.images = images
        self.crop_range = float(crop_range)
        self.classes = list(images.classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        crops = ten_crop_arr(self.images._load(index), self.images.image_size, self.crop_range)
        return torch.stack([to_tensor(c) for c in crops]), self.images._label(index)


def collate(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack items: images ``[B, 3, H, W]`` float32, labels ``[B]`` int64."""
    images = torch.stack([b[0] for b in batch])
    labels = torch.tensor([b[1] for b in batch], dtype=torch.long)
    return images, labels
