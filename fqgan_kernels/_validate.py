"""Input checks shared by the public ops: clear ``TypeError``/``ValueError`` messages naming the
problem, raised before any kernel runs (never ``assert``, which ``python -O`` removes).

Value checks (NaN/Inf, index ranges) never synchronise with a GPU. On CPU tensors (outside
``torch.compile``) they read the data on the host and raise ``ValueError`` with the details; on
device tensors, and inside compiled regions, they become device-side asserts
(``torch._assert_async``): the step continues without waiting, and a violation stops the process at
the next synchronisation with the assert's message. :func:`on_host` is the one place that decides.

Two kinds of value checks:

* index ranges (targets of ``linear_cross_entropy``, ``decode_indices``): always on, because an
  out-of-range index would read or write memory outside its table;
* the NaN/Inf scan of float inputs: on by default; ``FQGAN_KERNELS_CHECK_FINITE=0``,
  :func:`set_check_finite` or an op's ``check_finite=False`` turn it off (it costs one pass over the
  inputs). It is skipped inside ``torch.compile`` regions.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOAT_DTYPES = (*KERNEL_DTYPES, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

_check_finite = os.environ.get("FQGAN_KERNELS_CHECK_FINITE", "1") != "0"


def set_check_finite(enabled: bool) -> None:
    """Turn the NaN/Inf scan of inputs on or off for the process (default on;
    ``FQGAN_KERNELS_CHECK_FINITE=0`` turns it off). Index-range checks stay on."""
    global _check_finite
    _check_finite = bool(enabled)


def check_finite_enabled(override: bool | None = None) -> bool:
    """Whether an op scans its inputs for NaN/Inf: ``override`` (an op's ``check_finite=``) if given,
    else the process setting; never inside ``torch.compile``."""
    enabled = _check_finite if override is None else bool(override)
    return enabled and not torch.compiler.is_compiling()


def on_host(x: Tensor) -> bool:
    """Value checks of ``x`` may read it on the host (CPU tensors, eager). Elsewhere they are
    device-side asserts, so that no check ever synchronises with a GPU."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def require(ok: Tensor, x: Tensor, summary: str, detail: Callable[[], str] | None = None) -> None:
    """Unless the 0-d bool tensor ``ok`` is true: on the host (CPU tensors, see :func:`on_host`) raise
    ``ValueError(detail())`` (``detail`` may read values; it runs only on failure), else a device-side
    assert with ``summary``, which names the problem from metadata only."""
    if on_host(x):
        if not bool(ok):
            raise ValueError(detail() if detail is not None else summary)
    else:
        torch._assert_async(ok, f"fqgan_kernels: {summary}")


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


def finite(*named: tuple[str, Tensor, int], enabled: bool | None = None) -> None:
    """Scan every ``(name, x, row_dims)`` for NaN/Inf in one pass each (when
    :func:`check_finite_enabled`): one host sync for all of them on CPU, a device-side assert
    elsewhere. The CPU message says how many rows (the leading ``row_dims`` dims) hold non-finite
    values and where the first one is."""
    if not check_finite_enabled(enabled):
        return
    named = tuple(item for item in named if item[1].numel())
    if not named:
        return
    # min and max propagate NaN and hold any +-inf: two finite extremes mean a finite tensor. One
    # reduction without a [numel] bool buffer: ~9x faster than isfinite(x).all() on CPU (0.06 vs
    # 0.52 ms for a [3, 16384, 8] codebook), which was half of nearest_code's time at N = 256.
    ok = torch.stack([torch.isfinite(torch.stack(torch.aminmax(x.detach()))).all() for _, x, _ in named]).all()
    names = ", ".join(name for name, _, _ in named)
    summary = f"non-finite values (NaN or Inf) in {names}"
    require(ok, named[0][1], summary, lambda: _first_non_finite(named) or summary)


def _first_non_finite(named: tuple[tuple[str, Tensor, int], ...]) -> str:
    for name, x, row_dims in named:
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            rows = bad.flatten(row_dims).any(-1)
            first = tuple(int(i) for i in rows.nonzero()[0])
            return (f"{name} has non-finite values (NaN or Inf) in {int(rows.sum())} of {rows.numel()} rows; "
                    f"first at index {first}")
    return ""


def index_range(indices: Tensor, name: str, size: int, *, ignore: int | None = None) -> None:
    """Every entry of ``indices`` is in ``[0, size)`` (or equals ``ignore``); always checked, without a
    sync on devices (see the module docstring)."""
    if indices.numel() == 0:
        return
    bad = (indices < 0) | (indices >= size)
    if ignore is not None:
        bad &= indices != ignore
    allowed = f"[0, {size})" + (f" or {ignore} (ignore_index)" if ignore is not None else "")

    def detail() -> str:
        first = tuple(int(i) for i in bad.nonzero()[0])
        return (f"{name} has {int(bad.sum())} entries outside {allowed}; first at index {first}: "
                f"value {int(indices[first])}")

    require(~bad.any(), indices, f"{name} has entries outside {allowed}", detail)
