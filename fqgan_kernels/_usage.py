"""Codebook statistics as the runtime computes them (``FactorizedQuantizer``): on the device, with no
host sync and no ``torch.unique``, so they can run every training step. Each equals its ground truth
in ``reference.py`` (``code_counts``, ``perplexity``, ``codebook_usage``); tests/test_usage.py checks
that.

Shapes: N tokens, k sub-codebooks, K codes per sub-codebook.
"""

from __future__ import annotations

import torch
from torch import Tensor


def code_counts(indices: Tensor, codebook_size: int) -> Tensor:
    """Equals :func:`reference.code_counts` (``counts[i, j] = #{n : indices[n, i] == j}``) by one
    ``scatter_add_``: ``torch.bincount`` with ``minlength`` reads the largest index back to the host
    on CUDA. :param indices: (N, k) int64 -> (k, K) int64."""
    k = indices.shape[1]
    counts = torch.zeros(k, codebook_size, dtype=torch.long, device=indices.device)
    idx = indices.t().long()
    return counts.scatter_add_(1, idx, torch.ones_like(idx))


def perplexity(counts: Tensor) -> Tensor:
    """Equals :func:`reference.perplexity`: ``exp(H(counts / sum(counts)))`` per sub-codebook with
    ``0 log 0 = 0``, 1 for a sub-codebook with no counts. (k, K) int64 -> (k,) float32.

    Accumulated in float64, as the reference: the two then agree to float32 rounding."""
    p = counts.double() / counts.sum(-1, keepdim=True).clamp_min(1)
    return torch.exp(-torch.special.xlogy(p, p).sum(-1)).float()


def recent_usage(step: Tensor, last_used: Tensor, window: int) -> Tensor:
    """Fraction of codes chosen within the last ``window`` steps: ``mean_j(step - last_used[:, j] <
    window)``. Over a window of one step it equals :func:`reference.codebook_usage` of that step's
    counts. :param step: () int64, the current step; :param last_used: (k, K) int64 -> (k,) float32."""
    return ((step - last_used) < window).float().mean(-1)
