"""``FQTokenizer``: the FQGAN image tokenizer for any number k of sub-codebooks.

images ``[B, 3, H, W]`` in [-1, 1]
  -> shared encoder trunk (:class:`~fqgan.tokenizer.blocks.Encoder`)  ``[B, C, h, w]``
  -> per sub-codebook i: FactorizedAdapter, GroupNorm, swish, 3x3 conv to z_channels, 1x1 quant conv to D
  -> concatenated ``[B, k*D, h, w]`` -> ``fk.FactorizedQuantizer`` (k stacked L2-normalised codebooks)
  -> ``post_quant_conv`` over the k*D channels -> :class:`~fqgan.tokenizer.blocks.Decoder` -> images.
Feature predictors read the quantised (straight-through) maps of the semantic sub-codebooks.

Equals showlab/FQGAN ``tokenizer/vq_model_dual.py`` (k=2, order [vis, sem]) and
``vq_model_triple.py`` (k=3, order [vis, sem_mid, sem_high]) with their weights mapped by
:func:`fqgan.tokenizer.official.from_official`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

import fqgan_kernels as fk
from fqgan.runtime.checkpoint import state_fingerprint
from fqgan.runtime.errors import UsageError, UsageTypeError

from .adapter import FactorizedAdapter, FeaturePredictor
from .blocks import Decoder, Encoder, group_norm, swish
from .config import TokenizerConfig, get_preset

__all__ = ["EncoderBranch", "FQTokenizer", "TokenizerOutput"]

# Config fields that do not change what a code means (training-only weights, run-time choices).
_NOT_FINGERPRINTED = ("commit_loss_beta", "codebook_weight", "entropy_loss_ratio", "entropy_temperature",
                      "disentanglement_ratio", "dropout_p", "teachers", "quantizer_backend", "quantizer_distributed",
                      "usage_window")


class TokenizerOutput(NamedTuple):
    """What :meth:`FQTokenizer.forward` returns."""

    reconstruction: Tensor  # [B, out_channels, H, W]
    # The quantizer's weighted terms (codebook, commitment, entropy, disentangle) and its statistics
    # (perplexity, usage), as fk.FactorizedQuantizer returns them; quantizer_loss is their weighted sum.
    losses: fk.LossBreakdown
    quantizer_loss: Tensor  # () what the quantizer adds to the generator loss
    indices: Tensor  # [B, k, h, w] int64
    semantic_features: tuple[Tensor, ...]  # per feature predictor (config.semantic_codebooks order): [B, width] CLS


class EncoderBranch(nn.Module):
    """One sub-codebook's head on the trunk: adapter, ``norm_out``, swish, ``conv_out`` (3x3 to
    z_channels), ``quant_conv`` (1x1 to D). ``[B, C, h, w] -> [B, D, h, w]`` (unnormalised z_i)."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        width = config.adapter_width
        self.adapter = FactorizedAdapter(width, config.grid_size, config.adapter_layers, config.adapter_heads,
                                         config.adapter_mlp_ratio)
        self.norm_out = group_norm(width, config.norm_groups)
        self.conv_out = nn.Conv2d(width, config.z_channels, kernel_size=3, stride=1, padding=1)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_dim, kernel_size=1)

    def forward(self, h: Tensor) -> Tensor:
        return self.quant_conv(self.conv_out(swish(self.norm_out(self.adapter(h)))))


