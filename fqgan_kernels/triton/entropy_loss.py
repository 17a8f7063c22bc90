"""Streaming entropy loss, Triton: the four sweeps of fqgan_kernels/entropy_loss.py.

``a_nj = zs_n . e_j + eb_j`` with ``zs = (2/T) z`` (prepared in torch as [k, N, D]) and
``eb_j = -|e_j|^2 / T``; tiles [BLOCK_N, BLOCK_K] are recomputed in every sweep, never stored.
Dots use ``input_precision="ieee"``: at T = 0.01 a TF32 dot would move the logits by ~0.1.

* ``_entropy_rows_fwd_kernel``  program (row block, sub-codebook): online log-sum-exp -> lse, H.
* ``_entropy_colsum_kernel``    program (code block, sub-codebook), rows swept: S_j.
* ``_entropy_rows_bwd_kernel``  program (row block, sub-codebook): W, Q, A, B -> dL/dz, beta, 1/W.
* ``_entropy_grad_e_kernel``    program (code block, sub-codebook), rows swept: dL/de.
Each output element is written by exactly one program: no atomics, deterministic.

Launch (fqgan_kernels/triton/_launch.py): autotuned on a GPU over ``TUNING[(name, BLOCK_D)].configs``,
keyed on N's power-of-two bucket (``N_BUCKET``, read by no kernel), K and D; one fixed config under
``TRITON_INTERPRET=1`` (CPU tensors, tests) or with ``FQGAN_TRITON_AUTOTUNE=0``. D <= :data:`MAX_D`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._common import ENTROPY_GPU_MAX_D
from ._launch import Tuning, autotuned, launch, pow2_bucket


@triton.jit
def _entropy_rows_fwd_kernel(ZS_ptr, E_ptr, EB_ptr, LSE_ptr, ENT_ptr, N, K, D, N_BUCKET,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    rmask = rows < N
    dmask = dd < D
    z = tl.load(ZS_ptr + i * N * D + rows[:, None].to(tl.int64) * D + dd[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l_sum = tl.zeros((BLOCK_N,), tl.float32)
    t_sum = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < K
        e = tl.load(E_ptr + i * K * D + cols[:, None].to(tl.int64) * D + dd[None, :],
                    mask=cmask[:, None] & dmask[None, :], other=0.0)
        eb = tl.load(EB_ptr + i * K + cols, mask=cmask, other=0.0)
        a = tl.dot(z, tl.trans(e), input_precision="ieee") + eb[None, :]
        a = tl.where(cmask[None, :], a, float("-inf"))
        m_new = tl.maximum(m, tl.max(a, axis=1))
        # first tile: l = t = 0 and m = -inf; keep the rescale finite
        dm = tl.where(l_sum > 0, m - m_new, 0.0)
        alpha = tl.exp(dm)
        # padding columns: x = 0 then ex = 0, so no inf/NaN is ever formed
        x = tl.where(cmask[None, :], a - m_new[:, None], 0.0)
        ex = tl.where(cmask[None, :], tl.exp(x), 0.0)
        t_sum = alpha * (t_sum + dm * l_sum) + tl.sum(ex * x, axis=1)
        l_sum = alpha * l_sum + tl.sum(ex, axis=1)
        m = m_new
    log_l = tl.log(l_sum)
    tl.store(LSE_ptr + i * N + rows, m + log_l, mask=rmask)
    tl.store(ENT_ptr + i * N + rows, log_l - t_sum / l_sum, mask=rmask)


@triton.jit
def _entropy_colsum_kernel(ZS_ptr, E_ptr, EB_ptr, LSE_ptr, COL_ptr, N, K, D, N_BUCKET,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_k = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    dd = tl.arange(0, BLOCK_D)
    cmask = cols < K
    dmask = dd < D
    e = tl.load(E_ptr + i * K * D + cols[:, None].to(tl.int64) * D + dd[None, :],
                mask=cmask[:, None] & dmask[None, :], other=0.0)
    eb = tl.load(EB_ptr + i * K + cols, mask=cmask, other=0.0)
    acc = tl.zeros((BLOCK_K,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        rmask = rows < N
        z = tl.load(ZS_ptr + i * N * D + rows[:, None].to(tl.int64) * D + dd[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        lse = tl.load(LSE_ptr + i * N + rows, mask=rmask, other=0.0)
        a = tl.dot(z, tl.trans(e), input_precision="ieee") + eb[None, :]
        valid = rmask[:, None] & cmask[None, :]
        p = tl.where(valid, tl.exp(tl.where(valid, a - lse[:, None], 0.0)), 0.0)
        acc += tl.sum(p, axis=0)
    tl.store(COL_ptr + i * K + cols, acc, mask=cmask)


@triton.jit
def _entropy_rows_bwd_kernel(ZS_ptr, E_ptr, EB_ptr, LSE_ptr, GLSE_ptr, GENT_ptr, GCOL_ptr,
                             GZ_ptr, BETA_ptr, INVW_ptr, N, K, D, N_BUCKET, NUM_CB, two_over_t,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    rmask = rows < N
    dmask = dd < D
    z = tl.load(ZS_ptr + i * N * D + rows[:, None].to(tl.int64) * D + dd[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    lse = tl.load(LSE_ptr + i * N + rows, mask=rmask, other=0.0)
    w = tl.load(GENT_ptr + i * N + rows, mask=rmask, other=0.0)
    sw = tl.zeros((BLOCK_N,), tl.float32)
    sq = tl.zeros((BLOCK_N,), tl.float32)
    acc_a = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    acc_b = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < K
        e = tl.load(E_ptr + i * K * D + cols[:, None].to(tl.int64) * D + dd[None, :],
                    mask=cmask[:, None] & dmask[None, :], other=0.0)
        eb = tl.load(EB_ptr + i * K + cols, mask=cmask, other=0.0)
        c = tl.load(GCOL_ptr + i * K + cols, mask=cmask, other=0.0)
        lp = tl.dot(z, tl.trans(e), input_precision="ieee") + eb[None, :] - lse[:, None]
        lp = tl.where(cmask[None, :], lp, 0.0)
        p = tl.where(cmask[None, :], tl.exp(lp), 0.0)
        q = p * (c[None, :] - w[:, None] * lp)
        sw += tl.sum(p, axis=1)
        sq += tl.sum(q, axis=1)
        acc_a += tl.dot(q, e, input_precision="ieee")
        acc_b += tl.dot(p, e, input_precision="ieee")
    # renormalised by W = sum_j p (fqgan_kernels/entropy_loss.py, "Rounding")
    u = tl.load(GLSE_ptr + i * N + rows, mask=rmask, other=0.0)
    sw = tl.where(rmask, sw, 1.0)  # padding rows: keep them finite
    inv_w = 1.0 / sw
    beta = u - sq * inv_w
    gz = (two_over_t * inv_w)[:, None] * (acc_a + beta[:, None] * acc_b)
    tl.store(GZ_ptr + rows[:, None].to(tl.int64) * NUM_CB * D + i * D + dd[None, :], gz,
             mask=rmask[:, None] & dmask[None, :])
    tl.store(BETA_ptr + i * N + rows, beta, mask=rmask)
    tl.store(INVW_ptr + i * N + rows, inv_w, mask=rmask)


@triton.jit
def _entropy_grad_e_kernel(ZS_ptr, E_ptr, EB_ptr, LSE_ptr, GENT_ptr, GCOL_ptr, BETA_ptr, INVW_ptr, GE_ptr,
                           N, K, D, N_BUCKET, two_over_t,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_k = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    dd = tl.arange(0, BLOCK_D)
    cmask = cols < K
    dmask = dd < D
    e_offs = i * K * D + cols[:, None].to(tl.int64) * D + dd[None, :]
    e = tl.load(E_ptr + e_offs, mask=cmask[:, None] & dmask[None, :], other=0.0)
    eb = tl.load(EB_ptr + i * K + cols, mask=cmask, other=0.0)
    c = tl.load(GCOL_ptr + i * K + cols, mask=cmask, other=0.0)
    acc_g = tl.zeros((BLOCK_K,), tl.float32)
    acc_gz = tl.zeros((BLOCK_K, BLOCK_D), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        rmask = rows < N
        z = tl.load(ZS_ptr + i * N * D + rows[:, None].to(tl.int64) * D + dd[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        lse = tl.load(LSE_ptr + i * N + rows, mask=rmask, other=0.0)
        w = tl.load(GENT_ptr + i * N + rows, mask=rmask, other=0.0)
        beta = tl.load(BETA_ptr + i * N + rows, mask=rmask, other=0.0)
        inv_w = tl.load(INVW_ptr + i * N + rows, mask=rmask, other=0.0)
        valid = rmask[:, None] & cmask[None, :]
        lp = tl.where(valid, tl.dot(z, tl.trans(e), input_precision="ieee") + eb[None, :] - lse[:, None], 0.0)
        p = tl.where(valid, tl.exp(lp), 0.0)
        g = (p * inv_w[:, None]) * (c[None, :] - w[:, None] * lp + beta[:, None])
        acc_g += tl.sum(g, axis=0)
        acc_gz += tl.dot(tl.trans(g), z, input_precision="ieee")
    ge = acc_gz - two_over_t * e * acc_g[:, None]
    tl.store(GE_ptr + e_offs, ge, mask=cmask[:, None] & dmask[None, :])


# -- launch: autotuned on the GPU, one fixed config otherwise (_launch.py) ------------------------------
KERNELS = {
    "rows_fwd": _entropy_rows_fwd_kernel,
    "colsum": _entropy_colsum_kernel,
    "rows_bwd": _entropy_rows_bwd_kernel,
    "grad_e": _entropy_grad_e_kernel,
}
# rows_*: one program per row block (grid over N); colsum, grad_e: one per code block (grid over K)
GRID_OVER_ROWS = {"rows_fwd": True, "colsum": False, "rows_bwd": True, "grad_e": False}


def _config(bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# One list per kernel and BLOCK_D. The dots are float32 IEEE, i.e. FMA loops in which every thread
# holds its rows and columns of both operands across the whole reduction: the registers grow with the
# tile and with D, and the backward kernels carry two dots. Every config below compiles for sm_90a and
# sm_80 without a spill (scripts/check_triton_compile.py); the first is the default
# (FQGAN_TRITON_AUTOTUNE=0). (BLOCK_N, BLOCK_K, warps, stages):
_ROWS_FWD_UP_TO_32 = [(64, 64, 4, 2), (64, 128, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2), (32, 128, 4, 3),
                      (64, 256, 8, 2)]  # one dot, registers for the tile only: the same list up to D = 32
_LISTS = {
    16: {
        "rows_fwd": _ROWS_FWD_UP_TO_32,
        "colsum": [(64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2),
                   (32, 128, 8, 2)],
        "rows_bwd": [(64, 32, 4, 2), (32, 32, 4, 2), (64, 16, 4, 2), (16, 64, 4, 2), (128, 32, 8, 2),
                     (32, 32, 2, 2)],
        "grad_e": [(64, 32, 4, 2), (32, 32, 4, 2), (64, 16, 4, 2), (16, 64, 4, 2), (64, 64, 8, 2),
                   (128, 32, 8, 2)],
    },
    32: {
        "rows_fwd": _ROWS_FWD_UP_TO_32,
        "colsum": [(64, 64, 8, 2), (32, 32, 4, 2), (64, 32, 4, 2), (64, 16, 4, 2), (128, 32, 8, 2),
                   (32, 128, 8, 2)],
        "rows_bwd": [(32, 32, 4, 2), (64, 16, 4, 2), (16, 32, 4, 2), (32, 16, 4, 2), (64, 32, 8, 2),
                     (128, 16, 8, 2)],
        "grad_e": [(64, 32, 8, 2), (16, 32, 4, 2), (32, 16, 4, 2), (32, 64, 8, 2), (64, 16, 8, 2),
                   (128, 16, 8, 2)],
    },
    ENTROPY_GPU_MAX_D: {
        "rows_fwd": [(32, 32, 4, 2), (64, 16, 4, 2), (32, 16, 4, 2), (16, 32, 4, 2), (16, 32, 2, 2),
                     (32, 16, 2, 2)],
        "colsum": [(32, 32, 8, 2), (16, 32, 4, 2), (32, 16, 4, 2), (64, 16, 8, 2), (16, 64, 8, 2),
                   (16, 16, 2, 2)],
        "rows_bwd": [(32, 32, 8, 2), (16, 32, 4, 2), (32, 16, 4, 2), (32, 64, 8, 2), (16, 64, 8, 2),
                     (64, 16, 8, 2)],
        "grad_e": [(32, 32, 8, 2), (16, 32, 4, 2), (32, 16, 4, 2), (16, 64, 8, 2), (64, 16, 8, 2),
                   (16, 16, 2, 2)],
    },
}
MAX_D = ENTROPY_GPU_MAX_D  # the widest BLOCK_D with a list
TUNING = {
    (name, bd): Tuning(configs=[_config(*c) for c in lists[name]], default=_config(*lists[name][0]),
                       interpret=_config(16, 32, 4, 2), key=["N_BUCKET", "K", "D"])
    for bd, lists in _LISTS.items() for name in KERNELS
}
_TUNED = {key: autotuned(KERNELS[key[0]], tuning) for key, tuning in TUNING.items()}


def block_d(D: int) -> int:
    """``BLOCK_D`` of every entropy kernel: tl.dot needs every dim >= 16. D <= :data:`MAX_D` (the front
    door, fqgan_kernels/entropy_loss.py, refuses wider codes before any launch)."""
    return max(16, triton.next_power_of_2(D))


def _launch(name: str, N: int, K: int, k: int, args: tuple, D: int) -> None:
    key, size = ("BLOCK_N", N) if GRID_OVER_ROWS[name] else ("BLOCK_K", K)
    bd = block_d(D)
    launch(KERNELS[name], _TUNED[(name, bd)], TUNING[(name, bd)], lambda m: (triton.cdiv(size, m[key]), k), args,
           {"BLOCK_D": bd})


def _prepare(zn: Tensor, en: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    zs = (zn.float() * (2.0 / temperature)).permute(1, 0, 2).contiguous()  # [k, N, D]
    e = en.float().contiguous()
    eb = ((e * e).sum(-1) * (-1.0 / temperature)).contiguous()  # [k, K]
    return zs, e, eb


def entropy_stats(zn: Tensor, en: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """(lse [k, N], H [k, N], S [k, K]) float32; see fqgan_kernels/entropy_loss.py."""
    N, k, D = zn.shape
    K = en.shape[1]
    zs, e, eb = _prepare(zn, en, temperature)
    lse = torch.empty(k, N, device=zn.device, dtype=torch.float32)
    ent = torch.empty_like(lse)
    colsum = torch.zeros(k, K, device=zn.device, dtype=torch.float32)
    if N == 0:
        return lse, ent, colsum
    nb = pow2_bucket(N)
    _launch("rows_fwd", N, K, k, (zs, e, eb, lse, ent, N, K, D, nb), D)
    _launch("colsum", N, K, k, (zs, e, eb, lse, colsum, N, K, D, nb), D)
    return lse, ent, colsum


def entropy_backward(zn: Tensor, en: Tensor, lse: Tensor, grad_lse: Tensor, grad_ent: Tensor,
                     grad_colsum: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(dL/dzn [N, k, D], dL/den [k, K, D]) from the upstream gradients of (lse, H, S)."""
    N, k, D = zn.shape
    K = en.shape[1]
    zs, e, eb = _prepare(zn, en, temperature)
    # H is not an input: the backward renormalises p itself (fqgan_kernels/entropy_loss.py, "Rounding").
    lse, grad_lse, grad_ent, grad_colsum = (t.float().contiguous() for t in (lse, grad_lse, grad_ent, grad_colsum))
    grad_z = torch.empty(N, k, D, device=zn.device, dtype=torch.float32)
    grad_e = torch.zeros(k, K, D, device=zn.device, dtype=torch.float32)
    beta = torch.empty(k, N, device=zn.device, dtype=torch.float32)
    if N == 0:
        return grad_z.to(zn.dtype), grad_e.to(en.dtype)
    two_over_t = 2.0 / temperature
    inv_w = torch.empty_like(beta)
    nb = pow2_bucket(N)
    _launch("rows_bwd", N, K, k, (zs, e, eb, lse, grad_lse, grad_ent, grad_colsum, grad_z, beta, inv_w,
                                  N, K, D, nb, k, two_over_t), D)
    _launch("grad_e", N, K, k, (zs, e, eb, lse, grad_ent, grad_colsum, beta, inv_w, grad_e, N, K, D, nb,
                                two_over_t), D)
    return grad_z.to(zn.dtype), grad_e.to(en.dtype)
