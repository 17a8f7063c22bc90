"""Plain-PyTorch ground truth of every op, written for clarity, not speed.

Each function states its formula and where it comes from. Values and gradients follow the official
FQGAN implementation (github showlab/FQGAN, ``tokenizer/vq_model_{dual,triple}.py``), which builds
on LlamaGen's ``VectorQuantizer``; where this module differs in form (batched over k sub-codebooks)
the maths is the same. Low-precision inputs are computed in float32; float64 stays float64 (for
``gradcheck``).

Shapes: N tokens, k sub-codebooks, K codes per sub-codebook, D code dimension, V vocabulary,
H hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import (
    ENTROPY_EPS,
    compute_dtype,
    l2_normalize,
    maybe_normalize,
    straight_through,  # noqa: F401  not used here: benchmarks/bench_quantizer.py still reads ref.straight_through
)
from .outputs import CodebookCommitment, EntropyStatistics, LinearCrossEntropyOutput, NearestCodeOutput

# The ground-truth ops only. The shared constants and helpers (epsilons, normalisation,
# straight-through) live in ``_common``; the runtime's code statistics in ``_usage``.
__all__ = [
    "code_counts", "codebook_usage", "disentangle_loss", "entropy_from_statistics", "entropy_loss",
    "entropy_statistics", "guided_logits", "linear_cross_entropy", "nearest_code", "perplexity", "sample",
    "squared_distances", "top_k_top_p_filter", "vq_losses",
]


def squared_distances(z: Tensor, codebook: Tensor) -> Tensor:
    """``d[n, j] = ||z_n||^2 + ||e_j||^2 - 2 z_n . e_j``, the LlamaGen/FQGAN form.

    :param z: (N, D)
    :param codebook: (K, D)
    :returns: (N, K) -- the N x K buffer the fused kernels never build.
    """
    return (z * z).sum(-1, keepdim=True) + (codebook * codebook).sum(-1) - 2.0 * z @ codebook.t()


def nearest_code(z: Tensor, codebooks: Tensor, l2_normalize: bool = True) -> NearestCodeOutput:
    """Per sub-codebook i: ``idx[n, i] = argmin_j ||z[n, i] - e[i, j]||^2`` (ties: lowest j) and
    ``codes[n, i] = e[i, idx[n, i]]``, with z and e L2-normalised first when ``l2_normalize``.

    :param z: (N, k, D)
    :param codebooks: (k, K, D)
    Source: FQGAN ``VectorQuantizer.forward`` (d, argmin, ``embedding[min_encoding_indices]``).
    Gradient: ``codes`` is a gather of (normalised) codebook rows, so it trains the codebooks only.
    """
    zn, en = maybe_normalize(z, codebooks, l2_normalize)
    codes, indices = [], []
    for i in range(codebooks.shape[0]):
        d = squared_distances(zn[:, i], en[i])
        idx = d.argmin(dim=-1)
        indices.append(idx)
        codes.append(en[i][idx])
    return NearestCodeOutput(torch.stack(codes, 1).to(z.dtype), torch.stack(indices, 1))


def vq_losses(z: Tensor, codes: Tensor) -> CodebookCommitment:
    """Per sub-codebook i, over tokens n and dims d:
    ``codebook_i = mean((codes - sg[z])^2)``, ``commitment_i = mean((sg[codes] - z)^2)``.

    ``z`` is the (normalised, when the quantizer normalises) encoder output: the commitment gradient
    flows back through the normalisation to the encoder, as in FQGAN. Multiply commitment by
    ``beta`` (0.25) to get FQGAN's ``commit_loss``.

    :param z: (N, k, D)
    :param codes: (N, k, D), differentiable w.r.t. the codebooks
    """
    dt = compute_dtype(z)
    z, codes = z.to(dt), codes.to(dt)
    codebook = ((codes - z.detach()) ** 2).mean(dim=(0, 2))
    commitment = ((codes.detach() - z) ** 2).mean(dim=(0, 2))
    return CodebookCommitment(codebook, commitment)


def entropy_statistics(z: Tensor, codebooks: Tensor, temperature: float = 0.01,
                       l2_normalize: bool = True) -> EntropyStatistics:
    """The sums the entropy loss is made of, per sub-codebook i (``a_nj = -d_nj / T``,
    ``p_n = softmax(a_n)``): ``entropy_sum_i = sum_n H(p_n)`` with the exact ``log_softmax``,
    ``prob_sum_i = sum_n p_n`` and ``count = N``. Under DDP the sums are all-reduced before
    :func:`entropy_from_statistics`; on one process the two make :func:`entropy_loss`.

    :param z: (N, k, D)
    :param codebooks: (k, K, D)
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    zn, en = maybe_normalize(z, codebooks, l2_normalize)
    entropy_sums, prob_sums = [], []
    for i in range(codebooks.shape[0]):
        logits = -squared_distances(zn[:, i], en[i]) / temperature
        probs = logits.softmax(dim=-1)
        log_probs = logits.log_softmax(dim=-1)
        entropy_sums.append(-(probs * log_probs).sum())
        prob_sums.append(probs.sum(dim=0))
    count = zn.new_full((), float(zn.shape[0]))
    return EntropyStatistics(torch.stack(entropy_sums), torch.stack(prob_sums), count)


