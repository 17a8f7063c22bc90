"""VQGAN building blocks of the FQGAN tokenizer: ResNet and attention blocks, resampling, the
shared encoder trunk and the pixel decoder.

Module and parameter names follow LlamaGen / FQGAN (``conv_blocks.{i}.res.{j}.norm1``, ...), so the
released checkpoints' trunk and decoder keys load unchanged. Behaviour follows
``tokenizer/vq_model_dual.py`` of showlab/FQGAN, including its quirks: ``Downsample`` pads
right/bottom only, attention blocks run only at the lowest resolution, GroupNorm eps is 1e-6.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AttnBlock", "Decoder", "Downsample", "Encoder", "ResnetBlock", "Upsample", "group_norm", "swish"]


def swish(x: Tensor) -> Tensor:
    """``x * sigmoid(x)`` (the official ``nonlinearity``)."""
    return F.silu(x)


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """The official ``Normalize``: ``GroupNorm(groups, channels, eps=1e-6, affine=True)``."""
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """``x' + conv2(drop(swish(norm2(conv1(swish(norm1(x)))))))``, x' = x or a 1x1 conv of x when the
    channel count changes (``nin_shortcut``). ``[B, C_in, H, W] -> [B, C_out, H, W]``."""

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0,
                 norm_groups: int = 32) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q, k, v and output projection, residual:
    ``x + proj_out(softmax(q^T k / sqrt(C)) v)`` over the H*W positions. ``[B, C, H, W]`` in and out."""

    def __init__(self, in_channels: int, norm_groups: int = 32) -> None:
        super().__init__()
        self.norm = group_norm(in_channels, norm_groups)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # q, k, v: [B, 1, HW, C] -- one head of width C; SDPA's default scale is C ** -0.5, as the official.
        q, k, v = (conv(hn).reshape(b, 1, c, h * w).transpose(-1, -2) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C]
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv. ``[B, C, H, W] -> [B, C, 2H, 2W]``."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    """3x3 stride-2 conv after zero padding of one pixel on the right and bottom only (taming's
    asymmetric padding). ``[B, C, H, W] -> [B, C, H/2, W/2]`` for even H, W."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


def _level() -> nn.Module:
    return nn.Module()  # a named container: .res, .attn, .downsample / .upsample, as LlamaGen


class Encoder(nn.Module):
    """The shared encoder trunk: ``conv_in``, per level ``num_res_blocks`` ResNet blocks (each followed
    by an attention block at the lowest level) and a downsample (all levels but the last), then the
    middle ResNet-attention-ResNet. ``[B, in_channels, H, W] -> [B, ch * ch_mult[-1], H/f, W/f]``,
    f = 2 ** (len(ch_mult) - 1). The per-sub-codebook heads (adapter, norm, conv out) are separate
    (:class:`fqgan.tokenizer.model.EncoderBranch`)."""

    def __init__(self, in_channels: int = 3, ch: int = 128, ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, dropout: float = 0.0, norm_groups: int = 32) -> None:
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1, *ch_mult)
        self.conv_blocks = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            level = _level()
            level.res = nn.ModuleList()
            level.attn = nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                level.res.append(ResnetBlock(block_in, block_out, dropout, norm_groups))
                block_in = block_out
                if i_level == self.num_resolutions - 1:
                    level.attn.append(AttnBlock(block_in, norm_groups))
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in)
            self.conv_blocks.append(level)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, dropout, norm_groups),
                                  AttnBlock(block_in, norm_groups),
                                  ResnetBlock(block_in, block_in, dropout, norm_groups)])
        self.out_channels = block_in

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for i_level, level in enumerate(self.conv_blocks):
            for i_block in range(self.num_res_blocks):
                h = level.res[i_block](h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return h


class Decoder(nn.Module):
    """The pixel decoder: ``conv_in`` (z_channels -> ch * ch_mult[-1]), middle ResNet-attention-ResNet,
    per level (lowest resolution first) ``num_res_blocks + 1`` ResNet blocks (each followed by an
    attention block at the lowest level) and an upsample (all but the last), then GroupNorm, swish,
    ``conv_out``. ``[B, z_channels, h, w] -> [B, out_channels, h*f, w*f]``."""

    def __init__(self, z_channels: int = 256, ch: int = 128, ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, dropout: float = 0.0, out_channels: int = 3,
                 norm_groups: int = 32) -> None:
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, dropout, norm_groups),
                                  AttnBlock(block_in, norm_groups),
                                  ResnetBlock(block_in, block_in, dropout, norm_groups)])
        self.conv_blocks = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            level = _level()
            level.res = nn.ModuleList()
            level.attn = nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                level.res.append(ResnetBlock(block_in, block_out, dropout, norm_groups))
                block_in = block_out
                if i_level == self.num_resolutions - 1:
                    level.attn.append(AttnBlock(block_in, norm_groups))
            if i_level != 0:
                level.upsample = Upsample(block_in)
            self.conv_blocks.append(level)
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    @property
    def last_layer(self) -> Tensor:
        """``conv_out.weight``: where the adaptive GAN weight compares gradient norms."""
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for i_level, level in enumerate(self.conv_blocks):
            for i_block in range(self.num_res_blocks + 1):
                h = level.res[i_block](h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))

