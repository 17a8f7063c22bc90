"""How every Triton kernel of this package is launched: autotuned on a GPU, one fixed config otherwise.

* GPU (default): ``triton.autotune`` over the kernel's config list, keyed on the shape class.
  Sizes that change from call to call (N = tokens in a batch, B = rows to sample) enter the key
  only as their power-of-two bucket (:func:`pow2_bucket`), so a new batch size does not start a
  new tuning sweep; sizes fixed by the model (K, V, H, D) enter as they are.
* ``FQGAN_TRITON_AUTOTUNE=0`` on a GPU: the kernel's ``default`` config, no sweep (fast tests).
* ``TRITON_INTERPRET=1`` (CPU tensors, tests): the kernel's ``interpret`` config; ``triton.autotune``
  needs an active GPU driver, which the interpreter does not have. The kernel body is the same.

``scripts/check_triton_compile.py`` compiles every config of every list for sm_90a and sm_80 and
fails on spills and on shared memory over the limit, so the lists hold only configs that fit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import triton

from .._backend import triton_interpret

AUTOTUNE_ENV = "FQGAN_TRITON_AUTOTUNE"
BUCKET_CAP = 1 << 20  # larger sizes share one bucket: the best tile no longer changes there


def pow2_bucket(n: int, cap: int = BUCKET_CAP) -> int:
    """The autotune key of a size that varies between calls: its next power of two (1 for n <= 1),
    capped at ``cap``."""
    return min(triton.next_power_of_2(max(int(n), 1)), cap)


@dataclass(frozen=True)
class Tuning:
    """The configs of one kernel: ``configs`` (autotuned on a GPU), ``default`` (GPU with
    ``FQGAN_TRITON_AUTOTUNE=0``; usually one of ``configs``), ``interpret`` (``TRITON_INTERPRET=1``:
    small tiles, few programs), and the autotune ``key`` (argument names)."""

    configs: Sequence[triton.Config]
    default: triton.Config
    interpret: triton.Config
    key: Sequence[str]
    reset_to_zero: Sequence[str] | None = None

    def all_configs(self) -> list[triton.Config]:
        """``configs`` plus ``default`` when it is not one of them: every config a GPU can run."""
        seen = {_config_id(c) for c in self.configs}
        extra = [] if _config_id(self.default) in seen else [self.default]
        return [*self.configs, *extra]


def _config_id(c: triton.Config) -> tuple:
    return tuple(sorted(c.all_kwargs().items()))


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "1") != "0"


def autotuned(kernel, tuning: Tuning):
    """``triton.autotune`` of ``kernel`` with ``tuning``'s configs and key."""
    return triton.autotune(configs=list(tuning.configs), key=list(tuning.key),
                           reset_to_zero=list(tuning.reset_to_zero) if tuning.reset_to_zero else None)(kernel)


def launch(kernel, tuned, tuning: Tuning, grid: Callable[[dict], tuple], args: tuple, meta: dict,
           fp_fusion: bool = True) -> None:
    """Runs ``kernel(*args, **meta)`` on ``grid(config)``: through ``tuned`` (its autotuned twin) on a
    GPU, else with one fixed config (module docstring).

    ``fp_fusion`` is passed explicitly (Triton 3.9 defaults to fusing a*b+c into one FMA and warns
    that 3.10 will not): FMA is one rounding instead of two, so it stays on except where a kernel
    must reproduce the reference's two roundings (docs/numerics.md)."""
    if triton_interpret() or not autotune_enabled():
        cfg = tuning.interpret if triton_interpret() else tuning.default
        kwargs = {**meta, **cfg.all_kwargs()}
        kernel[grid(kwargs)](*args, **kwargs, enable_fp_fusion=fp_fusion)
    else:
        tuned[grid](*args, **meta, enable_fp_fusion=fp_fusion)
