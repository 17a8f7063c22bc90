"""Transformer heads of the FQGAN tokenizer: the per-sub-codebook ``FactorizedAdapter`` and the
``FeaturePredictor`` that predicts a frozen teacher's CLS feature from a semantic sub-codebook.

Parameter names equal the official ones (``transformer.{j}.attn.in_proj_weight``, ``mlp.c_fc``, ...;
showlab/FQGAN ``tokenizer/vq_model_dual.py``), so checkpoints map by prefix only. The attention is
our own module on ``F.scaled_dot_product_attention``; its ``in_proj_weight`` / ``in_proj_bias`` /
``out_proj`` have ``nn.MultiheadAttention``'s layout ([q; k; v] stacked on dim 0) and initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fqgan.runtime.errors import UsageError

__all__ = ["FactorizedAdapter", "FeaturePredictor", "ResidualAttentionBlock", "SelfAttention"]


class SelfAttention(nn.Module):
    """Multi-head self-attention equal to ``nn.MultiheadAttention(width, heads)(x, x, x)[0]`` for
    batch-first ``x`` ``[B, L, width]`` (no mask, no dropout), with the same parameter names."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise UsageError(f"width {width} is not divisible by heads {heads}")
        self.width, self.heads = width, heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)
        # nn.MultiheadAttention._reset_parameters: xavier-uniform in_proj, zero biases.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, L, 3 * width]
        qkv = qkv.reshape(b, n, 3, self.heads, self.width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, heads, L, head_dim]
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.width))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block (CLIP style): ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))`` with
    ``mlp = c_proj(gelu(c_fc(.)))``; ``mlp_ratio = 0`` drops the MLP. ``[B, L, width]`` in and out."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.mlp_ratio = mlp_ratio
        if mlp_ratio > 0:
            hidden = int(width * mlp_ratio)
            self.ln_2 = nn.LayerNorm(width)
            self.mlp = nn.Sequential()
            self.mlp.add_module("c_fc", nn.Linear(width, hidden))
            self.mlp.add_module("gelu", nn.GELU())
            self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        if self.mlp_ratio > 0:
            x = x + self.mlp(self.ln_2(x))
        return x


class FactorizedAdapter(nn.Module):
    """One sub-codebook's adapter on the encoder trunk's output: tokens + learned positional
    embedding, ``ln_pre``, ``layers`` transformer blocks, ``ln_post``.
    ``[B, width, g, g] -> [B, width, g, g]``, g = ``grid_size`` (fixed by the positional embedding:
    officially 256 // down_factor, the trunk's width 512, 6 layers, 8 heads)."""

    def __init__(self, width: int, grid_size: int, layers: int = 6, heads: int = 8, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.width, self.grid_size = width, grid_size
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(grid_size ** 2, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        if h * w != self.grid_size ** 2:
            raise UsageError(f"FactorizedAdapter has positional embeddings for a {self.grid_size}x{self.grid_size} "
                             f"grid, got a {h}x{w} feature map")
        x = x.flatten(2).transpose(1, 2)  # [B, h*w, C], row-major positions as the official rearrange
        x = self.ln_pre(x + self.positional_embedding.to(x.dtype))
        for block in self.transformer:
            x = block(x)
        x = self.ln_post(x)
        return x.transpose(1, 2).reshape(b, c, h, w)


class FeaturePredictor(nn.Module):
    """Predicts a teacher's features from a quantised sub-codebook map: per position
    ``upscale = Linear(in_dim, width) -> ReLU -> Linear(width, width)``, a class token prepended,
    learned positional embedding, ``ln_pre``, ``layers`` transformer blocks, ``ln_post``.
    ``[B, in_dim, g, g] -> [B, 1 + g*g, width]``; token 0 (the class token) is what the InfoNCE loss
    compares with the teacher's CLS feature. Official: 3 layers, 8 heads, width = the teacher's
    hidden size (Dual 1024, Triple 384 and 768)."""

    def __init__(self, in_dim: int, width: int, grid_size: int, layers: int = 3, heads: int = 8,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.width, self.grid_size = width, grid_size
        self.upscale = nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Linear(width, width))
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(1, width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid_size ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        x = self.upscale(x.flatten(2).transpose(1, 2))  # [B, g*g, width]
        cls = self.class_embedding.to(x.dtype).unsqueeze(0).expand(b, -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        for block in self.transformer:
            x = block(x)
        return self.ln_post(x)
