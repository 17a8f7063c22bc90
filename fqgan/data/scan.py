"""The image folder's index, checked before step 1: one corrupt JPEG is found in minutes, not hours in.

:func:`scan_image_folder` lists the classes and files (:class:`~fqgan.data.datasets.ImageFolder`'s rules,
or a fixed class list from ``--classes FILE``), checks every file with PIL (:func:`verify_image`: the
structure, and a JPEG's whole stream at 1/8 scale) in a thread pool behind a progress bar, and returns a
:class:`FolderIndex`. A training run keeps it in its folder (``data_index.json``), so a resumed run does not
scan again. ``fqgan extract-codes`` and ``fqgan eval-generator`` (a reference folder) check the same way.
Bad files either stop the run before training (``--bad-images error``, the default: they are listed) or are
left out (``skip``: counted, and listed in ``bad_images.txt`` in the run folder).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from fqgan.runtime.errors import UsageError

__all__ = ["BAD_IMAGE_CHOICES", "FolderIndex", "read_classes_file", "scan_image_folder", "verify_image"]

BAD_IMAGE_CHOICES = ("error", "skip")
INDEX_FORMAT = 1


@dataclass
class FolderIndex:
    """An image folder's classes and (path, label) samples, with the files the scan found unreadable."""

    root: str
    classes: list[str]
    samples: list[tuple[str, int]]
    bad: list[tuple[str, str]]  # (path, reason)

    def save(self, path: str | os.PathLike) -> None:
        """Write as JSON (atomically)."""
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w") as f:
            json.dump({"format": INDEX_FORMAT, **asdict(self)}, f)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FolderIndex | None:
        """The index saved at ``path``, or None when there is none or it is unreadable (then: scan again)."""
        try:
            with open(path) as f:
                data = json.load(f)
            if data.pop("format") != INDEX_FORMAT:
                return None
            return cls(data["root"], list(data["classes"]), [(p, int(c)) for p, c in data["samples"]],
                       [(p, r) for p, r in data["bad"]])
        except (OSError, ValueError, KeyError, TypeError):
            return None


def read_classes_file(path: str | os.PathLike) -> list[str]:
    """Class names, one per line (blank lines and ``#`` comments ignored), in label order."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"--classes {path}: cannot read it ({exc.strerror or exc})") from None
    names = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not names:
        raise UsageError(f"--classes {path} lists no class")
    if len(set(names)) != len(names):
        raise UsageError(f"--classes {path} lists a class twice")
    return names


def verify_image(path: str) -> str | None:
    """None if PIL can read ``path``, else the reason.

    ``Image.verify`` checks the structure (a PNG's chunks and their CRCs, so also a cut-off PNG) but reads only
    a JPEG's header: a truncated JPEG, the common fault of an interrupted copy, passes it and fails later, in
    the middle of a run. So a JPEG is also decoded, at 1/8 scale (``draft``: DCT scaling, ~0.4 ms for
    500 x 375, half a full decode), which reads its whole entropy-coded stream; any other format but PNG is
    decoded in full."""
    try:
        with Image.open(path) as img:
            kind = img.format
            img.verify()
        if kind != "PNG":
            with Image.open(path) as img:  # verify() leaves the image unusable: open it again
                if kind == "JPEG":
                    img.draft(img.mode, (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
                img.load()
    except Exception as exc:  # PIL raises many types for bad files
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return None


def scan_image_folder(root: str | os.PathLike, *, classes: list[str] | None = None, bad_images: str = "error",
                      workers: int = 8, progress: bool = True,
                      skip_hint: str = "to train without them (they are listed in the run folder)") -> FolderIndex:
    """List and check an image folder (see the module docstring).

    :param classes: a fixed class list (``--classes FILE``): labels are positions in it, a listed class may
        be empty, a folder not listed is an error
    :param bad_images: ``"error"`` (raise ValueError listing the bad files) or ``"skip"`` (leave them out;
        they stay in ``FolderIndex.bad``)
    :param skip_hint: the end of the error's advice "pass --bad-images skip ...": what skipping does in the
        calling command
    """
    from .datasets import scan_folder

    if bad_images not in BAD_IMAGE_CHOICES:
        raise UsageError(f"--bad-images must be one of {BAD_IMAGE_CHOICES}, got {bad_images!r}")
    root = os.path.expanduser(os.fspath(root))
    samples, names = scan_folder(root, classes)
    paths = [p for p, _ in samples]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), desc="checking images", unit="img", dynamic_ncols=True)
    reasons: list[str | None] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # PIL releases the GIL while decoding
        for reason in pool.map(verify_image, paths, chunksize=64):
            reasons.append(reason)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    bad = [(p, r) for p, r in zip(paths, reasons) if r is not None]
    if bad and bad_images == "error":
        shown = "\n".join(f"  {p}: {r}" for p, r in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise UsageError(f"{len(bad)} of {len(paths)} images in {root} cannot be read:\n{shown}{more}\nFix or remove "
                         f"them, or pass --bad-images skip {skip_hint}")
    good = [s for s, r in zip(samples, reasons) if r is None]
    return FolderIndex(root, names, good, bad)
