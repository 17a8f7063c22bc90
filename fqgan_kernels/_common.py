"""Constants and small helpers shared by the ground truth (``reference.py``) and the ops' front doors.

One definition each: the epsilons of the official code, the compute dtype rule, the normalisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

L2_EPS = 1e-12  # F.normalize's default, as in LlamaGen/FQGAN
ENTROPY_EPS = 1e-5  # log(avg_probs + 1e-5) in LlamaGen/FQGAN compute_entropy_loss
# The GPU entropy kernels hold a code's D values in registers: D <= 64 (csrc/cuda/entropy_loss.cuh
# kEntropyMaxD, the BLOCK_D lists of fqgan_kernels/triton/entropy_loss.py). torch and cpu take any D.
ENTROPY_GPU_MAX_D = 64


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64 (gradcheck); every other float dtype is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def l2_normalize(x: Tensor) -> Tensor:
    """``x / max(||x||_2, 1e-12)`` over the last dim (``F.normalize``)."""
    return F.normalize(x, p=2, dim=-1, eps=L2_EPS)


def maybe_normalize(z: Tensor, codebooks: Tensor, l2: bool) -> tuple[Tensor, Tensor]:
    """``(normalize(z), normalize(codebooks))`` when ``l2`` (in the compute dtype), else both as given
    (in the compute dtype)."""
    dt = compute_dtype(z)
    z, codebooks = z.to(dt), codebooks.to(dt)
    if l2:
        return l2_normalize(z), l2_normalize(codebooks)
    return z, codebooks


def straight_through(z: Tensor, codes: Tensor) -> Tensor:
    """``z + (codes - z).detach()``: the value of ``codes``, the gradient of ``z``."""
    return z + (codes - z).detach()
