"""The FQGAN image tokenizer: model, losses, configs and presets, loading of the released weights.

    from fqgan.tokenizer import FQTokenizer, TokenizerLoss, from_official
    model = FQTokenizer("fqgan-dual-16")            # or a TokenizerConfig
    indices = model.encode(images)                  # [B, 3, 256, 256] in [-1, 1] -> [B, k, 16, 16]
    images = model.decode_indices(indices)
"""

from .config import PRESETS, TokenizerConfig, TokenizerLossConfig, get_preset
from .losses import DiscriminatorLoss, GeneratorLoss, TokenizerLoss
from .model import FQTokenizer, QuantizerLosses, TokenizerOutput
from .official import from_official, official_state_dict
from .weights import CheckpointError, WeightsNotFoundError

__all__ = [
    "PRESETS",
    "CheckpointError",
    "DiscriminatorLoss",
    "FQTokenizer",
    "GeneratorLoss",
    "QuantizerLosses",
    "TokenizerConfig",
    "TokenizerLoss",
    "TokenizerLossConfig",
    "TokenizerOutput",
    "WeightsNotFoundError",
    "from_official",
    "get_preset",
    "official_state_dict",
]
