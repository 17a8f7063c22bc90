"""Fused CFG + temperature + top-k/top-p sampling, Triton: one program per row, loops over V tiles.

The per-row algorithm is the one of fqgan_kernels/sample.py: pass 1 writes the float32 guided
logits ``x = (uncond + cfg * (cond - uncond)) / T`` to a [B, V] workspace (re-read from L2 by the
later passes) and finds the max; top-k and top-p are 32-step bisections on the order-preserving
keys of x (``_key``: ``bits ^ 0x7fffffff`` for negative floats, then offset by 2^31, as uint32) done
as radix descents, 4 bits (16 candidates tested at once, a [16, BLOCK_V] compare) per pass over V,
8 passes each (a run-time loop: unrolled, the kernel was 8x larger); the draw is an inverse-CDF scan
in index order with a float64 running sum. Deterministic: no atomics, every sum in a fixed order.
Non-finite logits follow reference.sample: pass 1 applies reference.guided_logits' rule (cond == uncond
gives cond; NaN counts as -inf); a row whose max is +inf draws among its +inf tokens instead, and a row
whose max is -inf (nothing to draw) gets -1, which the front door (fqgan_kernels/sample.py) reports.

Launch (fqgan_kernels/triton/_launch.py): autotuned on a GPU over ``TUNING.configs``, keyed on V,
HAS_UNCOND and the power-of-two bucket of B (``B_BUCKET``, read by the kernel nowhere: a batch of 2
rows and one of 128 want different warps per row); one fixed config under ``TRITON_INTERPRET=1``
(CPU tensors, tests) or with ``FQGAN_TRITON_AUTOTUNE=0``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import Tuning, autotuned, launch, pow2_bucket


@triton.jit
def _sample_kernel(COND_ptr, UNCOND_ptr, X_ptr, CFG_ptr, TEMP_ptr, TOPK_ptr, TOPP_ptr, U_ptr, OUT_ptr, V, B_BUCKET,
                   HAS_UNCOND: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * V
    offs = tl.arange(0, BLOCK_V)
    temp = tl.load(TEMP_ptr + row)
    cfg = tl.load(CFG_ptr + row)
    top_k = tl.load(TOPK_ptr + row)
    top_p = tl.load(TOPP_ptr + row)
    u = tl.load(U_ptr + row)

    # pass 1: guided logits (reference op order, float32) -> workspace; max. Non-finite logits as
    # reference.guided_logits: where cond == uncond (bit-equal) the guided logit is cond, so a token
    # masked (-inf) in both stays masked; a NaN left (opposite infinities, or NaN logits when the
    # caller's scan is off) becomes -inf. NaN is tested on the bits: the sign of a NaN is not defined
    # (x86 makes inf - inf negative, a GPU positive), so its key would land at either end.
    m = tl.full((), float("-inf"), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + offs
        mask = idx < V
        x = tl.load(COND_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        if HAS_UNCOND:
            un = tl.load(UNCOND_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
            same = x.to(tl.int32, bitcast=True) == un.to(tl.int32, bitcast=True)
            x = tl.where(same, x, un + cfg * (x - un))
        x = tl.where((x.to(tl.int32, bitcast=True) & 0x7FFFFFFF) > 0x7F800000, float("-inf"), x)
        x = tl.math.div_rn(x, temp) + 0.0  # correctly rounded as on CPU; + 0: -0 -> +0
        tl.store(X_ptr + base + idx, x, mask=mask)
        m = tl.maximum(m, tl.max(tl.where(mask, x, float("-inf")), axis=0))

    # m = -inf: nothing to draw, the row stays -1 (the caller's check reports it). m = +inf: uniform
    # among the +inf tokens (the softmax's limit), token number floor(u * count) in index order, as
    # reference.sample, whatever top-k / top-p say. Otherwise the finite path below.
    res = tl.full((), -1, tl.int64)
    if m == float("inf"):
        count = tl.zeros((), tl.int64)
        for v0 in range(0, V, BLOCK_V):
            idx = v0 + offs
            x = tl.load(X_ptr + base + idx, mask=idx < V, other=0.0)
            count += tl.sum(tl.where(x == float("inf"), 1, 0), axis=0).to(tl.int64)
        r = tl.minimum((u * count.to(tl.float64)).to(tl.int64), count - 1)
        seen = tl.zeros((), tl.int64)
        tok_inf = tl.full((), V, tl.int64)
        for v0 in range(0, V, BLOCK_V):
            idx = v0 + offs
            x = tl.load(X_ptr + base + idx, mask=idx < V, other=0.0)
            is_inf = tl.where(x == float("inf"), 1, 0).to(tl.int64)
            number = seen + tl.cumsum(is_inf, axis=0) - is_inf
            hit = (is_inf > 0) & (number == r)
            tok_inf = tl.minimum(tok_inf, tl.min(tl.where(hit, idx.to(tl.int64), V), axis=0))
            seen += tl.sum(is_inf, axis=0)
        res = tok_inf
    if (m > float("-inf")) & (m < float("inf")):
        res = _draw_finite(X_ptr, base, V, m, top_k, top_p, u, BLOCK_V)
    tl.store(OUT_ptr + row, res)


@triton.jit
def _key(x):
    """The order-preserving key of float32 ``x`` as uint32: the bits, with the magnitude bits of a
    negative float flipped (``bits ^ 0x7fffffff``) and then the sign bit (an offset of 2^31)."""
    bits = x.to(tl.int32, bitcast=True)
    return (tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits) ^ -2147483648).to(tl.uint32, bitcast=True)


@triton.jit
def _draw_finite(X_ptr, base, V, m, top_k, top_p, u, BLOCK_V: tl.constexpr):
    """The finite path (max m finite) of one row of guided logits in the workspace: top-k, top-p and
    the inverse-CDF draw (see the module docstring); returns the token."""
    offs = tl.arange(0, BLOCK_V)
    # top-k: largest key K with count(key >= K) >= k (the k-th largest value; ties kept), by a radix
    # descent: 8 passes, each testing the 16 values of the next 4 key bits at once
    bins = tl.arange(0, 16).to(tl.uint32)
    lo = tl.zeros((), tl.uint32)
    if (top_k > 0) & (top_k < V):
        for i in range(8):
            cands = lo + (bins << (28 - 4 * i))
            cnt = tl.zeros((16,), tl.int64)
            for v0 in range(0, V, BLOCK_V):
                idx = v0 + offs
                mask = idx < V
                x = tl.load(X_ptr + base + idx, mask=mask, other=0.0)
                key = _key(x)
                ge = (key[None, :] >= cands[:, None]) & mask[None, :]
                # counted in float32 (exact: at most BLOCK_V per tile): an integer sum of 0/1 becomes a
                # popcount of an i1 vector in LLVM, which NVPTX lowers through a stack slot
                cnt += tl.sum(tl.where(ge, 1.0, 0.0), axis=1).to(tl.int64)
            # cnt[0] >= k always (invariant), so best >= 0
            lo = lo + (tl.max(tl.where(cnt >= top_k, bins, 0), axis=0) << (28 - 4 * i))

    # S = sum exp(x - m) over the top-k survivors
    S = tl.zeros((), tl.float64)
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + offs
        mask = idx < V
        x = tl.load(X_ptr + base + idx, mask=mask, other=0.0)
        key = _key(x)
        keep = mask & (key >= lo)
        e = tl.where(keep, tl.exp(tl.where(keep, x, m) - m), 0.0)
        S += tl.sum(e, axis=0).to(tl.float64)

    # top-p: crossing key kc = largest K with mass(key >= K) > p * S; keep key > kc, and the first
    # n_keep of the ties at kc in index order
    nucleus = top_p < 1.0
    kc = tl.zeros((), tl.uint32)
    n_keep = tl.zeros((), tl.int64)
    S_kept = S
    if nucleus:
        P = top_p.to(tl.float64) * S
        for i in range(8):
            cands = kc + (bins << (28 - 4 * i))
            g = tl.zeros((16,), tl.float64)
            for v0 in range(0, V, BLOCK_V):
                idx = v0 + offs
                mask = idx < V
                x = tl.load(X_ptr + base + idx, mask=mask, other=0.0)
                key = _key(x)
                keep = mask & (key >= lo)
                e = tl.where(keep, tl.exp(tl.where(keep, x, m) - m), 0.0)
                g += tl.sum(tl.where(key[None, :] >= cands[:, None], e[None, :], 0.0), axis=1).to(tl.float64)
            # g[0] > P always (invariant), so best >= 0
            kc = kc + (tl.max(tl.where(g > P, bins, 0), axis=0) << (28 - 4 * i))
        above = tl.zeros((), tl.float64)
        ties = tl.zeros((), tl.int64)
        xt = tl.full((), float("-inf"), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            idx = v0 + offs
            mask = idx < V
            x = tl.load(X_ptr + base + idx, mask=mask, other=0.0)
            key = _key(x)
            sel = mask & (key >= lo) & (key > kc)
            above += tl.sum(tl.where(sel, tl.exp(tl.where(sel, x, m) - m), 0.0), axis=0).to(tl.float64)
            tie = mask & (key == kc)
            ties += tl.sum(tl.where(tie, 1, 0), axis=0).to(tl.int64)
            xt = tl.maximum(xt, tl.max(tl.where(tie, x, float("-inf")), axis=0))
        et = tl.exp(xt - m).to(tl.float64)
        # tie number r (0-based) is kept iff above + r * et <= P
        r = tl.where(et > 0, tl.floor((P - above) / tl.where(et > 0, et, 1.0)) + 1.0, 1.0)
        n_keep = tl.where(r >= ties.to(tl.float64), ties, tl.maximum(r, 1.0).to(tl.int64))
        S_kept = above + n_keep.to(tl.float64) * et

    # inverse-CDF draw in index order: first j with cumsum(kept e)_j > u * S_kept
    target = u * S_kept
    cum = tl.zeros((), tl.float64)
    rank = tl.zeros((), tl.int64)
    tok = tl.full((), V, tl.int64)
    last = tl.full((), V - 1, tl.int64)
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + offs
        mask = idx < V
        x = tl.load(X_ptr + base + idx, mask=mask, other=0.0)
        key = _key(x)
        keep = mask & (key >= lo)
        if nucleus:
            tie = keep & (key == kc)
            tie_i = tl.where(tie, 1, 0).to(tl.int64)
            tie_rank = rank + tl.cumsum(tie_i, axis=0) - tie_i
            keep = (keep & (key > kc)) | (tie & (tie_rank < n_keep))
            rank += tl.sum(tie_i, axis=0)
        e = tl.where(keep, tl.exp(tl.where(keep, x, m) - m), 0.0)
        c = cum + tl.cumsum(e, axis=0).to(tl.float64)
        hit = keep & (c > target)
        tok = tl.minimum(tok, tl.min(tl.where(hit, idx.to(tl.int64), V), axis=0))
        last = tl.where(tl.max(tl.where(keep, 1, 0), axis=0) > 0,
                        tl.max(tl.where(keep, idx.to(tl.int64), -1), axis=0), last)
        cum += tl.sum(e, axis=0).to(tl.float64)
    return tl.where(tok < V, tok, last)


# maxnreg=255: left to itself ptxas stopped at 72-124 registers and spilled 8-64 B (the row's pointers and
# parameters, live across the whole kernel), in most configs on sm_90a. One program per row, so a launch
# has B programs (64 in the benchmark): occupancy is not what the registers cost here. At most 4 logits
# per thread: pass 1 calls ptxas's div.rn slow-path subroutine once per logit, and with 8 (BLOCK_V 1024,
# 4 warps) the registers the calls clobber made it spill 8 B for bf16/fp16 on sm_90a even so.
def _config(block_v: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_V": block_v}, num_warps=warps, maxnreg=255)


TUNING = Tuning(
    configs=[_config(bv, w) for bv, w in ((256, 4), (512, 4), (256, 8), (512, 8), (1024, 8))],
    default=_config(512, 4),
    interpret=_config(256, 4),
    key=["B_BUCKET", "V", "HAS_UNCOND"],
)
_tuned = autotuned(_sample_kernel, TUNING)


def sample(cond: Tensor, uncond: Tensor | None, cfg: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
           uniform: Tensor) -> Tensor:
    """Kernel launch; inputs as prepared by fqgan_kernels/sample.py (contiguous, per-row [B] parameters:
    cfg/temperature/top_p float32, top_k int64, uniform float64). Extra memory: a [B, V] float32
    workspace."""
    B, V = cond.shape
    out = torch.empty(B, dtype=torch.long, device=cond.device)
    if B == 0:
        return out
    x = torch.empty(B, V, dtype=torch.float32, device=cond.device)
    has_uncond = uncond is not None
    un = uncond if has_uncond else cond
    args = (cond, un, x, cfg, temperature, top_k, top_p, uniform, out, V, pow2_bucket(B))
    # no FMA contraction of uncond + cfg * (cond - uncond): keep the reference's two roundings
    launch(_sample_kernel, _tuned, TUNING, lambda m: (B,), args, {"HAS_UNCOND": has_uncond}, fp_fusion=False)
    return out
