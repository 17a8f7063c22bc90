"""What every benchmark asserts once, outside the timing, before it times a provider: that the
provider's result on the benchmarked shape equals the reference (issue 10, section 5: a benchmark
must not time a wrong answer).

The rules are the tests' rules, with the tests' tolerances (``tests/tolerances.py::TOLERANCES``, the
one table by dtype, and the per-op constants of the test files, loaded from there):

- nearest code: the chosen code's exact (float64) distance is the minimum within ``rtol * scale +
  atol``; indices equal the exact argmin wherever the runner-up is clearly farther (ties go either
  way); codes are the chosen rows (tests/test_nearest_code.py::check_against_reference).
- entropy loss: value and gradients no worse than twice eager fp32's error against float64, plus
  the dtype's tolerance scaled by the logits' conditioning (tests/test_entropy_loss.py::check).
- quantizer step: indices by the nearest-code rule; loss and gradients against the float32
  reference (tests/test_quantizer.py::test_gpu_training_step_matches_reference_backend).
- linear cross-entropy: error against the float32 truth no worse than eager's in the inputs' dtype
  plus ``TOL[dtype]`` (tests/test_linear_cross_entropy.py::check_no_worse_than_eager).
- sample: draw for draw equal to reference.sample given the same uniforms, except on rows whose
  decision sits within rounding of a threshold (tests/test_sample.py::assert_same_draws).

References that take seconds at full shapes are computed once per case and kept in a small
:class:`Memo` (the benchmark conftest orders the tests so that every provider of one case runs
back to back, so the memo holds one or two cases, not a whole file's gradients).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Hashable
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

from fqgan_kernels import reference as ref

TESTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
if TESTS_DIR not in sys.path:
    sys.path.append(TESTS_DIR)  # last: the suite's modules import `tolerances`; nothing here is shadowed


@functools.cache
def suite_module(name: str) -> ModuleType:
    """``tests/<name>.py`` imported by path (as ``_fqgan_tests_<name>``), for its constants."""
    path = os.path.join(TESTS_DIR, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_fqgan_tests_{name}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` for ``dtype`` from ``tests/tolerances.py::TOLERANCES``."""
    return suite_module("tolerances").TOLERANCES[dtype]


class Memo:
    """A few expensive references, keyed by case; the oldest is dropped beyond ``size``."""

    def __init__(self, size: int = 2):
        self.size = size
        self._items: OrderedDict[Hashable, object] = OrderedDict()

    def get(self, key: Hashable, compute: Callable[[], object]) -> object:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = compute()
        self.put(key, value)
        return value

    def put(self, key: Hashable, value: object) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items


def _max_err(x: Tensor, truth: Tensor) -> float:
    return (x.detach().cpu().double() - truth.detach().cpu().double()).abs().max().item() if truth.numel() else 0.0


def _amax(t: Tensor) -> float:
    return t.detach().double().abs().max().item() if t.numel() else 0.0


# -- nearest code --------------------------------------------------------------------------------
class ExactNearest(NamedTuple):
    zn: Tensor  # (N, k, D) float64, normalised when l2
    en: Tensor  # (k, K, D) float64, normalised when l2
    best: Tensor  # (N, k) exact minimum squared distance
    index: Tensor  # (N, k) an exact argmin (meaningful where ``separated``)
    separated: Tensor  # (N, k) runner-up clearly farther than the best
    scale: Tensor  # (N, k) |z|^2 + max |e|^2: the magnitude the distances are rounded at
    rtol: float
    atol: float


def exact_nearest(z: Tensor, codebooks: Tensor, l2: bool = True, chunk: int = 1024) -> ExactNearest:
    """Exact (float64) nearest codes of ``z`` (N, k, D) in ``codebooks`` (k, K, D), in row chunks so
    that the float64 distances stay small; tolerances by the inputs' dtype."""
    zn, en = ref.maybe_normalize(z.detach().cpu().double(), codebooks.detach().cpu().double(), l2)
    rtol, atol = tolerances(z.dtype)
    best, index, second = [], [], []
    e2 = (en * en).sum(-1)  # (k, K)
    for start in range(0, zn.shape[0], chunk):
        zc = zn[start:start + chunk]
        d = torch.stack([(zc[:, i] * zc[:, i]).sum(-1, keepdim=True) + e2[i] - 2.0 * zc[:, i] @ en[i].t()
                         for i in range(en.shape[0])], 1)  # (n, k, K)
        top = d.topk(min(2, d.shape[-1]), dim=-1, largest=False)
        best.append(top.values[..., 0])
        index.append(top.indices[..., 0])
        second.append(top.values[..., -1] if d.shape[-1] > 1 else torch.full_like(top.values[..., 0], float("inf")))
    best_t, second_t = torch.cat(best), torch.cat(second)
    scale = (zn * zn).sum(-1) + e2.max(-1).values
    separated = second_t - best_t > 10 * rtol * scale
    return ExactNearest(zn, en, best_t, torch.cat(index), separated, scale, rtol, atol)


