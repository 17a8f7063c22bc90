"""Nearest code per sub-codebook: the public op, its custom-op registration and autograd.

Backends: ``reference`` (fqgan_kernels/reference.py), ``cpu`` (csrc/cpu/nearest_code.cpp),
``triton`` (fqgan_kernels/triton/nearest_code.py), ``cuda`` (csrc/cuda/nearest_code.cu).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _validate, reference
from ._backend import Op, Route, cpu_kernel, cuda_kernel, triton_kernel
from ._common import L2_EPS, maybe_normalize
from .outputs import NearestCodeOutput

__all__ = ["nearest_code"]

_CHUNK_ELEMENTS = 1 << 22  # the torch path holds at most this many distances at once (16 MiB fp32)


def _forward_torch(z: Tensor, codebooks: Tensor, l2_normalize: bool) -> tuple[Tensor, Tensor]:
    """The reference's distances and argmin, in row chunks (no N x K buffer)."""
    zn, en = maybe_normalize(z, codebooks, l2_normalize)
    N, k, _ = z.shape
    step = max(1, _CHUNK_ELEMENTS // codebooks.shape[1])
    indices = torch.empty(N, k, dtype=torch.long, device=z.device)
    for i in range(k):
        for s in range(0, N, step):
            indices[s:s + step, i] = reference.squared_distances(zn[s:s + step, i], en[i]).argmin(dim=-1)
    codes = torch.stack([en[i][indices[:, i]] for i in range(k)], 1).to(z.dtype)
    return codes, indices


OP = Op("nearest_code", {"forward": {
    "torch": Route(_forward_torch),
    # The compiled kernels search in fp32; float64 (gradcheck) takes the torch path.
    "cpu": Route(cpu_kernel("nearest_code"), float64="torch"),
    "triton": Route(triton_kernel("nearest_code", "nearest_code"), float64="torch"),
    "cuda": Route(cuda_kernel("nearest_code"), float64="torch"),
}})


@torch.library.custom_op("fqgan::nearest_code", mutates_args=())
def _nearest_code_op(z: Tensor, codebooks: Tensor, l2_normalize: bool, backend: str) -> tuple[Tensor, Tensor]:
    return OP.run("forward", backend, z, codebooks, l2_normalize)


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
        denom = norm.clamp_min(L2_EPS)
        e_hat = e / denom
        radial = (e_hat * grad_e).sum(-1, keepdim=True) * e_hat
        # d/de [e / max(|e|, eps)]: the radial part only exists where |e| > eps.
        grad_e = torch.where(norm > L2_EPS, grad_e - radial, grad_e) / denom
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


def validate(z: object, codebooks: object, check_finite: bool | None = None) -> None:
    """The checks of :func:`nearest_code` (shared with :func:`fqgan_kernels.entropy_loss`)."""
    _validate.float_tensors(("z", z, 3, "[N, k, D]"), ("codebooks", codebooks, 3, "[k, K, D]"))
    k, K, D = codebooks.shape
    if k == 0 or D == 0:
        raise ValueError(f"codebooks must have k >= 1 and D >= 1, got shape {tuple(codebooks.shape)}")
    if K == 0:
        raise ValueError(f"codebooks has K = 0 codes (shape {tuple(codebooks.shape)}); need K >= 1")
    if z.shape[1] != k or z.shape[2] != D:
        raise ValueError(f"z has shape {tuple(z.shape)} = [N, k, D] but codebooks has shape "
                         f"{tuple(codebooks.shape)} = [k, K, D]: k and D must match")
    _validate.finite(("z", z, 2), ("codebooks", codebooks, 2), enabled=check_finite)


def nearest_code(z: Tensor, codebooks: Tensor, l2_normalize: bool = True, *, backend: str | None = None,
                 check_finite: bool | None = None) -> NearestCodeOutput:
    """Equals :func:`fqgan_kernels.reference.nearest_code` -- per sub-codebook i,
    ``argmin_j ||z[:, i] - e[i, j]||^2`` over L2-normalised z and codes -- without building the
    N x K distance matrix: the compiled kernels stream codebook tiles and keep a running
    (min, argmin) per row, extra memory O(N*k + K*k*D), one launch for all k sub-codebooks.

    :param z: (N, k, D) float32, bfloat16 or float16 (float64 runs on the ``torch`` path)
    :param codebooks: (k, K, D), same dtype and device as ``z``
    :param l2_normalize: normalise z and the codes first (FQGAN/LlamaGen ``l2_norm=True``)
    :param backend: ``auto`` (default, or ``$FQGAN_KERNELS_BACKEND``), ``reference``, ``torch``,
        ``cpu``, ``triton`` or ``cuda``
    :param check_finite: scan z and the codebooks for NaN/Inf (default: the process setting, see
        :func:`fqgan_kernels.set_check_finite`); ``False`` when the caller has checked them already
    :returns: ``NearestCodeOutput(codes, indices)``: codes (N, k, D) in z's dtype, differentiable
        w.r.t. ``codebooks``; indices (N, k) int64. Ties go to the lowest index.
    """
    validate(z, codebooks, check_finite)
    name = OP.resolve(backend, z.device)
    if name == "reference":
        return reference.nearest_code(z, codebooks, l2_normalize)
    if z.shape[0] == 0:
        codes = codebooks.new_zeros(z.shape, dtype=z.dtype) + 0 * codebooks.sum()  # keeps the graph
        return NearestCodeOutput(codes, torch.zeros(z.shape[:2], dtype=torch.long, device=z.device))
    codes, indices = _nearest_code_op(z, codebooks, bool(l2_normalize), name)
    return NearestCodeOutput(codes, indices)
