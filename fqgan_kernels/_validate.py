"""Input checks shared by the public ops: clear ``TypeError``/``ValueError`` messages naming the
problem, raised before any kernel runs (never ``assert``, which ``python -O`` removes)."""

from __future__ import annotations

import os

import torch
from torch import Tensor

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOAT_DTYPES = (*KERNEL_DTYPES, torch.float64)

_check_finite = os.environ.get("FQGAN_KERNELS_CHECK_FINITE", "1") != "0"


def set_check_finite(enabled: bool) -> None:
    """Turn the NaN/Inf scan of inputs on or off (default on; ``FQGAN_KERNELS_CHECK_FINITE=0`` turns
    it off). The scan reads every input once and synchronises with the device; it is skipped
    inside ``torch.compile`` regions."""
    global _check_finite
    _check_finite = bool(enabled)


def check_finite_enabled() -> bool:
    return _check_finite and not torch.compiler.is_compiling()


def tensor(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def float_dtype(x: Tensor, name: str, allowed: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> None:
    if x.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have dtype in ({names}), got {x.dtype}")


def rank(x: Tensor, name: str, ndim: int, layout: str) -> None:
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")


def same_device(*named: tuple[str, Tensor]) -> None:
    first_name, first = named[0]
    for name, x in named[1:]:
        if x.device != first.device:
            raise ValueError(f"{name} is on {x.device} but {first_name} is on {first.device}")


def float_tensors(*specs: tuple[str, object, int, str]) -> None:
    """For each ``(name, x, ndim, layout)``: a tensor, of rank ``ndim``, of a float dtype; then all of
    one dtype and on one device (the first names the others' mismatch)."""
    for name, x, _, _ in specs:
        tensor(x, name)
    for name, x, ndim, layout in specs:
        rank(x, name, ndim, layout)
    for name, x, _, _ in specs:
        float_dtype(x, name)
    first_name, first = specs[0][0], specs[0][1]
    for name, x, _, _ in specs[1:]:
        if x.dtype != first.dtype:
            raise TypeError(f"{first_name} ({first.dtype}) and {name} ({x.dtype}) must have the same dtype")
    same_device(*((name, x) for name, x, _, _ in specs))


def finite_rows_many(*named: tuple[str, Tensor, int]) -> None:
    """:func:`finite_rows` for several ``(name, tensor, row_dims)`` with one device sync when all
    are finite (the common case); the detailed per-tensor message only on failure."""
    if not check_finite_enabled():
        return
    flags = [torch.isfinite(x).all() for _, x, _ in named if x.numel()]
    if not flags or bool(torch.stack(flags).all()):
        return
    for name, x, row_dims in named:
        finite_rows(x, name, row_dims)


def finite_rows(x: Tensor, name: str, row_dims: int = 1) -> None:
    """Raise if ``x`` has NaN/Inf, saying how many rows (leading ``row_dims`` dims) hold them."""
    if not check_finite_enabled() or x.numel() == 0:
        return
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        rows = bad.flatten(row_dims).any(-1)
        n_bad = int(rows.sum())
        first = tuple(int(i) for i in rows.nonzero()[0])
        raise ValueError(f"{name} has non-finite values (NaN or Inf) in {n_bad} of {rows.numel()} rows; "
                         f"first at index {first}")
