"""fqgan-kernels: fused kernels for factorized visual tokenization and generation (FQGAN + FAR).

Public API (see README.md and DESIGN.md section 4)::

    import fqgan_kernels as fk
    fk.backends()
    codes, idx = fk.nearest_code(z, codebooks, l2_normalize=True)
    q = fk.FactorizedQuantizer(num_codebooks=2, codebook_size=16384, codebook_dim=8)
    quantized, indices, loss = q(z)
"""

from . import reference
from ._backend import BACKENDS, BackendInfo, backends, resolve_backend
from .entropy_loss import entropy_loss
from .linear_cross_entropy import LinearCrossEntropy, linear_cross_entropy
from .nearest_code import NearestCode, nearest_code
from .quantizer import FactorizedQuantizer, LossBreakdown, QuantizerOutput
from .sample import sample, sample_from_hidden
from .vq_losses import VQLossTerms, vq_losses

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendInfo",
    "FactorizedQuantizer",
    "LinearCrossEntropy",
    "LossBreakdown",
    "NearestCode",
    "QuantizerOutput",
    "VQLossTerms",
    "backends",
    "entropy_loss",
    "linear_cross_entropy",
    "nearest_code",
    "reference",
    "resolve_backend",
    "sample",
    "sample_from_hidden",
    "vq_losses",
]
