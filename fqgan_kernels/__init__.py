"""fqgan-kernels: fused kernels for factorized visual tokenization and generation (FQGAN + FAR).

Public API (see README.md and docs/design.md section 4)::

    import fqgan_kernels as fk
    fk.backends()
    codes, idx = fk.nearest_code(z, codebooks, l2_normalize=True)
    q = fk.FactorizedQuantizer(num_codebooks=2, codebook_size=16384, codebook_dim=8)
    quantized, indices, loss = q(z)

Everything a user (or the models in ``fqgan/``) may import is in ``__all__``; other modules and
names starting with ``_`` are internal.
"""

from . import outputs, reference
from ._backend import BACKENDS, BackendInfo, backends, resolve_backend
from ._validate import set_check_finite
from .entropy_loss import entropy_loss
from .linear_cross_entropy import linear_cross_entropy
from .nearest_code import nearest_code
from .outputs import (
    LinearCrossEntropyOutput,
    LossBreakdown,
    NearestCodeOutput,
    QuantizerOutput,
    QuantizerOutputWithBreakdown,
    VQLossesOutput,
)
from .quantizer import FactorizedQuantizer
from .sample import sample, sample_from_hidden
from .vq_losses import vq_losses

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendInfo",
    "FactorizedQuantizer",
    "LinearCrossEntropyOutput",
    "LossBreakdown",
    "NearestCodeOutput",
    "QuantizerOutput",
    "QuantizerOutputWithBreakdown",
    "VQLossesOutput",
    "backends",
    "entropy_loss",
    "linear_cross_entropy",
    "nearest_code",
    "outputs",
    "reference",
    "resolve_backend",
    "sample",
    "sample_from_hidden",
    "set_check_finite",
    "vq_losses",
]
