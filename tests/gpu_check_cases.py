"""Kernels with known defects, fed to scripts/check_triton_compile.py by tests/test_gpu_checks.py
(``--cases tests/gpu_check_cases.py``) to show that the check fails on each of them. All of them
run under the Triton interpreter; only the real compiler and ptxas see the defects.

* ``_spill_kernel``: two live [64, 128] float32 tiles in one warp = 512 values per thread, twice
  ptxas's 255 registers: spills (STACK > 0).
* ``_big_smem_kernel``: a bf16 ``tl.dot`` of [128, 64] x [64, 256] tiles pipelined over 6 stages:
  5 x 48 KiB of shared memory > 227 KiB per block.
* ``_small_k_dot_kernel``: a bf16 ``tl.dot`` with K = 8 (the compiler needs K >= 16 for 16-bit
  operands): compile error. The interpreter runs it (and, in triton 3.9, computes it wrongly).
* ``_good_kernel``: a plain copy, which must pass (the check does not fail everything).
"""

from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from check_triton_compile import Case


@triton.jit
def _spill_kernel(X_ptr, Y_ptr, n_iter, BM: tl.constexpr, BN: tl.constexpr):
    offs = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
    x = tl.load(X_ptr + offs)
    acc = tl.zeros((BM, BN), tl.float32)
    for _ in range(n_iter):  # x and acc both live across the loop
        acc = acc * x + 1.0
    tl.store(Y_ptr + offs, acc + x)


@triton.jit
def _big_smem_kernel(A_ptr, B_ptr, C_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(A_ptr + rm[:, None] * K + (k0 + rk)[None, :])
        b = tl.load(B_ptr + (k0 + rk)[:, None] * BN + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(C_ptr + rm[:, None] * BN + rn[None, :], acc)


@triton.jit
def _small_k_dot_kernel(A_ptr, B_ptr, C_ptr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a = tl.load(A_ptr + rm[:, None] * BK + rk[None, :])
    b = tl.load(B_ptr + rk[:, None] * BN + rn[None, :])
    tl.store(C_ptr + rm[:, None] * BN + rn[None, :], tl.dot(a, b))


@triton.jit
def _good_kernel(X_ptr, Y_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y_ptr + offs, tl.load(X_ptr + offs, mask=offs < N), mask=offs < N)


def _t(dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(16, dtype=dtype)


f32, bf16 = torch.float32, torch.bfloat16
CASES = [
    Case("bad", "_spill_kernel", "fp32", _spill_kernel, (_t(f32), _t(f32), 7), {"BM": 64, "BN": 128},
         [triton.Config({}, num_warps=1, num_stages=1)]),
    Case("bad", "_big_smem_kernel", "bf16", _big_smem_kernel, (_t(bf16), _t(bf16), _t(f32), 4096),
         {"BM": 128, "BN": 256, "BK": 64}, [triton.Config({}, num_warps=8, num_stages=6)]),
    Case("bad", "_small_k_dot_kernel", "bf16", _small_k_dot_kernel, (_t(bf16), _t(bf16), _t(f32)),
         {"BM": 16, "BN": 16, "BK": 8}, [triton.Config({}, num_warps=4, num_stages=1)]),
    Case("bad", "_good_kernel", "fp32", _good_kernel, (_t(f32), _t(f32), 4096), {"BLOCK": 1024},
         [triton.Config({}, num_warps=4, num_stages=1)]),
]
