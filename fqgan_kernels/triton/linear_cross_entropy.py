"""Triton kernels of the fused linear + cross-entropy (maths in fqgan_kernels/linear_cross_entropy.py).

Forward ``_lce_fwd_kernel``: one program per (row block, head); it loops over V tiles, computes the
logits tile ``x @ W_tile^T`` (+ bias) with ``tl.dot`` over H blocks, and keeps per row a running
max / sum-exp (online log-sum-exp), the sum of logits and the target logit; it writes lse and the
per-row loss. Nothing of size N x V exists outside registers.

Backward ``_lce_bwd_kernel``: one program per (row block, V block, head); it recomputes the logits
tile, turns it into ``dlogits = g * ((1 + 2 zl lse) p - eps/V - (1 - eps) onehot)`` using the saved
lse, and accumulates ``grad_hidden[rows] += dlogits @ W_tile`` and ``grad_weight[tile] += dlogits^T @ x``
(and grad_bias) into float32 buffers with atomic adds over H blocks, as cut-cross-entropy does.
Float32 inputs use ``input_precision="ieee"`` dots (TF32 would move the logits by ~1e-3 relative);
bf16/fp16 inputs use native dots with float32 accumulation, dlogits cast to the input dtype for
the gradient dots (as cut-cross-entropy / Liger).

Launch (fqgan_kernels/triton/_launch.py): autotuned on a GPU over ``TUNING[(name, ieee)].configs``,
keyed on N's power-of-two bucket (``N_BUCKET``, read by no kernel), V and H; one small fixed config
under ``TRITON_INTERPRET=1`` (CPU tensors, tests) or with ``FQGAN_TRITON_AUTOTUNE=0``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backend import triton_interpret
from ._launch import Tuning, autotuned, launch, pow2_bucket


@triton.jit
def _lce_fwd_kernel(X_ptr, W_ptr, B_ptr, T_ptr, LOSS_ptr, LSE_ptr, N, V, H, N_BUCKET,
                    stride_xk, stride_xn, stride_wk, stride_wv, stride_bk, stride_tk, stride_ok,
                    ignore_index, eps, z_loss,
                    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_n = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_h = tl.arange(0, BLOCK_H)
    x_base = X_ptr + head * stride_xk + offs_n.to(tl.int64)[:, None] * stride_xn
    tgt = tl.load(T_ptr + head * stride_tk + offs_n, mask=mask_n, other=ignore_index)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    sum_z = tl.zeros((BLOCK_N,), tl.float32)
    z_t = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        w_base = W_ptr + head * stride_wk + offs_v.to(tl.int64)[:, None] * stride_wv
        acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        for h0 in range(0, H, BLOCK_H):
            mask_h = (h0 + offs_h) < H
            x = tl.load(x_base + (h0 + offs_h)[None, :], mask=mask_n[:, None] & mask_h[None, :], other=0.0)
            w = tl.load(w_base + (h0 + offs_h)[None, :], mask=mask_v[:, None] & mask_h[None, :], other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            if IEEE:
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        if HAS_BIAS:
            b = tl.load(B_ptr + head * stride_bk + offs_v, mask=mask_v, other=0.0).to(tl.float32)
            acc += b[None, :]
        z = tl.where(mask_v[None, :], acc, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m = m_new
        sum_z += tl.sum(tl.where(mask_v[None, :], acc, 0.0), 1)
        z_t += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], acc, 0.0), 1)
    lse = m + tl.log(s)
    valid = tgt != ignore_index
    loss = lse - (1.0 - eps) * z_t - eps / V * sum_z + z_loss * lse * lse
    loss = tl.where(valid, loss, 0.0)
    tl.store(LSE_ptr + head * stride_ok + offs_n, lse, mask=mask_n)
    tl.store(LOSS_ptr + head * stride_ok + offs_n, loss, mask=mask_n)


@triton.jit
def _lce_bwd_kernel(X_ptr, W_ptr, B_ptr, T_ptr, LSE_ptr, G_ptr, GX_ptr, GW_ptr, GB_ptr, N, V, H, N_BUCKET,
                    stride_xk, stride_xn, stride_wk, stride_wv, stride_bk, stride_tk, stride_ok,
                    ignore_index, eps, z_loss,
                    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    head = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_h = tl.arange(0, BLOCK_H)
    mask_n = offs_n < N
    mask_v = offs_v < V
    x_base = X_ptr + head * stride_xk + offs_n.to(tl.int64)[:, None] * stride_xn
    w_base = W_ptr + head * stride_wk + offs_v.to(tl.int64)[:, None] * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for h0 in range(0, H, BLOCK_H):
        mask_h = (h0 + offs_h) < H
        x = tl.load(x_base + (h0 + offs_h)[None, :], mask=mask_n[:, None] & mask_h[None, :], other=0.0)
        w = tl.load(w_base + (h0 + offs_h)[None, :], mask=mask_v[:, None] & mask_h[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        b = tl.load(B_ptr + head * stride_bk + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        acc += b[None, :]
    tgt = tl.load(T_ptr + head * stride_tk + offs_n, mask=mask_n, other=ignore_index)
    lse = tl.load(LSE_ptr + head * stride_ok + offs_n, mask=mask_n, other=0.0)
    g = tl.load(G_ptr + head * stride_ok + offs_n, mask=mask_n, other=0.0)
    g = tl.where(tgt != ignore_index, g, 0.0)
    p = tl.exp(acc - lse[:, None])
    d = g[:, None] * ((1.0 + 2.0 * z_loss * lse)[:, None] * p - eps / V)
    d -= tl.where(offs_v[None, :] == tgt[:, None], (g * (1.0 - eps))[:, None], 0.0)
    d = tl.where(mask_n[:, None] & mask_v[None, :], d, 0.0)
    if HAS_BIAS:
        tl.atomic_add(GB_ptr + head * V + offs_v, tl.sum(d, 0), mask=mask_v)
    dc = d.to(X_ptr.dtype.element_ty)
    if UPCAST:
        dc = dc.to(tl.float32)  # keeps the rounding to the input dtype
    gx_base = GX_ptr + head * N * H + offs_n.to(tl.int64)[:, None] * H
    gw_base = GW_ptr + head * V * H + offs_v.to(tl.int64)[:, None] * H
    for h0 in range(0, H, BLOCK_H):
        mask_h = (h0 + offs_h) < H
        x = tl.load(x_base + (h0 + offs_h)[None, :], mask=mask_n[:, None] & mask_h[None, :], other=0.0)
        w = tl.load(w_base + (h0 + offs_h)[None, :], mask=mask_v[:, None] & mask_h[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            gx = tl.dot(dc, w, input_precision="ieee")
            gw = tl.dot(tl.trans(dc), x, input_precision="ieee")
        else:
            gx = tl.dot(dc, w)
            gw = tl.dot(tl.trans(dc), x)
        tl.atomic_add(gx_base + (h0 + offs_h)[None, :], gx, mask=mask_n[:, None] & mask_h[None, :])
        tl.atomic_add(gw_base + (h0 + offs_h)[None, :], gw, mask=mask_v[:, None] & mask_h[None, :])


# -- launch: autotuned on the GPU, one fixed config otherwise (_launch.py) ------------------------------
KERNELS = {"fwd": _lce_fwd_kernel, "bwd": _lce_bwd_kernel}


def _config(bn: int, bv: int, bh: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": bh}, num_warps=warps, num_stages=stages)


# scripts/check_triton_compile.py removed every config that spills or exceeds shared memory on sm_90a
# or sm_80 for any dtype / bias variant: the old shared list's (128, 256, 64, 8w) (spills, and 272
# KiB of shared memory in the backward), (128, 64, 64, 4w) and (64, 128, 64, 4w) (spills), and for
# float32 all of it: IEEE float32 dots are FMA loops over register tiles (up to 14 KB of spills per
# thread), so float32 has its own smaller tiles, and its backward (two more dots per H block) smaller
# ones still.
_CONFIGS = {
    ("fwd", False): [(128, 128, 32, 8, 3), (64, 256, 32, 8, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3)],
    ("bwd", False): [(128, 128, 32, 8, 3), (64, 256, 32, 8, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3)],
    ("fwd", True): [(128, 64, 32, 8, 2), (64, 128, 32, 8, 2), (64, 64, 32, 4, 2), (32, 64, 32, 4, 2)],
    # (64, 64, 16, 8w, 2s) removed too: a 32-byte stack frame (spill) at 80 registers for float32 with
    # bias on sm_90a (check of 2026-11-30).
    ("bwd", True): [(64, 64, 32, 8, 2), (32, 64, 16, 4, 2), (64, 32, 16, 4, 2)],
}
# Keyed by (kernel, ieee): float32 inputs take IEEE float32 dots (FMA, no tensor cores), which need
# other tiles than the bf16/fp16 tensor-core dots.
TUNING = {
    (name, ieee): Tuning(configs=[_config(*c) for c in cfgs], default=_config(*cfgs[0]),
                         interpret=_config(16, 32, 16, 4, 3), key=["N_BUCKET", "V", "H"],
                         reset_to_zero=["GX_ptr", "GW_ptr", "GB_ptr"] if name == "bwd" else None)
    for (name, ieee), cfgs in _CONFIGS.items()
}
_TUNED = {key: autotuned(KERNELS[key[0]], tuning) for key, tuning in TUNING.items()}


def flags(dtype: torch.dtype, has_bias: bool) -> dict:
    """The constexprs of both kernels for inputs of ``dtype``.

    UPCAST: the Triton interpreter (numpy, no bfloat16) computes bf16 x bf16 dots wrongly (seen
    with triton 3.9), so under TRITON_INTERPRET=1 bf16 operands are converted to float32 before
    tl.dot (same values: products of bf16 are exact in float32). GPUs use native bf16 dots."""
    return {"HAS_BIAS": bool(has_bias), "IEEE": dtype == torch.float32,
            "UPCAST": triton_interpret() and dtype == torch.bfloat16}


def _launch(name: str, grid, args: tuple, meta: dict) -> None:
    key = (name, meta["IEEE"])
    launch(KERNELS[name], _TUNED[key], TUNING[key], grid, args, meta)


def _common(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None) -> tuple:
    k, n, h = hidden.shape
    v = weight.shape[1]
    b = bias if bias is not None else weight  # never read when HAS_BIAS is False
    strides = (hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
               b.stride(0), targets.stride(0), n)
    return k, n, h, v, b, strides


def forward(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, ignore_index: int,
            eps: float, z_loss: float) -> tuple[Tensor, Tensor]:
    """-> (per-row loss [k, N], lse [k, N]) in float32. Inputs contiguous."""
    k, n, h, v, b, strides = _common(hidden, weight, targets, bias)
    loss = torch.empty((k, n), dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(loss)
    args = (hidden, weight, b, targets, loss, lse, n, v, h, pow2_bucket(n), *strides, ignore_index, eps, z_loss)
    _launch("fwd", lambda m: (triton.cdiv(n, m["BLOCK_N"]), k), args, flags(hidden.dtype, bias is not None))
    return loss, lse


def backward(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, lse: Tensor, row_grad: Tensor,
             ignore_index: int, eps: float, z_loss: float) -> tuple[Tensor, Tensor, Tensor | None]:
    """-> (grad_hidden, grad_weight, grad_bias or None) in the input dtypes, for ``dL/dloss = row_grad``."""
    k, n, h, v, b, strides = _common(hidden, weight, targets, bias)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    gx = torch.zeros((k, n, h), **f32)
    gw = torch.zeros((k, v, h), **f32)
    gb = torch.zeros((k, v), **f32) if bias is not None else gw
    lse = lse.float().contiguous()
    row_grad = row_grad.float().contiguous()
    args = (hidden, weight, b, targets, lse, row_grad, gx, gw, gb, n, v, h, pow2_bucket(n), *strides, ignore_index,
            eps, z_loss)
    _launch("bwd", lambda m: (triton.cdiv(n, m["BLOCK_N"]), triton.cdiv(v, m["BLOCK_V"]), k), args,
            flags(hidden.dtype, bias is not None))
    return (gx.to(hidden.dtype), gw.to(weight.dtype),
            gb.to(bias.dtype) if bias is not None else None)
