"""Streaming entropy loss per sub-codebook: the public op, its custom ops, autograd and DDP.

Backends: ``reference`` (fqgan_kernels/reference.py, N x K tensors), ``torch`` (the sweeps below in
plain PyTorch, row chunks, this file), ``cpu`` (csrc/cpu/entropy_loss.cpp), ``triton``
(fqgan_kernels/triton/entropy_loss.py), ``cuda`` (csrc/cuda/entropy_loss.cu).

Maths (per sub-codebook; z and e L2-normalised first when ``l2_normalize``, in torch, outside the
custom ops, so autograd handles the normalisation; that costs O(N*D + K*D))::

    a_nj = (2 z_n.e_j - |e_j|^2) / T        # = -d_nj / T + |z_n|^2 / T: a per-row constant, which
                                            # cancels in softmax, log_softmax and their gradients
    lse_n = logsumexp_j a_nj,  p_nj = exp(a_nj - lse_n)
    H_n   = -sum_j p_nj (a_nj - lse_n)      # exact log_softmax, as the reference
    S_j   = sum_n p_nj                      # column sums; avg_j = S_j / N (global N under DDP)
    loss  = mean_n H_n - H(avg),  H(avg) = -sum_j avg_j log(avg_j + 1e-5)

The custom op ``fqgan::entropy_stats`` returns (lse, H, S), O(N + K) per sub-codebook; the loss
is assembled from them in torch (so the DDP all-reduce of S and the 1e-5 term stay differentiable
by plain autograd). Its backward ``fqgan::entropy_backward`` takes the upstream gradients
u_n = dL/dlse_n, w_n = dL/dH_n, c_j = dL/dS_j and recomputes the tiles::

    G_nj = dL/da_nj = p_nj * (c_j - w_n (a_nj - lse_n) + beta_n),  beta_n = u_n - w_n H_n - s_n,
    s_n  = sum_j p_nj c_j
    dL/dz_n = (2/T) sum_j G_nj e_j                       = (2/T) (A_n + beta_n B_n) with
              A_n = sum_j p_nj (c_j - w_n (a_nj - lse_n)) e_j,  B_n = sum_j p_nj e_j
    dL/de_j = (2/T) (sum_n G_nj z_n - e_j sum_n G_nj)

(from dH_n/da_nj = -p_nj (log p_nj + H_n) and dS_j/da_nj' = p_nj (delta_jj' - p_nj'); verified
against torch autograd of ``reference.entropy_loss`` in float64 by tests/test_entropy_loss.py).

Rounding: in fp32 at T = 0.01 the logits reach hundreds, so lse_n carries an absolute error of
~1e-5 and the recomputed p_nj = exp(a_nj - lse_n) sum to W_n = 1 + O(1e-5) instead of 1. G_nj
sums to zero in exact arithmetic; with unnormalised p, A_n + beta_n B_n keeps an error of order
(W_n - 1) |c - w lp| |e| that no longer cancels (10-45x eager's error on rows where p is uniform
or one-hot). The backward therefore renormalises by the W_n it sees, which is exact for the true
p (W = 1) and removes the common factor of the lse error: with X_nj = c_j - w_n (a_nj - lse_n)
and Q_n = sum_j p_nj X_nj,

    beta_n = u_n - Q_n / W_n,   dL/dz_n = (2/T) (A_n + beta_n B_n) / W_n,

(H_n from the forward is then not needed), and sweep 4 uses G_nj = (p_nj / W_n) (X_nj + beta_n)
with the same lse_n (folding log W_n into lse_n instead would round it away: ulp(lse) ~ W - 1).

Sweeps over the N x K tile space (each sweep recomputes a_nj from z and e, D FMAs + one exp per
element; nothing N x K is ever stored):
  forward  2 sweeps: (1) rows: online log-sum-exp with the rescaling trick for lse_n and H_n;
                     (2) code blocks (each code owned by one thread/program, rows swept inside):
                         S_j = sum_n exp(a_nj - lse_n).
  backward 2 sweeps: (3) rows: W_n, Q_n, A_n, B_n in one sweep -> dL/dz_n, beta_n, 1/W_n;
                     (4) code blocks, rows swept inside: dL/de_j (deterministic, no atomics).
Sweep (1) could share its codebook sweep with the nearest-code search (same a_nj up to a row
constant: argmax_j a_nj = argmin_j d_nj); the quantizer currently runs them separately.

DDP (``distributed``; ``None`` = on when torch.distributed is initialised with world size > 1):
each rank's loss is ``mean_{n in rank} H_n - H(avg_global)`` with ``avg_global = sum_ranks S /
sum_ranks N`` (an all-reduce of the K-vector S and of the row count). The all-reduce's backward
all-reduces (sums) dL/dS over ranks, so after DDP averages parameter gradients over the W ranks
they equal the gradient of ``mean_ranks(loss_rank)``, which (with equal per-rank batch sizes) is
exactly the single-process loss on the concatenated global batch. The official FQGAN/LlamaGen code
instead uses each rank's local avg (``H(mean over the local batch)``): with global statistics the
codebook-usage term sees W times more samples, so it is less noisy and penalises a code being
unused on the whole global batch rather than on one rank's slice. Every rank must run the backward
(it holds a collective), as DDP training does anyway.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor

from . import reference
from ._backend import Op, Route, cpu_kernel, cuda_kernel, triton_kernel
from ._common import ENTROPY_EPS, ENTROPY_GPU_MAX_D, maybe_normalize
from .outputs import EntropyStatistics

__all__ = ["entropy_loss"]

_CHUNK_ELEMENTS = 1 << 20  # the torch path holds at most this many a_nj at once (4 MiB fp32)


# -- plain-PyTorch path (backend "torch", and float64 for gradcheck), chunked over rows ------------
def _rows_per_chunk(K: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(K, 1))


def _stats_torch(zn: Tensor, en: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    N, k, _ = zn.shape
    K = en.shape[1]
    lse = zn.new_empty(k, N)
    ent = zn.new_empty(k, N)
    colsum = zn.new_zeros(k, K)
    ebias = -(en * en).sum(-1) / temperature  # (k, K)
    step = _rows_per_chunk(K)
    for i in range(k):
        for s in range(0, N, step):
            a = (2.0 / temperature) * zn[s:s + step, i] @ en[i].t() + ebias[i]  # (n, K)
            m = a.max(-1, keepdim=True).values
            lp = a - m
            l_ = lp.exp().sum(-1, keepdim=True).log()
            lp = lp - l_  # log p
            p = lp.exp()
            lse[i, s:s + step] = (m + l_).squeeze(-1)
            ent[i, s:s + step] = -(p * lp).sum(-1)
            colsum[i] += p.sum(0)
    return lse, ent, colsum


def _backward_torch(zn: Tensor, en: Tensor, lse: Tensor, grad_lse: Tensor, grad_ent: Tensor,
                    grad_colsum: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    N, k, _ = zn.shape
    K = en.shape[1]
    grad_z = torch.empty_like(zn)
    grad_e = torch.zeros_like(en)
    ebias = -(en * en).sum(-1) / temperature
    step = _rows_per_chunk(K)
    scale = 2.0 / temperature
    for i in range(k):
        c = grad_colsum[i]
        for s in range(0, N, step):
            zc = zn[s:s + step, i]
            lp = scale * zc @ en[i].t() + ebias[i] - lse[i, s:s + step, None]  # log p, (n, K)
            p = lp.exp()
            p = p / p.sum(-1, keepdim=True)  # renormalised (module docstring, "Rounding")
            w = grad_ent[i, s:s + step, None]
            x = c - w * lp
            beta = grad_lse[i, s:s + step, None] - (p * x).sum(-1, keepdim=True)
            g = p * (x + beta)  # dL/da, (n, K)
            grad_z[s:s + step, i] = scale * (g @ en[i])
            grad_e[i] += scale * (g.t() @ zc - en[i] * g.sum(0)[:, None])
    return grad_z, grad_e


# The compiled kernels compute in fp32; float64 (gradcheck) goes through the torch path.
OP = Op("entropy_loss", {
    "stats": {
        "torch": Route(_stats_torch),
        "cpu": Route(cpu_kernel("entropy_stats"), float64="torch"),
        "triton": Route(triton_kernel("entropy_loss", "entropy_stats"), float64="torch"),
        "cuda": Route(cuda_kernel("entropy_stats"), float64="torch"),
    },
    "backward": {
        "torch": Route(_backward_torch),
        "cpu": Route(cpu_kernel("entropy_backward"), float64="torch"),
        "triton": Route(triton_kernel("entropy_loss", "entropy_backward"), float64="torch"),
        "cuda": Route(cuda_kernel("entropy_backward"), float64="torch"),
    },
})


# -- custom ops ----------------------------------------------------------------------------------
@torch.library.custom_op("fqgan::entropy_stats", mutates_args=())
def _entropy_stats_op(zn: Tensor, en: Tensor, temperature: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(lse (k, N), H (k, N), S (k, K)) of ``a = (2 zn.en - |en|^2) / T``; see the module docstring."""
    return OP.run("stats", backend, zn, en, float(temperature))


