"""Fused codebook, commitment and disentanglement losses: the public op, custom ops and autograd.

Backends: ``reference`` (fqgan_kernels/reference.py), ``torch`` (the fused formulas in plain PyTorch,
this file), ``cpu`` (csrc/cpu/vq_losses.cpp), ``triton`` (fqgan_kernels/triton/vq_losses.py),
``cuda`` (csrc/cuda/vq_losses.cu).

Maths, with z the (normalised) encoder output and c the chosen (normalised) codes, both (N, k, D),
``P = k (k - 1) / 2`` pairs, ``q = normalize(c)`` per token and sub-codebook::

    codebook_i    = w_cb  * mean_{n,d} (c - sg[z])^2            trains the codebooks (through c)
    commitment_i  = w_cm  * mean_{n,d} (sg[c] - z)^2            trains the encoder (z)
    disentangle   = w_dis * mean_{a<b} mean_n (q_a . q_b)^2     trains the encoder (z) only

The disentanglement term is FQGAN's ``compute_disentangle_loss`` on the straight-through outputs
``z + (c - z).detach()``: its value is that of ``normalize(c)``, and its gradient reaches z through
the identity of the straight-through and the Jacobian of the normalisation evaluated at c; the
codebooks get nothing from it (tokenizer/vq_model_triple.py). Gradients, with g the upstream ones::

    dL/dz_a = -2 w_cm g_cm_a (c_a - z_a) / (N D) + J_a^T (2 w_dis g_dis / (P N)) sum_{b!=a} (q_a.q_b) q_b
    dL/dc_a =  2 w_cb g_cb_a (c_a - z_a) / (N D)
    J_a = (I - q_a q_a^T) / |c_a|  (I / eps where |c_a| <= eps, as F.normalize)

Forward is one pass over z and c producing k + P sums (deterministic fixed-size row blocks),
backward one pass producing grad_z and grad_codes. Neither touches the codebooks.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor

from . import _validate, reference
from ._backend import Op, Route, cpu_kernel, cuda_kernel, triton_kernel
from ._common import L2_EPS, compute_dtype, l2_normalize, straight_through
from .outputs import VQLossesOutput

__all__ = ["vq_losses"]


def _num_pairs(k: int) -> int:
    return k * (k - 1) // 2


# -- plain-PyTorch path (backend "torch", and float64 on the triton/cuda backends) ----------------
def _forward_torch(z: Tensor, codes: Tensor, disentangle: bool) -> Tensor:
    dt = compute_dtype(z)
    z, codes = z.to(dt), codes.to(dt)
    sq = ((codes - z) ** 2).sum(dim=(0, 2))  # (k,)
    k = z.shape[1]
    if not disentangle or k < 2:
        return sq
    q = l2_normalize(codes)
    a, b = torch.triu_indices(k, k, 1, device=z.device)
    dots = (q[:, a] * q[:, b]).sum(-1)  # (N, P)
    return torch.cat([sq, (dots * dots).sum(0)])


def _backward_torch(z: Tensor, codes: Tensor, coef: Tensor, disentangle: bool) -> tuple[Tensor, Tensor]:
    dt = compute_dtype(z)
    zf, cf = z.to(dt), codes.to(dt)
    coef = coef.to(dt)
    k = z.shape[1]
    diff = cf - zf  # (N, k, D)
    grad_z = -coef[:k, None] * diff
    grad_c = coef[k:2 * k, None] * diff
    if disentangle and k > 1:
        norm = cf.norm(dim=-1, keepdim=True)
        inv = 1.0 / norm.clamp_min(L2_EPS)
        q = cf * inv
        gram = torch.einsum("nad,nbd->nab", q, q)
        gram = gram - torch.diag_embed(torch.diagonal(gram, dim1=1, dim2=2))  # drop a == b
        gq = coef[2 * k] * torch.einsum("nab,nbd->nad", gram, q)
        radial = torch.where(norm > L2_EPS, (gq * q).sum(-1, keepdim=True), torch.zeros_like(norm))
        grad_z = grad_z + (gq - radial * q) * inv
    return grad_z.to(z.dtype), grad_c.to(codes.dtype)


OP = Op("vq_losses", {
    "forward": {
        "torch": Route(_forward_torch),
        "cpu": Route(cpu_kernel("vq_losses_forward")),  # accumulates float64 in float64
        # The GPU kernels are fp32-only: float64 (gradcheck) takes the torch path there.
        "triton": Route(triton_kernel("vq_losses", "vq_losses_forward"), float64="torch"),
        "cuda": Route(cuda_kernel("vq_losses_forward"), float64="torch"),
    },
    "backward": {
        "torch": Route(_backward_torch),
        "cpu": Route(cpu_kernel("vq_losses_backward")),
        "triton": Route(triton_kernel("vq_losses", "vq_losses_backward"), float64="torch"),
        "cuda": Route(cuda_kernel("vq_losses_backward"), float64="torch"),
    },
})


# -- custom ops ----------------------------------------------------------------------------------
@torch.library.custom_op("fqgan::vq_losses", mutates_args=())
def _vq_losses_op(z: Tensor, codes: Tensor, codebook_weight: float, commitment_weight: float,
                  disentangle_weight: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(codebook (k,), commitment (k,), disentangle ()) weighted; see the module docstring."""
    N, k, D = z.shape
    dis = disentangle_weight != 0.0 and k > 1
    sums = OP.run("forward", backend, z, codes, dis)
    mse = sums[:k] / (N * D)
    codebook = mse * codebook_weight
    commitment = mse * commitment_weight
    if dis:
        disentangle = sums[k:].sum() * (disentangle_weight / (N * _num_pairs(k)))
    else:
        disentangle = sums.new_zeros(())
    return codebook, commitment, disentangle


