"""The FQGAN image tokenizer: model, losses, configs and presets, loading of the released weights."""

from .config import PRESETS, TokenizerConfig, TokenizerLossConfig, get_preset
from .model import FQTokenizer, QuantizerLosses, TokenizerOutput

__all__ = [
    "PRESETS",
    "FQTokenizer",
    "QuantizerLosses",
    "TokenizerConfig",
    "TokenizerLossConfig",
    "TokenizerOutput",
    "get_preset",
]