def entropy_from_statistics(stats: EntropyStatistics) -> Tensor:
    """``mean_n H(p_n) - H(mean_n p_n)`` per sub-codebook, with ``H(q) = -sum_j q_j log(q_j + 1e-5)``
    for the mean, as LlamaGen/FQGAN ``compute_entropy_loss``. (k,)"""
    avg_probs = stats.prob_sum / stats.count
    avg_entropy = -(avg_probs * torch.log(avg_probs + ENTROPY_EPS)).sum(-1)
    return stats.entropy_sum / stats.count - avg_entropy


def entropy_loss(z: Tensor, codebooks: Tensor, temperature: float = 0.01,
                 l2_normalize: bool = True) -> Tensor:
    """Per sub-codebook i (unweighted; FQGAN multiplies by ``entropy_loss_ratio``):

    ``a_nj = -d_nj / T``, ``p_n = softmax(a_n)``,
    ``L_i = mean_n H(p_n) - H(mean_n p_n)`` with ``H(q) = -sum_j q_j log(q_j + 1e-5)`` for the mean
    (the per-sample entropy uses the exact ``log_softmax``), as LlamaGen/FQGAN
    ``compute_entropy_loss(-d)``. Gradients reach z (through its normalisation) and the codebooks.

    :param z: (N, k, D)
    :param codebooks: (k, K, D)
    :returns: (k,)
    """
    return entropy_from_statistics(entropy_statistics(z, codebooks, temperature, l2_normalize))


def disentangle_loss(quantized: Tensor) -> Tensor:
    """``mean over pairs a < b of mean_n (q_a[n] . q_b[n])^2`` with each ``q[n]`` L2-normalised.

    FQGAN ``compute_disentangle_loss`` on the straight-through quantizer outputs
    (``z + (zq - z).detach()``): the gradient trains the encoder, not the codebooks. FQGAN-Triple
    averages its three pairs (``/ 3.0``); Dual has one pair. Returns 0 for k = 1. Unweighted
    (FQGAN multiplies by ``disentanglement_ratio``, 0.1 in its configs).

    :param quantized: (N, k, D)
    """
    k = quantized.shape[1]
    q = l2_normalize(quantized.to(compute_dtype(quantized)))
    pairs = [((q[:, a] * q[:, b]).sum(-1) ** 2).mean() for a in range(k) for b in range(a + 1, k)]
    if not pairs:
        return q.new_zeros(())
    return torch.stack(pairs).mean()


def code_counts(indices: Tensor, codebook_size: int) -> Tensor:
    """``counts[i, j] = #{n : indices[n, i] == j}``. :param indices: (N, k) -> (k, K) int64."""
    k = indices.shape[1]
    return torch.stack([torch.bincount(indices[:, i], minlength=codebook_size) for i in range(k)])


def perplexity(counts: Tensor) -> Tensor:
    """``exp(H(counts / sum(counts)))`` per sub-codebook, with ``0 log 0 = 0``. (k, K) -> (k,)."""
    p = counts.double() / counts.sum(-1, keepdim=True).clamp_min(1)
    return torch.exp(-torch.special.xlogy(p, p).sum(-1)).float()