@_vq_losses_op.register_fake
def _(z, codes, codebook_weight, commitment_weight, disentangle_weight, backend):
    torch._check(z.dim() == 3 and z.shape == codes.shape, lambda: "z and codes must both be [N, k, D]")
    dt = torch.float64 if z.dtype == torch.float64 else torch.float32
    k = z.shape[1]
    return z.new_empty(k, dtype=dt), z.new_empty(k, dtype=dt), z.new_empty((), dtype=dt)


@torch.library.custom_op("fqgan::vq_losses_backward", mutates_args=())
def _vq_losses_backward_op(z: Tensor, codes: Tensor, coef: Tensor, disentangle: bool,
                           backend: str) -> tuple[Tensor, Tensor]:
    """(dL/dz, dL/dcodes) in one pass; ``coef`` = (commitment (k) | codebook (k) | disentangle (1))
    scales, already multiplied by the upstream gradients."""
    return OP.run("backward", backend, z, codes, coef, disentangle)


@_vq_losses_backward_op.register_fake
def _(z, codes, coef, disentangle, backend):
    return z.new_empty(z.shape), codes.new_empty(codes.shape)


def _setup_context(ctx, inputs, output) -> None:
    z, codes, codebook_weight, commitment_weight, disentangle_weight, backend = inputs
    ctx.save_for_backward(z, codes)
    ctx.weights = (codebook_weight, commitment_weight, disentangle_weight)
    ctx.backend = backend


def _backward(ctx, g_codebook: Tensor | None, g_commitment: Tensor | None, g_disentangle: Tensor | None):
    z, codes = ctx.saved_tensors
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return None, None, None, None, None, None
    N, k, D = z.shape
    w_cb, w_cm, w_dis = ctx.weights
    dt = torch.float64 if z.dtype == torch.float64 else torch.float32
    zeros = z.new_zeros(k, dtype=dt)
    g_codebook = zeros if g_codebook is None else g_codebook.to(dt)
    g_commitment = zeros if g_commitment is None else g_commitment.to(dt)
    g_disentangle = zeros[:1].sum() if g_disentangle is None else g_disentangle.to(dt)
    dis = w_dis != 0.0 and k > 1
    scale = 2.0 / (N * D)
    dis_scale = 2.0 * w_dis / (N * _num_pairs(k)) if dis else 0.0
    coef = torch.cat([g_commitment * (w_cm * scale), g_codebook * (w_cb * scale),
                      (g_disentangle * dis_scale).reshape(1)])
    grad_z, grad_codes = _vq_losses_backward_op(z, codes, coef, dis, ctx.backend)
    return (grad_z if ctx.needs_input_grad[0] else None,
            grad_codes if ctx.needs_input_grad[1] else None, None, None, None, None)


