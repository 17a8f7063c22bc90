"""Nearest code per sub-codebook: the public op, its custom-op registration and autograd.

Backends: ``reference`` (fqgan_kernels/reference.py), ``cpu`` (csrc/cpu/nearest_code.cpp),
``triton`` (fqgan_kernels/triton/nearest_code.py), ``cuda`` (csrc/cuda/nearest_code.cu).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import _ext, _validate, reference
from ._backend import resolve_backend
from .reference import NearestCode

__all__ = ["NearestCode", "nearest_code"]


def _reference_impl(z: Tensor, codebooks: Tensor, l2_normalize: bool) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        codes, idx = reference.nearest_code(z, codebooks, l2_normalize)
    return codes, idx


def _cpu_impl(z: Tensor, codebooks: Tensor, l2_normalize: bool) -> tuple[Tensor, Tensor]:
    return _ext.cpu().nearest_code(z, codebooks, l2_normalize)


def _triton_impl(z: Tensor, codebooks: Tensor, l2_normalize: bool) -> tuple[Tensor, Tensor]:
    from .triton import nearest_code as tk

    return tk.nearest_code(z, codebooks, l2_normalize)


def _cuda_impl(z: Tensor, codebooks: Tensor, l2_normalize: bool) -> tuple[Tensor, Tensor]:
    return _ext.cuda().nearest_code(z, codebooks, l2_normalize)


_IMPLS: dict[str, Callable[[Tensor, Tensor, bool], tuple[Tensor, Tensor]]] = {
    "reference": _reference_impl,
    "cpu": _cpu_impl,
    "triton": _triton_impl,
    "cuda": _cuda_impl,
}


@torch.library.custom_op("fqgan::nearest_code", mutates_args=())
def _nearest_code_op(z: Tensor, codebooks: Tensor, l2_normalize: bool, backend: str) -> tuple[Tensor, Tensor]:
    if backend != "reference" and z.dtype == torch.float64:
        # The compiled kernels search in fp32; float64 (gradcheck) goes through the reference.
        backend = "reference"
    codes, idx = _IMPLS[backend](z.contiguous(), codebooks.contiguous(), l2_normalize)
    return codes, idx


@_nearest_code_op.register_fake
def _(z: Tensor, codebooks: Tensor, l2_normalize: bool, backend: str) -> tuple[Tensor, Tensor]:
    torch._check(z.dim() == 3 and codebooks.dim() == 3, lambda: "z [N,k,D] and codebooks [k,K,D]")
    torch._check(z.shape[1] == codebooks.shape[0] and z.shape[2] == codebooks.shape[2],
                 lambda: f"z {tuple(z.shape)} does not match codebooks {tuple(codebooks.shape)}")
    return z.new_empty(z.shape), z.new_empty(z.shape[:2], dtype=torch.long)


@torch.library.custom_op("fqgan::nearest_code_backward", mutates_args=())
def _nearest_code_backward_op(grad_codes: Tensor, indices: Tensor, codebooks: Tensor,
                              l2_normalize: bool) -> Tensor:
    """Gradient of ``codes = normalize(codebooks)[i, indices[:, i]]`` w.r.t. ``codebooks``: a
    deterministic scatter-add of ``grad_codes`` into the chosen rows (sorted segments summed in
    float64 cumulative sums, no atomics), then the backward of the normalisation."""
    k, K, D = codebooks.shape
    flat = (indices + torch.arange(k, device=indices.device) * K).reshape(-1)  # (N*k,)
    g = grad_codes.reshape(-1, D).to(torch.float64)
    sorted_flat, order = torch.sort(flat, stable=True)
    csum = torch.cat([g.new_zeros(1, D), g[order].cumsum(0)])  # (N*k + 1, D)
    bounds = torch.searchsorted(sorted_flat, torch.arange(k * K + 1, device=flat.device))
    grad_e = (csum[bounds[1:]] - csum[bounds[:-1]]).reshape(k, K, D)
    if l2_normalize:
        e = codebooks.to(torch.float64)
        norm = e.norm(dim=-1, keepdim=True)
        denom = norm.clamp_min(reference.L2_EPS)
        e_hat = e / denom
        radial = (e_hat * grad_e).sum(-1, keepdim=True) * e_hat
        # d/de [e / max(|e|, eps)]: the radial part only exists where |e| > eps.
        grad_e = torch.where(norm > reference.L2_EPS, grad_e - radial, grad_e) / denom
    return grad_e.to(codebooks.dtype)


@_nearest_code_backward_op.register_fake
def _(grad_codes: Tensor, indices: Tensor, codebooks: Tensor, l2_normalize: bool) -> Tensor:
    return codebooks.new_empty(codebooks.shape)


def _setup_context(ctx, inputs, output) -> None:
    _, codebooks, l2_normalize, _ = inputs
    _, indices = output
    ctx.save_for_backward(codebooks, indices)
    ctx.l2_normalize = l2_normalize


def _backward(ctx, grad_codes: Tensor, grad_indices: Tensor | None):
    codebooks, indices = ctx.saved_tensors
    grad_codebooks = None
    if ctx.needs_input_grad[1]:
        grad_codebooks = _nearest_code_backward_op(grad_codes.contiguous(), indices, codebooks,
                                                   ctx.l2_normalize)
    # codes are piecewise constant in z: no gradient to z (the quantizer's straight-through adds it).
    return None, grad_codebooks, None, None


torch.library.register_autograd("fqgan::nearest_code", _backward, setup_context=_setup_context)


def validate(z: Tensor, codebooks: Tensor) -> None:
    """The checks of :func:`nearest_code`, shared with the quantizer."""
    _validate.float_tensors(("z", z, 3, "[N, k, D]"), ("codebooks", codebooks, 3, "[k, K, D]"))
    k, K, D = codebooks.shape
    if k == 0 or D == 0:
        raise ValueError(f"codebooks must have k >= 1 and D >= 1, got shape {tuple(codebooks.shape)}")
    if K == 0:
        raise ValueError(f"codebooks has K = 0 codes (shape {tuple(codebooks.shape)}); need K >= 1")
    if z.shape[1] != k or z.shape[2] != D:
        raise ValueError(f"z has shape {tuple(z.shape)} = [N, k, D] but codebooks has shape "
                         f"{tuple(codebooks.shape)} = [k, K, D]: k and D must match")
    _validate.finite_rows(z, "z", row_dims=2)
    _validate.finite_rows(codebooks, "codebooks", row_dims=2)


def nearest_code(z: Tensor, codebooks: Tensor, l2_normalize: bool = True, *,
                 backend: str | None = None) -> NearestCode:
    """Equals :func:`fqgan_kernels.reference.nearest_code` -- per sub-codebook i,
    ``argmin_j ||z[:, i] - e[i, j]||^2`` over L2-normalised z and codes -- without building the
    N x K distance matrix: the compiled kernels stream codebook tiles and keep a running
    (min, argmin) per row, extra memory O(N*k + K*k*D), one launch for all k sub-codebooks.

    :param z: (N, k, D) float32, bfloat16 or float16 (float64 runs on the reference path)
    :param codebooks: (k, K, D), same dtype and device as ``z``
    :param l2_normalize: normalise z and the codes first (FQGAN/LlamaGen ``l2_norm=True``)
    :param backend: ``auto`` (default, or ``$FQGAN_KERNELS_BACKEND``), ``reference``, ``cpu``,
        ``triton`` or ``cuda``
    :returns: ``NearestCode(codes, indices)``: codes (N, k, D) in z's dtype, differentiable w.r.t.
        ``codebooks``; indices (N, k) int64. Ties go to the lowest index.
    """
    validate(z, codebooks)
    name = resolve_backend("nearest_code", backend, z.device)
    if z.shape[0] == 0:
        codes = codebooks.new_zeros(z.shape, dtype=z.dtype) + 0 * codebooks.sum()  # keeps the graph
        return NearestCode(codes, torch.zeros(z.shape[:2], dtype=torch.long, device=z.device))
    codes, indices = _nearest_code_op(z, codebooks, bool(l2_normalize), name)
    return NearestCode(codes, indices)
