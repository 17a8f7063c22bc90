"""Nearest code per sub-codebook, Triton.

Equals, per sub-codebook i, ``idx = argmin_j ||zh_n - eh_j||^2`` (ties: lowest j) and
``codes = eh[idx].to(z.dtype)``, with ``zh = F.normalize(z)``, ``eh = F.normalize(codebooks)``
(eps 1e-12) when ``l2_normalize``, else z and the codebooks as given (fqgan_kernels/reference.py),
without building the N x K distance matrix.

``||zh - eh_j||^2 = ||zh||^2 - 2 (zh . eh_j - 0.5 ||eh_j||^2)``, so the kernel keeps a running
argmax of the score ``s_nj = zh_n . eh_j + b_j`` with ``b_j = -0.5 ||eh_j||^2``. The bias is kept
with ``l2_normalize`` as well: it is -0.5 for every unit code but 0 for an all-zero codebook row,
which the reference treats as distance ``||zh||^2``. z is normalised in registers (one scale per
row), never written.

* ``_nearest_code_prep_kernel``   program (code block, sub-codebook): eh in float32, transposed to
  [k, D, K] so a tile's column d is one contiguous load, and b [k, K]. 4 (D + 1) k K bytes.
* ``_nearest_code_fwd_kernel``    program (row block, sub-codebook): streams the codebook in
  [BLOCK_D, BLOCK_K] tiles. D < 16: D unrolled outer products (D is a constexpr: no padding);
  D >= 16: ``tl.dot`` on D padded to a power of two (masked). Dots in float32 with
  ``input_precision="ieee"``: a TF32 dot (10-bit mantissa) would reorder near-ties. A running
  (best score, best j) per tile element is updated with a strict ``>`` (tiles come in increasing
  j, so each element keeps its lowest j), and reduced once per row block at the end: the row max,
  then the lowest j holding it. The epilogue gathers the chosen rows of eh into ``codes``.

Launch (fqgan_kernels/triton/_launch.py): autotuned on a GPU over ``FWD_TUNING.configs``, keyed on
N's power-of-two bucket; ``FWD_TUNING.default`` with ``FQGAN_TRITON_AUTOTUNE=0``;
``FWD_TUNING.interpret`` under ``TRITON_INTERPRET=1`` (CPU tensors, tests).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import Tuning, autotuned, launch, pow2_bucket

L2_EPS = 1e-12  # F.normalize's default, as in the reference

# D below this: unrolled outer products; at or above: tl.dot (needs all dot dims >= 16).
DOT_MIN_D = 16



@triton.jit
def _nearest_code_prep_kernel(E_ptr, ET_ptr, B_ptr, K, D,
                              L2: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """eh = codebooks / max(||codebooks||, eps) (or as given) -> ET [k, D, K] float32; B = -0.5 ||eh||^2."""
    pid = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    rows = (pid * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    dd = tl.arange(0, BLOCK_D).to(tl.int64)
    rmask = rows < K
    mask = rmask[:, None] & (dd[None, :] < D)
    e = tl.load(E_ptr + i * K * D + rows[:, None] * D + dd[None, :], mask=mask, other=0.0).to(tl.float32)
    if L2:
        norm = tl.sqrt_rn(tl.sum(e * e, axis=1))
        e = tl.div_rn(e, tl.maximum(norm, 1e-12)[:, None])
    bias = -0.5 * tl.sum(e * e, axis=1)
    tl.store(ET_ptr + i * D * K + dd[None, :] * K + rows[:, None], e, mask=mask)
    tl.store(B_ptr + i * K + rows, bias, mask=rmask)


@triton.jit
def _nearest_code_fwd_kernel(Z_ptr, ET_ptr, B_ptr, CODES_ptr, IDX_ptr, N, K, NSUB, N_BUCKET,
                             D: tl.constexpr, L2: tl.constexpr, USE_DOT: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Z [N, NSUB, D] (any float dtype), ET [NSUB, D, K] fp32, B [NSUB, K] fp32 ->
    CODES [N, NSUB, D] (dtype of Z), IDX [N, NSUB] int64. N_BUCKET only keys the autotuner."""
    pid_n = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rmask = rows < N
    dd = tl.arange(0, BLOCK_D).to(tl.int64)
    dmask = dd < D
    stride_zn = NSUB * D  # z and codes are [N, NSUB, D] contiguous
    z_row = Z_ptr + rows * stride_zn + i * D  # [BLOCK_N] pointers to z[n, i, 0]
    K64 = K + 0 * i  # int64 even when K is specialised to a constant: d * K64 may pass 2**31
    et_base = ET_ptr + i * D * K64
    b_base = B_ptr + i * K64

    # One scale per row: zh = z / max(||z||, eps). Padded rows load 0 and get a finite scale.
    z = tl.load(z_row[:, None] + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    if L2:
        scale = 1.0 / tl.maximum(tl.sqrt_rn(tl.sum(z * z, axis=1)), 1e-12)
    else:
        # Exactly 1 for finite z (the front door rejects non-finite z), but computed from the z tile,
        # as with L2: a constant scale left z dead, the layout pass then gave the score tile one row
        # per thread, and the D broadcast z columns hoisted out of the K loop took 8 x 32 registers
        # and spilled (scripts/check_triton_compile.py, fp32/bf16/fp16 at D = 8).
        scale = 1.0 + 0.0 * tl.sum(z * z, axis=1)
    if USE_DOT:
        zh = z * scale[:, None]

    best = tl.full((BLOCK_N, BLOCK_K), float("-inf"), tl.float32)
    best_j = tl.zeros((BLOCK_N, BLOCK_K), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < K
        if USE_DOT:
            et = tl.load(et_base + dd[:, None] * K64 + cols[None, :], mask=dmask[:, None] & cmask[None, :], other=0.0)
            s = tl.dot(zh, et, input_precision="ieee")
        else:
            s = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
            for d in tl.static_range(D):
                # z column d is re-read per tile from L1 (1 load per BLOCK_K FMAs): cheaper in
                # registers than extracting it from the [BLOCK_N, BLOCK_D] tile.
                zd = tl.load(z_row + d, mask=rmask, other=0.0).to(tl.float32) * scale
                ed = tl.load(et_base + d * K64 + cols, mask=cmask, other=0.0)
                s += zd[:, None] * ed[None, :]
        bias = tl.load(b_base + cols, mask=cmask, other=0.0)
        s = tl.where(cmask[None, :], s + bias[None, :], float("-inf"))
        better = s > best  # strict: a later (higher) j never replaces an equal score
        best = tl.where(better, s, best)
        best_j = tl.where(better, cols[None, :], best_j)

    row_best = tl.max(best, axis=1)
    # Lowest j among the elements holding the row max. If a row has no finite score (NaN input,
    # rejected by the front door), every element is -inf with j = 0, so j stays in range.
    j = tl.min(tl.where(best == row_best[:, None], best_j, 2147483647), axis=1)
    tl.store(IDX_ptr + rows * NSUB + i, j.to(tl.int64), mask=rmask)

    omask = rmask[:, None] & dmask[None, :]
    code = tl.load(et_base + dd[None, :] * K64 + j.to(tl.int64)[:, None], mask=omask, other=0.0)
    tl.store(CODES_ptr + rows[:, None] * stride_zn + i * D + dd[None, :], code.to(CODES_ptr.dtype.element_ty),
             mask=omask)


# The prep kernel runs once per call over k * K codes: one fixed config, not tuned.
PREP_CONFIG = triton.Config({"BLOCK": 64}, num_warps=4, num_stages=3)


def prep_meta(D: int, l2: bool) -> dict:
    """The constexprs of ``_nearest_code_prep_kernel`` other than its config's."""
    return {"L2": bool(l2), "BLOCK_D": triton.next_power_of_2(D)}


def fwd_meta(D: int, l2: bool) -> dict:
    """The constexprs of ``_nearest_code_fwd_kernel`` for codebook dim D (also read by
    scripts/check_triton_compile.py, which compiles every combination)."""
    use_dot = D >= DOT_MIN_D
    return {"D": D, "L2": bool(l2), "USE_DOT": use_dot,
            "BLOCK_D": max(triton.next_power_of_2(D), 16 if use_dot else 1)}


def _config(bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# The running (best, j) tiles cost 3 registers per tile element: keep BLOCK_N * BLOCK_K per
# thread at <= 32 (<= 96 registers for them). Removed after scripts/check_triton_compile.py:
# (64, 64, 4, 2) spills 16 B on sm_80 (ptxas 12.9 stops at 168 registers; 255 with maxnreg=255,
# still spilling) and (128, 32, 4, 2) spills 8 B for bf16/fp16 at D = 8 on sm_90a and sm_80.
FWD_TUNING = Tuning(
    configs=[_config(*c) for c in [(32, 128, 4, 2), (32, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 2),
                                   (64, 64, 8, 3)]],
    default=_config(64, 64, 8, 3),
    # few programs (the interpreter's cost is per op, not per element), but several code tiles
    interpret=_config(64, 32, 4, 2),
    # N (tokens in a batch) changes often; its power-of-two bucket does not
    key=["N_BUCKET", "K", "D", "L2", "USE_DOT"],
)
_fwd_tuned = autotuned(_nearest_code_fwd_kernel, FWD_TUNING)


def _launch_fwd(z: Tensor, et: Tensor, bias: Tensor, codes: Tensor, idx: Tensor, N: int, K: int, k: int,
                D: int, l2: bool) -> None:
    args = (z, et, bias, codes, idx, N, K, k, pow2_bucket(N))
    launch(_nearest_code_fwd_kernel, _fwd_tuned, FWD_TUNING, lambda m: (triton.cdiv(N, m["BLOCK_N"]), k),
           args, fwd_meta(D, l2))


def nearest_code(z: Tensor, codebooks: Tensor, l2_normalize: bool) -> tuple[Tensor, Tensor]:
    """``reference.nearest_code(z, codebooks, l2_normalize)`` in two launches (prep, search).

    :param z: (N, k, D) contiguous, float32/bfloat16/float16, already validated
    :param codebooks: (k, K, D) contiguous, same dtype as z, K >= 1
    :returns: codes (N, k, D) in z's dtype, indices (N, k) int64
    """
    N, k, D = z.shape
    K = codebooks.shape[1]
    codes = torch.empty_like(z)
    idx = torch.empty((N, k), dtype=torch.int64, device=z.device)
    if N == 0 or k == 0:
        return codes, idx
    et = torch.empty((k, D, K), dtype=torch.float32, device=z.device)
    bias = torch.empty((k, K), dtype=torch.float32, device=z.device)
    with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
        _nearest_code_prep_kernel[(triton.cdiv(K, PREP_CONFIG.kwargs["BLOCK"]), k)](
            codebooks, et, bias, K, D, **prep_meta(D, l2_normalize), **PREP_CONFIG.all_kwargs(), enable_fp_fusion=True)
        _launch_fwd(z, et, bias, codes, idx, N, K, k, D, bool(l2_normalize))
    return codes, idx

