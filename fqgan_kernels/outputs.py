"""The result tuples of the public ops and of :class:`~fqgan_kernels.FactorizedQuantizer`.

Named ``...Output`` so that they do not collide with module names of peer libraries (every peer has
an ``nn.Module`` called ``LinearCrossEntropy``). Unpack them like tuples or read their fields.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class NearestCodeOutput(NamedTuple):
    """Result of :func:`fqgan_kernels.nearest_code`."""

    codes: Tensor  # (N, k, D), dtype of z; differentiable w.r.t. the codebooks
    indices: Tensor  # (N, k), int64


class VQLossesOutput(NamedTuple):
    """The weighted VQ loss terms of :func:`fqgan_kernels.vq_losses`; their total is
    ``codebook.sum() + commitment.sum() + disentangle``."""

    codebook: Tensor  # (k,) codebook_weight * mean((codes - sg[z])^2)
    commitment: Tensor  # (k,) commitment_weight * mean((sg[codes] - z)^2)
    disentangle: Tensor  # () disentangle_weight * mean over pairs of mean_n (q_a . q_b)^2


class CodebookCommitment(NamedTuple):
    """Unweighted codebook and commitment losses (:func:`fqgan_kernels.reference.vq_losses`)."""

    codebook: Tensor  # (k,) mean((zq - sg[z])^2): trains the codebooks
    commitment: Tensor  # (k,) mean((sg[zq] - z)^2): trains the encoder


class EntropyStatistics(NamedTuple):
    """Per sub-codebook sums of the entropy loss (:func:`fqgan_kernels.reference.entropy_statistics`):
    ``loss = entropy_sum / count - H(prob_sum / count)``; under DDP the sums are all-reduced first."""

    entropy_sum: Tensor  # (k,) sum_n H(p_n)
    prob_sum: Tensor  # (k, K) sum_n p_n
    count: Tensor  # () N, as a float tensor


class LinearCrossEntropyOutput(NamedTuple):
    """Result of :func:`fqgan_kernels.linear_cross_entropy`."""

    loss: Tensor  # () for mean/sum (mean over heads); (k, N) for none
    per_head: Tensor  # (k,) for mean/sum; (k, N) for none
    lse: Tensor | None  # (k, N) log-sum-exp of the logits, when asked for


class LossBreakdown(NamedTuple):
    """Every term of the quantizer loss, weighted as it enters ``loss``, per sub-codebook (k,)."""

    codebook: Tensor  # codebook_weight * mean((zq - sg[z])^2)
    commitment: Tensor  # commitment_weight * mean((sg[zq] - z)^2)
    entropy: Tensor  # entropy_weight * (mean H(p_n) - H(mean p_n)); zeros when off or in eval
    disentangle: Tensor  # () disentangle_weight * mean over pairs of mean (q_a . q_b)^2
    perplexity: Tensor  # (k,) exp(entropy of this step's code histogram), no grad
    usage: Tensor  # (k,) fraction of codes used within the last `usage_window` training steps


class QuantizerOutput(NamedTuple):
    """``(quantized, indices, loss)`` of :class:`~fqgan_kernels.FactorizedQuantizer`."""

    quantized: Tensor  # like z: straight-through output, value = chosen (normalised) codes
    indices: Tensor  # [B, k, *spatial] for channel-first input, [..., k] for channel-last
    loss: Tensor  # () sum of all weighted terms


class QuantizerOutputWithBreakdown(NamedTuple):
    """``(quantized, indices, loss, breakdown)``: ``return_loss_breakdown=True``."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    breakdown: LossBreakdown