def check_nearest(exact: ExactNearest, indices: Tensor, codes: Tensor | None = None, what: str = "") -> None:
    """``indices`` (N, k) choose a nearest code (the distance rule) and ``codes`` (N, k, D), when
    given, are those codes (the normalised rows when l2)."""
    idx = indices.detach().cpu().long()
    N, k = exact.best.shape
    if idx.shape != (N, k):
        raise AssertionError(f"{what}: indices have shape {tuple(idx.shape)}, expected {(N, k)}")
    K = exact.en.shape[1]
    if idx.min().item() < 0 or idx.max().item() >= K:
        raise AssertionError(f"{what}: indices outside [0, {K})")
    chosen_codes = torch.stack([exact.en[i][idx[:, i]] for i in range(k)], 1)  # (N, k, D)
    chosen = ((exact.zn - chosen_codes) ** 2).sum(-1)
    excess = chosen - exact.best
    bad = excess > exact.rtol * exact.scale + exact.atol
    if bad.any():
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} chosen codes are not nearest "
                             f"(worst excess distance {excess.max().item():.3g}, scale {exact.scale.max().item():.3g})")
    wrong = exact.separated & (idx != exact.index)
    if wrong.any():
        raise AssertionError(f"{what}: {int(wrong.sum())} indices differ from the exact argmin on rows without a tie")
    if codes is not None:
        rtol, atol = exact.rtol, exact.atol
        torch.testing.assert_close(codes.detach().cpu().double(), chosen_codes, rtol=rtol, atol=atol,
                                   check_dtype=False, msg=lambda m: f"{what}: codes are not the chosen rows: {m}")


# -- differentiable ops: loss and gradients ------------------------------------------------------
def check_no_worse_than_twice_eager(what: str, got: Tensor, eager: Tensor, truth: Tensor, rtol: float,
                                    atol: float) -> None:
    """The entropy rule: ``err <= 2 err_eager + atol + rtol max|truth|`` (errors against ``truth``)."""
    if tuple(got.shape) != tuple(truth.shape):
        raise AssertionError(f"{what}: shape {tuple(got.shape)}, expected {tuple(truth.shape)}")
    if not torch.isfinite(got).all():
        raise AssertionError(f"{what}: non-finite values")
    err, err_eager = _max_err(got, truth), _max_err(eager, truth)
    bound = 2 * err_eager + atol + rtol * _amax(truth)
    if err > bound:
        raise AssertionError(f"{what}: error {err:.3g} > {bound:.3g} (eager's error {err_eager:.3g})")


def entropy_conditioning(z: Tensor, codebooks: Tensor, temperature: float, l2: bool = True) -> float:
    """``max(1, max|a_nj| / 40)``: the factor tests/test_entropy_loss.py scales its tolerances by."""
    zn, en = ref.maybe_normalize(z.detach().cpu().double(), codebooks.detach().cpu().double(), l2)
    zmax, emax = zn.norm(dim=-1).max().item(), en.norm(dim=-1).max().item()
    return max(1.0, (2 * zmax * emax + emax**2) / temperature / 40.0)


def check_entropy(what: str, got: tuple[Tensor, ...], eager: tuple[Tensor, ...], truth: tuple[Tensor, ...],
                  dtype: torch.dtype, conditioning: float) -> None:
    """(loss, grad_z, grad_codebooks) by the entropy rule."""
    rtol, atol = tolerances(dtype)
    for name, g, e, t in zip(("loss", "grad_z", "grad_codebooks"), got, eager, truth):
        check_no_worse_than_twice_eager(f"{what} {name}", g, e, t, rtol * conditioning, atol * conditioning)


def check_close_to_reference(what: str, got: tuple[Tensor, ...], want: tuple[Tensor, ...],
                             names: tuple[str, ...] = ("loss", "grad_z", "grad_codebooks")) -> None:
    """The quantizer step's GPU-test rule against the float32 reference: loss rtol 1e-4, atol 1e-6;
    gradients rtol 1e-3, atol 1e-4 max|reference|."""
    for name, g, w in zip(names, got, want):
        g, w = g.detach().cpu(), w.detach().cpu()
        if name == "loss":
            rtol, atol = 1e-4, 1e-6
        else:
            rtol, atol = 1e-3, 1e-4 * _amax(w)
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{what} {n}: {m}")


def check_no_worse_than_eager(what: str, got: Tensor, eager: Tensor, truth: Tensor, dtype: torch.dtype) -> None:
    """The linear cross-entropy rule: ``err <= err_eager + TOL[dtype] max(max|truth|, 1)``."""
    tol = suite_module("test_linear_cross_entropy").TOL[dtype]
    if tuple(got.shape) != tuple(truth.shape):
        raise AssertionError(f"{what}: shape {tuple(got.shape)}, expected {tuple(truth.shape)}")
    if not torch.isfinite(got).all():
        raise AssertionError(f"{what}: non-finite values")
    scale = max(_amax(truth), 1.0)
    err, err_eager = _max_err(got, truth), _max_err(eager, truth)
    if err > err_eager + tol * scale:
        raise AssertionError(f"{what}: error {err:.3e} > eager {err_eager:.3e} + {tol:.0e} x {scale:.3g}")


# -- sample --------------------------------------------------------------------------------------
def check_draws(what: str, got: Tensor, want: Tensor, near_args: tuple) -> None:
    """Equal draws except on rows near a threshold, and those rare (the test's constants)."""
    t = suite_module("test_sample")
    got, want = got.detach().cpu(), want.detach().cpu()
    if got.shape != want.shape:
        raise AssertionError(f"{what}: tokens have shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    bad = got != want
    if not bad.any():
        return
    near = t.near_boundary(*(a.cpu() if isinstance(a, Tensor) else a for a in near_args))
    if (bad & ~near).any():
        raise AssertionError(f"{what}: {int(bad.sum())} of {got.numel()} draws differ, rows "
                             f"{bad.nonzero().flatten().tolist()[:8]}: got {got[bad][:8].tolist()} "
                             f"want {want[bad][:8].tolist()}")
    if near.float().mean().item() > t.MAX_NEAR_BOUNDARY:
        raise AssertionError(f"{what}: too many near-boundary rows ({int(near.sum())})")