class FQTokenizer(nn.Module):
    """The FQGAN tokenizer (see the module docstring for the data flow).

    :param config: a :class:`TokenizerConfig` or a preset name (``"fqgan-dual-16"``, ``"tiny"``, ...)

    ``encode(images) -> indices [B, k, h, w]``, ``decode_indices(indices) -> images``,
    ``forward(images) -> TokenizerOutput(reconstruction, losses, indices, semantic_features)``.
    Images are ``[B, in_channels, image_size, image_size]`` in [-1, 1] (the adapters' positional
    embeddings fix the grid, as in the official model).
    """

    def __init__(self, config: TokenizerConfig | str = "fqgan-dual-16") -> None:
        super().__init__()
        if isinstance(config, str):
            config = get_preset(config)
        if not isinstance(config, TokenizerConfig):
            raise UsageTypeError(f"config must be a TokenizerConfig or a preset name, got {type(config).__name__}")
        self.config = c = config
        self.encoder = Encoder(c.in_channels, c.ch, c.encoder_ch_mult, c.num_res_blocks, c.dropout_p, c.norm_groups)
        self.branches = nn.ModuleList([EncoderBranch(c) for _ in range(c.num_codebooks)])
        self.quantizer = fk.FactorizedQuantizer(
            num_codebooks=c.num_codebooks, codebook_size=c.codebook_size, codebook_dim=c.codebook_dim,
            l2_normalize=c.codebook_l2_norm, commitment_weight=c.commit_loss_beta,
            codebook_weight=c.codebook_weight, entropy_weight=c.entropy_loss_ratio,
            entropy_temperature=c.entropy_temperature, disentangle_weight=c.disentanglement_ratio,
            usage_window=c.usage_window, channel_first=True, distributed=c.quantizer_distributed,
            backend=c.quantizer_backend)
        self.post_quant_conv = nn.Conv2d(c.num_codebooks * c.codebook_dim, c.z_channels, kernel_size=1)
        self.decoder = Decoder(c.z_channels, c.ch, c.decoder_ch_mult, c.num_res_blocks, c.dropout_p,
                               c.out_channels, c.norm_groups)
        # Keyed by sub-codebook index, so a head's parameters keep their name whatever k is.
        self.feature_predictors = nn.ModuleDict({
            str(i): FeaturePredictor(c.codebook_dim, c.feat_pred_dims[i], c.grid_size, c.feat_pred_layers,
                                 c.feat_pred_heads)
            for i in c.semantic_codebooks})

    # -- input checks ------------------------------------------------------------------------
    def _check_images(self, images: Tensor) -> None:
        c = self.config
        if not isinstance(images, torch.Tensor):
            raise UsageTypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if not images.is_floating_point():
            raise UsageTypeError(f"images must be a floating-point tensor in [-1, 1], got {images.dtype}")
        if images.dim() != 4:
            raise UsageError(f"images must be [B, {c.in_channels}, H, W], got shape {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise UsageError(f"images is an empty batch (shape {tuple(images.shape)})")
        if images.shape[1] != c.in_channels:
            raise UsageError(f"images must have {c.in_channels} channels on dim 1, got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % c.down_factor or w % c.down_factor:
            raise UsageError(f"image size {h}x{w} is not divisible by the downsample factor {c.down_factor}")
        if h != c.image_size or w != c.image_size:
            raise UsageError(f"this tokenizer takes {c.image_size}x{c.image_size} images (its adapters' positional "
                             f"embeddings cover a {c.grid_size}x{c.grid_size} grid at downsample {c.down_factor}), "
                             f"got {h}x{w}: resize or crop the images, or use a config with that image_size")
        dev = self.post_quant_conv.weight.device
        if images.device != dev:
            raise UsageError(f"images are on {images.device} but the model is on {dev}")

    # -- parts -------------------------------------------------------------------------------
    def encode_latents(self, images: Tensor) -> Tensor:
        """The unquantised latents: ``[B, k*D, h, w]``, sub-codebook i in channels ``i*D:(i+1)*D``
        (before the quantizer's L2 normalisation)."""
        self._check_images(images)
        h = self.encoder(images)
        return torch.cat([branch(h) for branch in self.branches], dim=1)

    def quantize(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, fk.LossBreakdown]:
        """``self.quantizer(encode_latents(images), return_loss_breakdown=True)``: fields
        ``quantized [B, k*D, h, w]``, ``indices [B, k, h, w]``, ``loss ()``, ``breakdown``."""
        return self.quantizer(self.encode_latents(images), return_loss_breakdown=True)

    def encode(self, images: Tensor) -> Tensor:
        """Token indices of ``images``: ``[B, k, h, w]`` int64, sub-codebook order of the config."""
        return self.quantizer(self.encode_latents(images)).indices

    def decode(self, quantized: Tensor) -> Tensor:
        """Images from quantised latents ``[B, k*D, h, w]``: ``decoder(post_quant_conv(quantized))``."""
        need = self.config.num_codebooks * self.config.codebook_dim
        if not isinstance(quantized, torch.Tensor) or quantized.dim() != 4 or quantized.shape[1] != need:
            shape = tuple(quantized.shape) if isinstance(quantized, torch.Tensor) else type(quantized).__name__
            raise UsageError(f"quantized must be [B, k*D = {need}, h, w], got {shape}")
        return self.decoder(self.post_quant_conv(quantized))

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Images ``[B, out_channels, h*f, w*f]`` from indices ``[B, k, h, w]`` (any h, w)."""
        if not isinstance(indices, torch.Tensor):
            raise UsageTypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
        if indices.dim() != 4:
            raise UsageError(f"indices must be [B, k={self.config.num_codebooks}, h, w], got shape "
                             f"{tuple(indices.shape)}")
        return self.decode(self.quantizer.decode_indices(indices, channel_first=True))

    def predict_features(self, quantized: Tensor) -> tuple[Tensor, ...]:
        """Per feature predictor (``config.semantic_codebooks`` order): the predicted teacher CLS feature
        ``[B, width]`` from that sub-codebook's quantised map."""
        d = self.config.codebook_dim
        return tuple(self.feature_predictors[str(i)](quantized[:, i * d:(i + 1) * d])[:, 0]
                     for i in self.config.semantic_codebooks)

    def fingerprint(self) -> str:
        """A digest of what makes this tokenizer's codes mean what they mean: its weights and the config fields
        that shape encoding and decoding (not training-only settings, the kernel backend or the usage
        counters). Code folders and generator checkpoints record it; ``fqgan sample`` compares it."""
        config = {k: v for k, v in self.config.to_dict().items() if k not in _NOT_FINGERPRINTED}
        state = {k: v for k, v in self.state_dict().items() if k not in ("quantizer.step", "quantizer.last_used")}
        return state_fingerprint(config, state)

    @property
    def last_layer(self) -> Tensor:
        """The decoder's last conv weight (where the adaptive GAN weight is measured)."""
        return self.decoder.last_layer

    # -- forward -----------------------------------------------------------------------------
    def forward(self, images: Tensor) -> TokenizerOutput:
        """Reconstruct ``images`` and return every model-side loss term (see :class:`TokenizerOutput`)."""
        q = self.quantize(images)
        features = self.predict_features(q.quantized)
        return TokenizerOutput(self.decode(q.quantized), q.breakdown, q.loss, q.indices, features)