@_entropy_stats_op.register_fake
def _(zn: Tensor, en: Tensor, temperature: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    torch._check(zn.dim() == 3 and en.dim() == 3, lambda: "zn [N,k,D] and en [k,K,D]")
    torch._check(zn.shape[1] == en.shape[0] and zn.shape[2] == en.shape[2],
                 lambda: f"zn {tuple(zn.shape)} does not match en {tuple(en.shape)}")
    N, k = zn.shape[0], zn.shape[1]
    K = en.shape[1]
    return zn.new_empty(k, N), zn.new_empty(k, N), zn.new_empty(k, K)


@torch.library.custom_op("fqgan::entropy_backward", mutates_args=())
def _entropy_backward_op(zn: Tensor, en: Tensor, lse: Tensor, grad_lse: Tensor, grad_ent: Tensor,
                         grad_colsum: Tensor, temperature: float, backend: str) -> tuple[Tensor, Tensor]:
    """(dL/dzn, dL/den) from the upstream gradients of (lse, H, S), recomputing the tiles (H itself is not
    needed: the backward renormalises p from lse, module docstring "Rounding")."""
    return OP.run("backward", backend, zn, en, lse, grad_lse, grad_ent, grad_colsum, float(temperature))


@_entropy_backward_op.register_fake
def _(zn, en, lse, grad_lse, grad_ent, grad_colsum, temperature, backend):
    return zn.new_empty(zn.shape), en.new_empty(en.shape)


def _setup_context(ctx, inputs, output) -> None:
    zn, en, temperature, backend = inputs
    lse, _, _ = output
    ctx.save_for_backward(zn, en, lse)
    ctx.temperature = temperature
    ctx.backend = backend


def _backward(ctx, grad_lse: Tensor | None, grad_ent: Tensor | None, grad_colsum: Tensor | None):
    zn, en, lse = ctx.saved_tensors
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return None, None, None, None
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
    grad_ent = torch.zeros_like(lse) if grad_ent is None else grad_ent
    grad_colsum = en.new_zeros(en.shape[:2]) if grad_colsum is None else grad_colsum
    grad_z, grad_e = _entropy_backward_op(zn, en, lse, grad_lse.to(lse.dtype), grad_ent.to(lse.dtype),
                                          grad_colsum.to(lse.dtype), ctx.temperature, ctx.backend)
    return (grad_z if ctx.needs_input_grad[0] else None,
            grad_e if ctx.needs_input_grad[1] else None, None, None)


torch.library.register_autograd("fqgan::entropy_stats", _backward, setup_context=_setup_context)


# -- DDP -----------------------------------------------------------------------------------------
class _AllReduceSum(torch.autograd.Function):
    """``sum over ranks`` of a tensor; backward sums the gradient over ranks too, because every
    rank's loss depends on the global sum (d sum_r L_r / d x_r = sum_r dL_r/d(sum))."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        import torch.distributed as dist

        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def _use_distributed(distributed: bool | None) -> bool:
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be None, True or False, got {type(distributed).__name__}")
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    if distributed is None:
        return initialised and dist.get_world_size() > 1
    if distributed and not initialised:
        raise ValueError("distributed=True needs an initialised torch.distributed process group")
    return distributed


# -- public op -----------------------------------------------------------------------------------
def _check_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return t


def validate(z: object, codebooks: object, temperature: object, check_finite: bool | None = None) -> float:
    """The checks of :func:`entropy_loss`; returns the temperature as a float."""
    from .nearest_code import validate as validate_shapes

    t = _check_temperature(temperature)
    validate_shapes(z, codebooks, check_finite)
    return t


def entropy_loss(z: Tensor, codebooks: Tensor, temperature: float = 0.01, l2_normalize: bool = True, *,
                 distributed: bool | None = None, backend: str | None = None,
                 check_finite: bool | None = None) -> Tensor:
    """Equals :func:`fqgan_kernels.reference.entropy_loss` -- per sub-codebook i, with
    ``p = softmax(-cdist(z[:, i], e[i])**2 / T)``: ``mean_n H(p_n) - H(p.mean(0))``, the mean's
    entropy taken with ``log(avg + 1e-5)`` -- in value and gradients (to z and the codebooks),
    without any N x K buffer: two streaming sweeps forward, two backward, extra memory
    O(k * (N + K)) plus the normalised copies of z and the codebooks.

    :param z: (N, k, D) float32, bfloat16 or float16 (float64 runs on the ``torch`` path); the
        ``triton`` and ``cuda`` kernels take D <= 64 (FQGAN: 8), ``torch`` and ``cpu`` any D
    :param codebooks: (k, K, D), same dtype and device as ``z``
    :param temperature: T > 0 (FQGAN: 0.01)
    :param l2_normalize: normalise z and the codes first (FQGAN/LlamaGen ``l2_norm=True``)
    :param distributed: use the mean probability over the global batch of all DDP ranks
        (all-reduce, differentiable); ``None`` = on when torch.distributed is initialised with
        world size > 1. See the module docstring for how this differs from FQGAN's per-rank form.
    :param backend: ``auto`` (default, or ``$FQGAN_KERNELS_BACKEND``), ``reference``, ``torch``,
        ``cpu``, ``triton`` or ``cuda``
    :param check_finite: scan z and the codebooks for NaN/Inf (default: the process setting)
    :returns: (k,) float32 (float64 for float64 inputs), unweighted (FQGAN multiplies by
        ``entropy_loss_ratio``, 0.03)

    Source: LlamaGen/FQGAN ``compute_entropy_loss(-d)`` (tokenizer/vq_model_triple.py).
    """
    t = validate(z, codebooks, temperature, check_finite)
    dist_on = _use_distributed(distributed)
    name = OP.resolve(backend, z.device)
    routed = OP.routed("stats", name, z.dtype) if name != "reference" else name
    if routed in ("triton", "cuda") and z.shape[-1] > ENTROPY_GPU_MAX_D:
        raise ValueError(f"entropy_loss: the {routed} kernels take D <= {ENTROPY_GPU_MAX_D}, got D = {z.shape[-1]} "
                         f"(z shape {tuple(z.shape)}); use backend='torch' (any device) for wider codes")
    if z.shape[0] == 0 and not dist_on:
        raise ValueError(f"z has N = 0 rows (shape {tuple(z.shape)}): the entropy loss is a mean over rows")
    if name == "reference":
        stats = reference.entropy_statistics(z, codebooks, t, bool(l2_normalize))
    else:
        zn, en = maybe_normalize(z, codebooks, bool(l2_normalize))  # compute dtype (fp32/fp64)
        _lse, ent, colsum = _entropy_stats_op(zn, en, t, name)
        stats = EntropyStatistics(ent.sum(-1), colsum, ent.new_full((), float(zn.shape[0])))
    if not dist_on:
        return reference.entropy_from_statistics(stats)
    # Each rank: its own mean H(p_n), and H of the global mean probability (see the module docstring).
    sample_entropy = stats.entropy_sum / max(z.shape[0], 1)
    avg = _AllReduceSum.apply(stats.prob_sum) / _AllReduceSum.apply(stats.count)
    return sample_entropy + (avg * torch.log(avg + ENTROPY_EPS)).sum(-1)
