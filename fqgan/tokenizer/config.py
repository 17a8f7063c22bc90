"""Configuration of the FQGAN tokenizer and of its training losses, with named presets.

``TokenizerConfig`` describes the model (the official ``ModelArgs`` of
``tokenizer/vq_model_{dual,triple}.py`` plus what the official code hard-codes: adapter depth,
feature-head widths, the 256-pixel grid). ``TokenizerLossConfig`` holds the options of the official
``VQLoss_{dual,triple}_codebook`` with the defaults of the released training runs
(``train_fqgan_{dual,triple}.sh`` on top of ``vq_train_*.py``'s argparse defaults).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from fqgan.runtime.errors import UsageError, UsageTypeError
from fqgan.runtime.options import config_from_dict, config_to_dict, option

__all__ = [
    "FQGAN_DUAL_8",
    "FQGAN_DUAL_16",
    "FQGAN_TRIPLE_8",
    "FQGAN_TRIPLE_16",
    "PRESETS",
    "TINY",
    "TINY_TRIPLE",
    "TokenizerConfig",
    "TokenizerLossConfig",
    "get_preset",
]

CLIP_L14 = "openai/clip-vit-large-patch14"  # FQGAN-Dual's semantic teacher (1024-d CLS)
CLIP_B16 = "openai/clip-vit-base-patch16"  # FQGAN-Triple's high-level teacher (768-d)
DINOV2_S = "facebook/dinov2-small"  # FQGAN-Triple's mid-level teacher (384-d)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise UsageError(f"{name} must be >= 1, got {value}")


def _non_negative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageTypeError(f"{name} must be a number, got {type(value).__name__}")
    if value < 0:
        raise UsageError(f"{name} must be >= 0, got {value}")


_MODEL = "model (a preset, then overrides)"  # help sections of the CLI
_LOSSES = "losses (official VQLoss options)"  # help sections of the CLI


@dataclass(frozen=True)
class TokenizerConfig:
    """The FQGAN tokenizer: a VQGAN encoder trunk, k heads, k sub-codebooks, one pixel decoder.

    Sub-codebook 0 is the visual-detail one; sub-codebooks 1..k-1 are semantic and may carry a
    feature-prediction head (``feat_pred_dims[i] > 0``) trained against a frozen teacher
    (``teachers[i]``). The order is the official concatenation order before ``post_quant_conv``:
    Dual ``[vis, sem]``, Triple ``[vis, sem_mid, sem_high]``; ``indices[:, i]`` follows it.
    """

    num_codebooks: int = 2
    codebook_size: int = option(16384, "codes per sub-codebook K", group=_MODEL)
    codebook_dim: int = option(8, "code dimension D", group=_MODEL)
    codebook_l2_norm: bool = True
    commit_loss_beta: float = option(0.25, "commitment weight beta", group=_MODEL)
    codebook_weight: float = 1.0  # the official VQLoss stores codebook_weight but never applies it: keep 1
    # argparse default 0.0; the released runs pass 0.03
    entropy_loss_ratio: float = option(0.03, "entropy loss weight (0.03 as the released runs)", group=_MODEL)
    entropy_temperature: float = 0.01
    # 0 disables (official: --with_disentanglement off)
    disentanglement_ratio: float = option(0.1, "disentanglement loss weight (0 disables)", group=_MODEL)

    # the adapters' positional embeddings cover image_size // down_factor squared
    image_size: int = option(256, "image side", group=_MODEL)
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    encoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    dropout_p: float = option(0.0, "dropout in the encoder and decoder", group=_MODEL)
    norm_groups: int = 32  # official Normalize: GroupNorm(32, eps=1e-6)

    adapter_layers: int = 6  # FactorizedAdapter: width = ch * encoder_ch_mult[-1] (512 officially)
    adapter_heads: int = 8
    adapter_mlp_ratio: float = 4.0

    feat_pred_dims: tuple[int, ...] = (0, 1024)  # per sub-codebook, 0 = no feature-prediction head
    feat_pred_layers: int = 3
    feat_pred_heads: int = 8
    teachers: tuple[str | None, ...] = (None, CLIP_L14)  # per sub-codebook: the teacher's name
    codebook_names: tuple[str, ...] = ("vis", "sem")

    # False: the entropy loss's mean probability is per rank, as in FQGAN's training; True: global
    quantizer_backend: str = option("auto", "kernel backend of the quantizer: auto, reference, cpu, triton, "
                                    "cuda", group=_MODEL)
    # batch (fk.FactorizedQuantizer(distributed=True)); also decides whether usage stats are all-reduced.
    quantizer_distributed: bool = option(False, "under torchrun, take the entropy loss's statistics over the "
                                         "global batch (default: per process, as FQGAN's training)", group=_MODEL)
    usage_window: int = 100

    def __post_init__(self) -> None:
        for name in ("num_codebooks", "codebook_size", "codebook_dim", "image_size", "in_channels",
                     "out_channels", "ch", "num_res_blocks", "z_channels", "norm_groups", "adapter_heads",
                     "feat_pred_heads", "usage_window"):
            _positive_int(name, getattr(self, name))
        for name in ("adapter_layers", "feat_pred_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UsageError(f"{name} must be an int >= 0, got {value!r}")
        for name in ("commit_loss_beta", "codebook_weight", "entropy_loss_ratio", "disentanglement_ratio",
                     "dropout_p", "adapter_mlp_ratio"):
            _non_negative(name, getattr(self, name))
        if self.entropy_temperature <= 0:
            raise UsageError(f"entropy_temperature must be > 0, got {self.entropy_temperature}")
        # Tuples, so that configs hash, compare and print the same however they were written.
        for name in ("encoder_ch_mult", "decoder_ch_mult", "feat_pred_dims", "teachers", "codebook_names"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.encoder_ch_mult or any(not isinstance(m, int) or m < 1 for m in self.encoder_ch_mult):
            raise UsageError(f"encoder_ch_mult must be positive ints, got {self.encoder_ch_mult}")
        if len(self.decoder_ch_mult) != len(self.encoder_ch_mult):
            raise UsageError(f"decoder_ch_mult {self.decoder_ch_mult} must have as many levels as "
                             f"encoder_ch_mult {self.encoder_ch_mult} (the decoder undoes the encoder's downsampling)")
        if any(not isinstance(m, int) or m < 1 for m in self.decoder_ch_mult):
            raise UsageError(f"decoder_ch_mult must be positive ints, got {self.decoder_ch_mult}")
        k = self.num_codebooks
        for name in ("feat_pred_dims", "teachers", "codebook_names"):
            if len(getattr(self, name)) != k:
                raise UsageError(f"{name} has {len(getattr(self, name))} entries but num_codebooks = {k}")
        if any(not isinstance(d, int) or d < 0 for d in self.feat_pred_dims):
            raise UsageError(f"feat_pred_dims must be ints >= 0, got {self.feat_pred_dims}")
        if self.feat_pred_dims[0] != 0:
            raise UsageError("sub-codebook 0 is the visual-detail one: feat_pred_dims[0] must be 0, "
                             f"got {self.feat_pred_dims}")
        if len(set(self.codebook_names)) != k:
            raise UsageError(f"codebook_names must be distinct, got {self.codebook_names}")
        if self.image_size % self.down_factor:
            raise UsageError(f"image_size {self.image_size} is not divisible by the downsample factor "
                             f"{self.down_factor} of encoder_ch_mult {self.encoder_ch_mult}")
        if self.adapter_width % self.adapter_heads:
            raise UsageError(f"the adapter width ch * encoder_ch_mult[-1] = {self.adapter_width} is not "
                             f"divisible by adapter_heads = {self.adapter_heads}")
        for i, d in enumerate(self.feat_pred_dims):
            if d and d % self.feat_pred_heads:
                raise UsageError(f"feat_pred_dims[{i}] = {d} is not divisible by feat_pred_heads = "
                                 f"{self.feat_pred_heads}")
        for c in {self.ch * m for m in (1, *self.encoder_ch_mult, *self.decoder_ch_mult)}:
            if c % self.norm_groups:
                raise UsageError(f"channel count {c} is not divisible by norm_groups = {self.norm_groups}")

    @property
    def down_factor(self) -> int:
        """Spatial downsampling of the encoder: 2 ** (levels - 1) (16 for 5 levels, 8 for 4)."""
        return 2 ** (len(self.encoder_ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        """Side of the token grid: image_size // down_factor (16 for FQGAN-*-16 at 256 pixels)."""
        return self.image_size // self.down_factor

    @property
    def adapter_width(self) -> int:
        """Channels at the encoder's lowest resolution, the width of each FactorizedAdapter."""
        return self.ch * self.encoder_ch_mult[-1]

    @property
    def semantic_codebooks(self) -> tuple[int, ...]:
        """Indices of the sub-codebooks that carry a feature-prediction head."""
        return tuple(i for i, d in enumerate(self.feat_pred_dims) if d)

    def replace(self, **changes: Any) -> TokenizerConfig:
        """A copy with ``changes`` applied (and validated)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain ``{field: value}`` (tuples as lists), e.g. for a checkpoint or a JSON file."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenizerConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        return config_from_dict(cls, data)


def _triple(**changes: Any) -> TokenizerConfig:
    base = dict(num_codebooks=3, feat_pred_dims=(0, 384, 768), teachers=(None, DINOV2_S, CLIP_B16),
                codebook_names=("vis", "sem_mid", "sem_high"))
    base.update(changes)
    return TokenizerConfig(**base)


FQGAN_DUAL_16 = TokenizerConfig()
FQGAN_DUAL_8 = TokenizerConfig(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4))
FQGAN_TRIPLE_16 = _triple()
FQGAN_TRIPLE_8 = _triple(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4))

# For tests and the demo: 32x32 images, downsample 4 (an 8x8 grid), a few thousand parameters per
# block. Its semantic head predicts a 64-d feature: pair it with a tiny teacher of hidden size 64.
TINY = TokenizerConfig(
    codebook_size=512, image_size=32, ch=32, encoder_ch_mult=(1, 1, 2), decoder_ch_mult=(1, 1, 2),
    num_res_blocks=1, z_channels=32, norm_groups=8, adapter_layers=1, adapter_heads=4,
    feat_pred_dims=(0, 64), feat_pred_layers=1, feat_pred_heads=4, teachers=(None, "tiny-teacher"),
)
TINY_TRIPLE = TINY.replace(num_codebooks=3, feat_pred_dims=(0, 64, 64), teachers=(None, "tiny-teacher", "tiny-teacher"),
                           codebook_names=("vis", "sem_mid", "sem_high"))

PRESETS: dict[str, TokenizerConfig] = {
    "fqgan-dual-16": FQGAN_DUAL_16,
    "fqgan-dual-8": FQGAN_DUAL_8,
    "fqgan-triple-16": FQGAN_TRIPLE_16,
    "fqgan-triple-8": FQGAN_TRIPLE_8,
    "tiny": TINY,
    "tiny-triple": TINY_TRIPLE,
}


def get_preset(name: str, **changes: Any) -> TokenizerConfig:
    """The preset called ``name`` (case-insensitive, ``_`` or ``-``), with ``changes`` applied."""
    key = name.lower().replace("_", "-")
    if key not in PRESETS:
        raise UsageError(f"unknown tokenizer preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[key].replace(**changes) if changes else PRESETS[key]


@dataclass(frozen=True)
class TokenizerLossConfig:
    """Options of the official ``VQLoss_{dual,triple}_codebook``, defaults of the released training.

    The generator loss is ``reconstruction_weight * pixel + perceptual_weight * LPIPS
    + adaptive * disc_weight(step) * gen_adv + sum_i (codebook_i + commitment_i + entropy_i)
    + disentangle + semantic_weight * sum_heads InfoNCE``; the discriminator loss is
    ``disc_weight(step) * disc_loss(D(x), D(sg[x_hat]))`` with ``disc_weight(step) = 0`` before
    ``disc_start``.
    """

    # "l2" (mse) or "l1"
    reconstruction_loss: str = option("l2", "pixel loss", choices=("l2", "l1"), group=_LOSSES)
    reconstruction_weight: float = option(1.0, "pixel loss weight", group=_LOSSES)
    # 0: no LPIPS network is built or needed
    perceptual_weight: float = option(1.0, "LPIPS weight (needs --vgg16-weights and the lpips heads; 0 "
                                      "disables)", group=_LOSSES)
    # the official LPIPS heads keep nn.Dropout(0.5), live in train mode
    lpips_dropout: bool = option(True, "turn off the LPIPS heads' dropout (the official loss keeps it live in "
                                 "training)", flag="--no-lpips-dropout", group=_LOSSES)
    # "hinge", "vanilla", "non-saturating", "non-saturating-llamagen"
    disc_loss: str = option("hinge", "discriminator loss", choices=("hinge", "vanilla", "non-saturating",
                            "non-saturating-llamagen"), group=_LOSSES)
    # "hinge", "non-saturating", "non-saturating-llamagen"
    gen_loss: str = option("hinge", "generator adversarial loss", choices=("hinge", "non-saturating",
                           "non-saturating-llamagen"), group=_LOSSES)
    disc_weight: float = option(0.5, "GAN weight", group=_LOSSES)
    disc_start: int = option(20000, "step from which the GAN terms count", group=_LOSSES)
    # the official default; True: ||g_nll|| / ||g_adv|| at the last layer
    disc_adaptive_weight: bool = option(False, "scale the GAN term by ||grad nll|| / ||grad gan|| at the "
                                        "decoder's last layer (off in the official runs)", group=_LOSSES)
    disc_dim: int = option(64, "PatchGAN width", group=_LOSSES)
    disc_num_layers: int = option(3, "PatchGAN depth", group=_LOSSES)
    disc_in_channels: int = 3
    semantic_weight: float = option(0.5, "feature-prediction (InfoNCE) weight (needs the teachers; 0 disables)",
                                    group=_LOSSES)

    def __post_init__(self) -> None:
        if self.reconstruction_loss not in ("l1", "l2"):
            raise UsageError(f"reconstruction_loss must be 'l1' or 'l2', got {self.reconstruction_loss!r}")
        disc = ("hinge", "vanilla", "non-saturating", "non-saturating-llamagen")
        if self.disc_loss not in disc:
            raise UsageError(f"disc_loss must be one of {disc}, got {self.disc_loss!r}")
        gen = ("hinge", "non-saturating", "non-saturating-llamagen")
        if self.gen_loss not in gen:
            raise UsageError(f"gen_loss must be one of {gen}, got {self.gen_loss!r}")
        for name in ("reconstruction_weight", "perceptual_weight", "disc_weight", "semantic_weight"):
            _non_negative(name, getattr(self, name))
        if isinstance(self.disc_start, bool) or not isinstance(self.disc_start, int) or self.disc_start < 0:
            raise UsageError(f"disc_start must be an int >= 0, got {self.disc_start!r}")
        for name in ("disc_dim", "disc_num_layers", "disc_in_channels"):
            _positive_int(name, getattr(self, name))

    def replace(self, **changes: Any) -> TokenizerLossConfig:
        """A copy with ``changes`` applied (and validated)."""
        return replace(self, **changes)
