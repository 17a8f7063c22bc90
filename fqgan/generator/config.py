"""FAR model arguments and named presets (FAR-tiny, FAR-B, FAR-L, FAR-XL).

FAR-B / FAR-L are the official sizes (showlab/FQGAN ``autoregressive/models/far_dual.py``:
``FAR_B``: 24 layers, 16 heads, dim 1024, 3 AR-head layers; ``FAR_L``: 36 / 20 / 1280 / 4).
FAR-XL is not an official size: about 3B parameters (see :data:`PRESETS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from fqgan.runtime.errors import UsageError
from fqgan.runtime.options import option


def find_multiple(n: int, k: int) -> int:
    """The smallest multiple of ``k`` that is >= ``n``."""
    return n if n % k == 0 else n + k - (n % k)


@dataclass(frozen=True)
class FARConfig:
    """Arguments of :class:`fqgan.generator.FAR` (names follow the official ``ModelArgs``).

    The official code is the dual (k = 2) / triple (k = 3) case of ``num_factors``.
    """

    num_factors: int = 2            # k sub-tokens per image position (one sub-codebook each)
    vocab_size: int = 16384         # V codes per sub-codebook
    block_size: int = 256           # T image positions (a square grid, raster order)
    num_classes: int = 1000
    dim: int = option(1024, "width (default: the preset's)", group="model")
    # trunk layers
    n_layer: int = option(24, "trunk layers (default: the preset's)", group="model")
    n_head: int = option(16, "attention heads (default: the preset's)", group="model")
    n_kv_head: int | None = None    # None = n_head (no grouped-query attention, as every official preset)
    # layers of the factorized AR head (run over the k slots of a position)
    ar_n_layer: int = option(3, "layers of the factorized AR head (default: the preset's)", group="model")
    multiple_of: int = 256          # SwiGLU hidden size rounded up to this
    ffn_dim_multiplier: float | None = None
    ffn_dim: int | None = None      # explicit SwiGLU hidden size (None: the official formula)
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = option(0.1, "token dropout (official 0.1)", group="model")
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = option(0.1, "residual and FFN dropout (official 0.1)", flag="--dropout-p", group="model")
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = option(0.0, "stochastic depth (official 0); > 0 turns residual and FFN dropout off "
                                   "unless --dropout-p is given, as official", group="model")
    # > 0 adds the null-class row CFG needs
    class_dropout_prob: float = option(0.1, "label dropout for CFG (official 0.1)", group="model")

    def __post_init__(self) -> None:
        for name in ("num_factors", "vocab_size", "block_size", "num_classes", "dim", "n_layer", "n_head",
                     "ar_n_layer", "multiple_of"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"FARConfig.{name} must be a positive int, got {value!r}")
        if self.ar_n_layer < 1:
            raise UsageError("FARConfig.ar_n_layer must be >= 1")
        if self.dim % self.n_head:
            raise UsageError(f"FARConfig.dim ({self.dim}) must be divisible by n_head ({self.n_head})")
        if self.head_dim % 4:
            # 2-D RoPE: half the rotary pairs for rows, half for columns.
            raise UsageError(f"head_dim = dim / n_head = {self.head_dim} must be divisible by 4 (2-D RoPE)")
        kv = self.kv_heads
        if kv < 1 or self.n_head % kv:
            raise UsageError(f"FARConfig.n_head ({self.n_head}) must be a multiple of n_kv_head ({kv})")
        if math.isqrt(self.block_size) ** 2 != self.block_size:
            raise UsageError(f"FARConfig.block_size ({self.block_size}) must be a square (grid_size ** 2)")
        if self.num_factors > self.block_size + 1:
            # The AR head's slots take their rotations from the first k rows of the trunk's table.
            raise UsageError(f"num_factors ({self.num_factors}) must be <= block_size + 1 ({self.block_size + 1})")
        if self.ffn_dim is not None and self.ffn_dim < 1:
            raise UsageError(f"FARConfig.ffn_dim must be None or >= 1, got {self.ffn_dim}")
        for name in ("token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p", "drop_path_rate",
                     "class_dropout_prob"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise UsageError(f"FARConfig.{name} must be in [0, 1), got {p}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden size: ``ffn_dim``, else the official
        ``find_multiple(int(2 * 4 * dim / 3) [* ffn_dim_multiplier], multiple_of)``."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def has_null_class(self) -> bool:
        """Whether the label table has the extra "no class" row (index ``num_classes``) CFG uses."""
        return self.class_dropout_prob > 0

    @classmethod
    def from_preset(cls, name: str, **overrides) -> FARConfig:
        """``PRESETS[name]`` with ``overrides`` (any field, e.g. ``num_factors=3, vocab_size=1024``)."""
        if name not in PRESETS:
            raise UsageError(f"unknown FAR preset {name!r}; known: {sorted(PRESETS)}")
        known = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise UsageError(f"unknown FARConfig fields {bad}; known: {sorted(known)}")
        return replace(PRESETS[name], **overrides)


PRESETS: dict[str, FARConfig] = {
    # Trains on CPU in minutes on 8x8 / 16x16 token grids (demo); override vocab_size/num_classes to taste.
    "FAR-tiny": FARConfig(dim=128, n_layer=4, n_head=4, ar_n_layer=2, block_size=64, multiple_of=64),
    "FAR-B": FARConfig(dim=1024, n_layer=24, n_head=16, ar_n_layer=3),
    "FAR-L": FARConfig(dim=1280, n_layer=36, n_head=20, ar_n_layer=4),
    # Not official: 3,038,379,520 parameters at k = 2, V = 16384, 1000 classes (3,128,819,200 at k = 3). LlamaGen's
    # sizes as the guide: FAR-L is its GPT-XL (36 layers / 20 heads / dim 1280); GPT-XXL (48 / 24 / 1536) would be
    # 1.58B here and GPT-3B (24 / 32 / 3200) 3.72B. FAR-XL doubles FAR-L's width to 2560 at 32 layers (the usual
    # 3B transformer shape), 20 heads of 128 (2-D RoPE needs head_dim % 4 == 0; 128 is FlashAttention's fastest
    # head size), and keeps FAR-L's 4 AR-head layers. scripts/memory_table.py: its memory per GPU.
    "FAR-XL": FARConfig(dim=2560, n_layer=32, n_head=20, ar_n_layer=4),
}
