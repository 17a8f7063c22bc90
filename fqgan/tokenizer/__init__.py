"""The FQGAN image tokenizer: model, losses, configs and presets, loading of the released weights.

    from fqgan.tokenizer import FQTokenizer, TokenizerLoss, from_official
    model = FQTokenizer("fqgan-dual-16")            # or a TokenizerConfig; load_tokenizer(path) for files
    indices = model.encode(images)                  # [B, 3, 256, 256] in [-1, 1] -> [B, k, 16, 16]
    images = model.decode_indices(indices)
"""

from .config import PRESETS, TokenizerConfig, TokenizerLossConfig, get_preset
from .load import load_tokenizer
from .losses import DiscriminatorLoss, GeneratorLoss, TokenizerLoss
from .model import FQTokenizer, TokenizerOutput
from .official import from_official, to_official_state_dict

__all__ = [
    "PRESETS",
    "DiscriminatorLoss",
    "FQTokenizer",
    "GeneratorLoss",
    "TokenizerConfig",
    "TokenizerLoss",
    "TokenizerLossConfig",
    "TokenizerOutput",
    "from_official",
    "get_preset",
    "load_tokenizer",
    "to_official_state_dict",
]
