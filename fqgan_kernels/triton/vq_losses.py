"""Fused codebook / commitment / disentanglement losses in Triton (maths: fqgan_kernels/vq_losses.py).

Forward: each program takes ``BLOCK_N`` rows of z and codes [N, k, D] and writes its k + P partial
sums to its own row of a (programs, k + P) buffer, summed afterwards in a fixed order (no atomics,
deterministic). Backward: each program writes grad_z and grad_codes of its rows; nothing is reduced.
The k sub-codebooks and the pairs are unrolled at compile time (``K_SUB`` constexpr).
Launch (fqgan_kernels/triton/_launch.py): autotuned on a GPU over ``FWD_TUNING`` / ``BWD_TUNING``,
keyed on N's power-of-two bucket (``N_BUCKET``, read by no kernel), D, k and the disentanglement
flag; one fixed config under ``TRITON_INTERPRET=1`` (CPU tensors, tests) or with
``FQGAN_TRITON_AUTOTUNE=0``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import Tuning, autotuned, launch, pow2_bucket

_EPS = 1e-12  # F.normalize's eps
_FWD_BLOCK_N = 256  # rows per forward program: fixed, it sizes the partial-sum buffer


@triton.jit
def _load_sub(Z_ptr, C_ptr, rows, a, N, D: tl.constexpr, K_SUB: tl.constexpr, BLOCK_D: tl.constexpr):
    """z and codes of sub-codebook ``a`` for ``rows``, fp32 [BLOCK_N, BLOCK_D] (zeros outside)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs = rows.to(tl.int64)[:, None] * (K_SUB * D) + a * D + offs_d[None, :]
    mask = (rows[:, None] < N) & (offs_d[None, :] < D)
    z = tl.load(Z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(C_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return z, c, offs, mask


@triton.jit
def _normalize(c, EPS: tl.constexpr):
    norm = tl.sqrt(tl.sum(c * c, axis=1))
    inv = 1.0 / tl.maximum(norm, EPS)
    return c * inv[:, None], inv, norm > EPS


@triton.jit
def _vq_losses_fwd_kernel(Z_ptr, C_ptr, Part_ptr, N, N_BUCKET, D: tl.constexpr, K_SUB: tl.constexpr,
                          DISENTANGLE: tl.constexpr, SLOTS: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, EPS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    out = Part_ptr + pid.to(tl.int64) * SLOTS
    for a in tl.static_range(K_SUB):
        z, c, _, _ = _load_sub(Z_ptr, C_ptr, rows, a, N, D, K_SUB, BLOCK_D)
        diff = c - z
        tl.store(out + a, tl.sum(tl.sum(diff * diff, axis=1), axis=0))
    if DISENTANGLE:
        for a in tl.static_range(K_SUB):
            _, ca, _, _ = _load_sub(Z_ptr, C_ptr, rows, a, N, D, K_SUB, BLOCK_D)
            qa, _, _ = _normalize(ca, EPS)
            for b in tl.static_range(a + 1, K_SUB):
                _, cb, _, _ = _load_sub(Z_ptr, C_ptr, rows, b, N, D, K_SUB, BLOCK_D)
                qb, _, _ = _normalize(cb, EPS)
                dot = tl.sum(qa * qb, axis=1)
                pair = a * (2 * K_SUB - a - 1) // 2 + (b - a - 1)
                tl.store(out + K_SUB + pair, tl.sum(dot * dot, axis=0))


@triton.jit
def _vq_losses_bwd_kernel(Z_ptr, C_ptr, Coef_ptr, GZ_ptr, GC_ptr, N, N_BUCKET, D: tl.constexpr, K_SUB: tl.constexpr,
                          DISENTANGLE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          EPS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    for a in tl.static_range(K_SUB):
        z, c, offs, mask = _load_sub(Z_ptr, C_ptr, rows, a, N, D, K_SUB, BLOCK_D)
        diff = c - z
        gz = -tl.load(Coef_ptr + a) * diff
        gc = tl.load(Coef_ptr + K_SUB + a) * diff
        if DISENTANGLE:
            cdis = tl.load(Coef_ptr + 2 * K_SUB)
            qa, inva, big = _normalize(c, EPS)
            gq = tl.zeros_like(qa)
            for b in tl.static_range(K_SUB):
                if b != a:
                    _, cb, _, _ = _load_sub(Z_ptr, C_ptr, rows, b, N, D, K_SUB, BLOCK_D)
                    qb, _, _ = _normalize(cb, EPS)
                    dot = tl.sum(qa * qb, axis=1)
                    gq += (cdis * dot)[:, None] * qb
            radial = tl.where(big, tl.sum(gq * qa, axis=1), 0.0)
            gz += (gq - radial[:, None] * qa) * inva[:, None]
        tl.store(GZ_ptr + offs, gz.to(GZ_ptr.dtype.element_ty), mask=mask)
        tl.store(GC_ptr + offs, gc.to(GC_ptr.dtype.element_ty), mask=mask)


_KEY = ["N_BUCKET", "D", "K_SUB", "DISENTANGLE"]
FWD_TUNING = Tuning(configs=[triton.Config({}, num_warps=w) for w in (2, 4, 8)],
                    default=triton.Config({}, num_warps=4), interpret=triton.Config({}, num_warps=4), key=_KEY)
# (BLOCK_N 512, 4 warps) removed: 4 rows per thread at D = 16, k = 3 with the disentanglement pairs
# spill 64-4248 B per thread on sm_90a and sm_80 in every dtype (scripts/check_triton_compile.py,
# 2026-11-30).
BWD_TUNING = Tuning(configs=[triton.Config({"BLOCK_N": n}, num_warps=w)
                             for n, w in ((128, 4), (128, 8), (256, 4), (256, 8), (512, 8))],
                    default=triton.Config({"BLOCK_N": 256}, num_warps=4),
                    interpret=triton.Config({"BLOCK_N": 64}, num_warps=4), key=_KEY)
_fwd_tuned = autotuned(_vq_losses_fwd_kernel, FWD_TUNING)
_bwd_tuned = autotuned(_vq_losses_bwd_kernel, BWD_TUNING)


def meta(D: int, k: int, disentangle: bool) -> dict:
    """The constexprs shared by both kernels (also read by scripts/check_triton_compile.py)."""
    return {"D": D, "K_SUB": k, "DISENTANGLE": bool(disentangle and k > 1),
            "BLOCK_D": triton.next_power_of_2(D), "EPS": _EPS}


def fwd_slots(k: int, disentangle: bool) -> int:
    """Partial sums per forward program: k squared errors, then one per pair when disentangling."""
    return k + (k * (k - 1) // 2 if disentangle and k > 1 else 0)


def vq_losses_forward(z: Tensor, codes: Tensor, disentangle: bool) -> Tensor:
    """Sums [k + P] float32: per sub-codebook sum (codes - z)^2, then per pair sum_n (q_a . q_b)^2."""
    N, k, D = z.shape
    slots = fwd_slots(k, disentangle)
    programs = triton.cdiv(N, _FWD_BLOCK_N)
    part = torch.empty(programs, slots, device=z.device, dtype=torch.float32)
    launch(_vq_losses_fwd_kernel, _fwd_tuned, FWD_TUNING, lambda m: (programs,), (z, codes, part, N, pow2_bucket(N)),
           {**meta(D, k, disentangle), "SLOTS": slots, "BLOCK_N": _FWD_BLOCK_N})
    return part.sum(0)


def vq_losses_backward(z: Tensor, codes: Tensor, coef: Tensor, disentangle: bool) -> tuple[Tensor, Tensor]:
    """(grad_z, grad_codes) in the dtypes of z and codes; ``coef`` as in fqgan_kernels/vq_losses.py."""
    N, k, D = z.shape
    grad_z = torch.empty_like(z)
    grad_codes = torch.empty_like(codes)
    coef = coef.to(torch.float32).contiguous()
    launch(_vq_losses_bwd_kernel, _bwd_tuned, BWD_TUNING, lambda m: (triton.cdiv(N, m["BLOCK_N"]),),
           (z, codes, coef, grad_z, grad_codes, N, pow2_bucket(N)), meta(D, k, disentangle))
    return grad_z, grad_codes
