"""The one door to torchvision: :func:`import_torchvision`. Every fqgan use of torchvision goes through it.

Why a door: the project pins the CPU wheel of torch 2.13.0, and the torchvision that pairs with it
(0.28.0) is on PyPI only as a CUDA build. Beside the CPU torch its compiled extension ``_C.so`` does
not load (it links ``libtorch_cuda.so`` / ``libc10_cuda.so``, absent from the CPU wheel);
torchvision notices that (``torchvision.extension._has_ops()`` is False) and registers none of its
C++ ops, but its ``_meta_registrations.py`` then calls ``torch.library.register_fake`` for
``torchvision::nms`` and ``torchvision::qnms`` without checking, so ``import torchvision`` stops with
``RuntimeError: operator torchvision::nms does not exist``.

The door imports torchvision normally. Only when that fails with exactly this missing-operator error
does it drop the half-imported ``torchvision`` modules from ``sys.modules``, define the missing
schemas (no kernel: the fake registration needs only the schema) and import again. Everything
written in Python then works: ``transforms`` (``TenCrop`` included), ``utils.make_grid`` /
``save_image``, ``models.vgg16``, ``datasets.folder``. The C++ ops (``ops.nms``, ``roi_align``,
``deform_conv2d``, the video and image decoders...) stay unavailable and raise torchvision's own
"Couldn't load custom C++ ops" error when called; fqgan uses none of them.

Where torchvision and torch match (a CUDA torch beside its CUDA torchvision, or a CPU torchvision
beside a CPU torch), the first import succeeds and nothing is defined.
"""

from __future__ import annotations

import importlib
import re
import sys
from types import ModuleType

import torch

__all__ = ["INSTALL_HINT", "import_torchvision"]

INSTALL_HINT = ("torchvision is needed for fqgan's image data, grids and LPIPS: pip install 'fqgan-kernels[model]' "
                "(or run scripts/setup_env.sh, which installs the torchvision that pairs with the pinned torch)")

# The schemas torchvision 0.28's _meta_registrations.py registers fakes for unconditionally, as its
# csrc/vision.cpp declares them. Only these are ever defined here, and only when missing.
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_MISSING_OP = re.compile(r"operator torchvision::(\w+) does not exist")

# Kept alive for the life of the process: a torch.library.Library's definitions go when it is collected.
_SCHEMA_LIBRARY: torch.library.Library | None = None


def _has_schema(name: str) -> bool:
    try:
        torch._C._get_schema(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True


def _forget_torchvision() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def _define_missing_schemas() -> list[str]:
    global _SCHEMA_LIBRARY
    missing = [name for name in _SCHEMAS if not _has_schema(name)]
    if missing:
        if _SCHEMA_LIBRARY is None:
            # FRAGMENT, not DEF: torchvision's own _C.so, if it ever loads later in the process, owns the namespace.
            _SCHEMA_LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
        for name in missing:
            _SCHEMA_LIBRARY.define(_SCHEMAS[name])
    return missing


def import_torchvision() -> ModuleType:
    """``import torchvision``, also where only its pure-Python parts can work (see the module docstring).

    :returns: the ``torchvision`` module.
    :raises ModuleNotFoundError: torchvision is not installed (the message says how to install it).
    :raises RuntimeError: torchvision fails to import for any other reason (raised unchanged).
    """
    module = sys.modules.get("torchvision")
    if module is not None and hasattr(module, "transforms"):  # already imported (by us or anyone)
        return module
    try:
        return importlib.import_module("torchvision")
    except ModuleNotFoundError as e:
        if e.name != "torchvision":
            raise
        raise ModuleNotFoundError(INSTALL_HINT, name="torchvision") from e
    except RuntimeError as e:
        match = _MISSING_OP.search(str(e))
        if match is None or match.group(1) not in _SCHEMAS:
            raise
        first_error = e
    _forget_torchvision()
    defined = _define_missing_schemas()
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as e:
        _forget_torchvision()
        raise RuntimeError(f"torchvision {_installed_version()} does not import beside torch {torch.__version__} "
                           f"even with the schemas {defined} defined (first error: {first_error}); install the "
                           "torchvision that pairs with this torch") from e


def _installed_version() -> str:
    try:
        from importlib.metadata import version

        return version("torchvision")
    except Exception:  # metadata missing or unreadable: the version is only for the message
        return "(unknown version)"