def codebook_usage(counts: Tensor) -> Tensor:
    """Fraction of codes used at least once. (k, K) -> (k,)."""
    return (counts > 0).float().mean(-1)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                         ignore_index: int = -100, label_smoothing: float = 0.0,
                         reduction: str = "mean", z_loss: float = 0.0,
                         return_lse: bool = False) -> LinearCrossEntropyOutput:
    """Per head h: ``F.cross_entropy((hidden[h] @ weight[h].T + bias[h]).float(), targets[h], ...)``
    plus ``z_loss * lse^2`` (over the same non-ignored rows and reduction); ``loss`` is the mean
    over heads of the per-head losses for ``mean``/``sum`` (FAR: ``(loss_1 + ... + loss_k) / k``),
    and the per-head, per-row losses (k, N) for ``none``.

    :param hidden: (k, N, H)
    :param weight: (k, V, H)
    :param targets: (k, N) int64, ``ignore_index`` rows contribute nothing
    :param bias: (k, V) or None
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    dt = compute_dtype(hidden)
    per_head, lses = [], []
    for h in range(hidden.shape[0]):
        logits = hidden[h].to(dt) @ weight[h].to(dt).t()
        if bias is not None:
            logits = logits + bias[h].to(dt)
        ce = F.cross_entropy(logits, targets[h], ignore_index=ignore_index,
                             label_smoothing=label_smoothing, reduction="none")
        lse = torch.logsumexp(logits, dim=-1)
        valid = targets[h] != ignore_index
        if z_loss:
            ce = ce + z_loss * torch.where(valid, lse * lse, torch.zeros_like(lse))
        if reduction == "none":
            per_head.append(ce)
        elif reduction == "sum":
            per_head.append(ce.sum())
        else:
            per_head.append(ce.sum() / valid.sum())  # 0/0 = NaN when all rows are ignored, as PyTorch
        lses.append(lse)
    stacked = torch.stack(per_head)
    loss = stacked if reduction == "none" else stacked.mean()
    return LinearCrossEntropyOutput(loss, stacked, torch.stack(lses) if return_lse else None)


def guided_logits(cond: Tensor, uncond: Tensor | None, cfg_scale: float, temperature: float) -> Tensor:
    """``(uncond + cfg * (cond - uncond)) / temperature`` in float32 (LlamaGen/FQGAN CFG), except where
    ``cond == uncond`` (infinities included), which gives ``cond / temperature``: guidance changes
    nothing where the two agree, and a token masked (-inf) in both stays masked instead of becoming
    ``-inf - -inf = NaN``. A NaN left by opposite infinities counts as -inf (never drawn)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = cond.float()
    if uncond is not None:
        u = uncond.float()
        guided = torch.where(logits == u, logits, u + cfg_scale * (logits - u))
        logits = torch.nan_to_num(guided, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    return logits / temperature


def top_k_top_p_filter(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """LlamaGen's ``top_k_top_p_filtering``: keep logits >= the k-th largest (ties kept), then keep
    the smallest prefix of the descending order whose probability mass exceeds ``top_p`` (the token
    that crosses it is kept); the rest become ``-inf``. ``top_k=0`` and ``top_p=1`` disable each.

    :param logits: (B, V)
    """
    logits = logits.clone()
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1, stable=True)  # ties: index order
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits[remove.scatter(-1, order, remove)] = float("-inf")
    return logits


def sample(cond: Tensor, uncond: Tensor | None = None, cfg_scale: float = 1.0, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, uniform: Tensor | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """One draw per row from ``softmax(top_k_top_p_filter(guided_logits(...)))`` by inverse CDF:
    ``token = min{j : cumsum(p)_j > u}`` with ``u ~ U[0, 1)`` (``uniform`` if given, else drawn
    from ``generator``), so a fixed ``u`` fixes the draw.

    Non-finite logits: NaN in ``cond`` or ``uncond`` is an error. A row whose guided logits hold
    +inf draws uniformly among its +inf tokens (the limit of the softmax; ``torch.softmax`` would give
    NaN), whatever top-k / top-p say (they keep every +inf token). A row with no token above -inf
    is an error.

    :param cond: (B, V) conditional logits
    :param uncond: (B, V) unconditional logits, or None (no guidance)
    :returns: (B,) int64
    """
    for name, x in (("cond", cond), ("uncond", uncond)):
        if x is not None and bool(torch.isnan(x).any()):
            raise ValueError(f"{name} logits hold NaN")
    logits = guided_logits(cond, uncond, cfg_scale, temperature)
    posinf = torch.isposinf(logits)
    any_posinf = posinf.any(-1, keepdim=True)
    drawable = (logits > float("-inf")).any(-1)
    if not bool(drawable.all()):
        row = int((~drawable).nonzero()[0, 0])
        raise ValueError(f"row {row} has no token to draw: every guided logit is -inf")
    filtered = top_k_top_p_filter(torch.where(any_posinf, torch.zeros_like(logits), logits), top_k, top_p)
    probs = filtered.softmax(-1).double()
    probs = torch.where(any_posinf, posinf.double(), probs)  # +inf rows: equal weight on each +inf token
    if uniform is None:
        uniform = torch.rand(probs.shape[0], generator=generator, device=probs.device, dtype=torch.float64)
    cdf = probs.cumsum(-1)
    u = uniform.double().reshape(-1, 1) * cdf[:, -1:]
    token = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    return token.clamp_max(probs.shape[-1] - 1)