torch.library.register_autograd("fqgan::vq_losses", _backward, setup_context=_setup_context)


# -- public op -----------------------------------------------------------------------------------
def _weight(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    w = float(value)
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return w


def validate(z: object, codes: object, check_finite: bool | None = None) -> None:
    """The checks of :func:`vq_losses`."""
    _validate.float_tensors(("z", z, 3, "[N, k, D]"), ("codes", codes, 3, "[N, k, D]"))
    if z.shape != codes.shape:
        raise ValueError(f"z has shape {tuple(z.shape)} but codes has shape {tuple(codes.shape)}; "
                         "both must be [N, k, D]")
    if z.shape[0] == 0 or z.shape[1] == 0 or z.shape[2] == 0:
        raise ValueError(f"z has shape {tuple(z.shape)}: the losses are means over N >= 1 rows, "
                         "k >= 1 sub-codebooks and D >= 1 dims")
    _validate.finite(("z", z, 2), ("codes", codes, 2), enabled=check_finite)


def _reference(z: Tensor, codes: Tensor, w_cb: float, w_cm: float, w_dis: float) -> VQLossesOutput:
    """The ground truth composition (fqgan_kernels/reference.py)."""
    terms = reference.vq_losses(z, codes)
    if w_dis != 0.0 and z.shape[1] > 1:
        disentangle = w_dis * reference.disentangle_loss(straight_through(z, codes))
    else:
        disentangle = terms.codebook.new_zeros(())
    return VQLossesOutput(w_cb * terms.codebook, w_cm * terms.commitment, disentangle)


def vq_losses(z: Tensor, codes: Tensor, *, codebook_weight: float = 1.0, commitment_weight: float = 0.25,
              disentangle_weight: float = 0.0, backend: str | None = None,
              check_finite: bool | None = None) -> VQLossesOutput:
    """Equals ``(w_cb * reference.vq_losses(z, codes).codebook, w_cm * ....commitment,
    w_dis * reference.disentangle_loss(z + (codes - z).detach()))`` in value and in
    gradients, in one pass over z and codes forward and one backward.

    :param z: (N, k, D) encoder output (normalised when the quantizer normalises), float32,
        bfloat16, float16 or float64; receives the commitment and disentanglement gradients
    :param codes: (N, k, D) the chosen codes (e.g. from :func:`fqgan_kernels.nearest_code`), same
        dtype and device; receives the codebook-loss gradient only
    :param codebook_weight: weight of ``mean((codes - sg[z])^2)`` (FQGAN: 1)
    :param commitment_weight: beta (FQGAN: 0.25)
    :param disentangle_weight: FQGAN ``disentanglement_ratio`` (0.1 in its configs; 0 skips the term)
    :param backend: ``auto`` (default, or ``$FQGAN_KERNELS_BACKEND``), ``reference``, ``torch``,
        ``cpu``, ``triton`` or ``cuda``
    :param check_finite: scan z and codes for NaN/Inf (default: the process setting)
    :returns: :class:`~fqgan_kernels.outputs.VQLossesOutput` ``(codebook (k,), commitment (k,),
        disentangle ())``, float32 (float64 for float64 inputs)

    Source: FQGAN ``VectorQuantizer.forward`` (vq_loss, commit_loss) and
    ``compute_disentangle_loss`` averaged over the pairs (tokenizer/vq_model_triple.py).
    """
    validate(z, codes, check_finite)
    w_cb = _weight("codebook_weight", codebook_weight)
    w_cm = _weight("commitment_weight", commitment_weight)
    w_dis = _weight("disentangle_weight", disentangle_weight)
    name = OP.resolve(backend, z.device)
    if name == "reference":
        return _reference(z, codes, w_cb, w_cm, w_dis)
    codebook, commitment, disentangle = _vq_losses_op(z, codes, w_cb, w_cm, w_dis, name)
    return VQLossesOutput(codebook, commitment, disentangle)
