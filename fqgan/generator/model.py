"""FAR: the class-conditional factorized autoregressive generator of FQGAN (arXiv 2411.16681).

A LlamaGen-style decoder-only transformer (RMSNorm, SwiGLU, 2-D RoPE) over the T image positions,
with a factorized AR head: per position, a few transformer layers over k slots turn the trunk's
hidden state into k hidden states, one per sub-token, and k output heads give the k logit vectors.
Behaviour (every detail that affects outputs) follows showlab/FQGAN ``far_dual.py`` / ``far_triple.py``
for any k; docs/generator.md lists those details and the tests that pin each one.

One file for the whole model, as LlamaGen's and gpt-fast's ``model.py``: the blocks, the caches and the
two-level decoding read together (about 500 lines); the sampler is in :mod:`.generate`.

Sequence layout (training, T positions, k factors, indices [B, k, T])::

    trunk input     [cls, x_0, x_1, ..., x_{T-2}]      x_t = aggregate(cat_i E_i[idx[:, i, t]])
    trunk RoPE row  [ 0 ,  1 ,  2 , ...,  T-1   ]      row 0 = all zeros, row r >= 1 = grid cell r-1
    head slots at t [h_t, E_0[idx_0,t], ..., E_{k-2}[idx_{k-2},t]]  with RoPE rows [0, 1, ..., k-1]
    head j at t predicts idx[:, j, t]
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fqgan_kernels as fk
from fqgan.runtime.errors import UsageError, UsageTypeError

from .config import FARConfig


class FARLoss(NamedTuple):
    """``loss`` () = mean over the k heads of ``per_head`` (k,), each a mean cross-entropy over B*T tokens."""

    loss: Tensor
    per_head: Tensor


# ----------------------------------------------------------------------------------------------
# 2-D rotary position embedding
# ----------------------------------------------------------------------------------------------
def rope_table_2d(grid_size: int, head_dim: int, base: float) -> Tensor:
    """RoPE (cos, sin) table ``[1 + grid_size**2, head_dim // 2, 2]`` in float32, as the official
    ``precompute_freqs_cis_2d(..., cls_token_num=1)``.

    Row 0 (the class token) is all zeros, not the identity: rotating by it zeroes the class token's
    queries and keys (official behaviour, kept for checkpoint parity). Row ``1 + r * G + c`` is grid
    cell (r, c): the first head_dim/4 pairs rotate by ``r * f_i``, the last head_dim/4 by ``c * f_i``,
    ``f_i = base ** (-2 i / (head_dim / 2))``.
    """
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # [hd/4]
    angle = torch.outer(torch.arange(grid_size), inv_freq)  # [G, hd/4]
    grid = torch.cat([angle[:, None, :].expand(-1, grid_size, -1),   # row angle
                      angle[None, :, :].expand(grid_size, -1, -1)],  # column angle
                     dim=-1)  # [G, G, hd/2]
    table = torch.stack([torch.cos(grid), torch.sin(grid)], dim=-1).flatten(0, 1)  # [G*G, hd/2, 2]
    return torch.cat([torch.zeros(1, half, 2), table])


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate adjacent pairs ``(x[2i], x[2i+1])`` of x [B, S, H, hd] by rope [S, hd/2, 2] (cos, sin),
    computed in float32 and returned in x's dtype."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)  # [B, S, H, hd/2, 2]
    r = rope.view(1, xs.shape[1], 1, xs.shape[3], 2)
    out = torch.stack([xs[..., 0] * r[..., 0] - xs[..., 1] * r[..., 1],
                       xs[..., 1] * r[..., 0] + xs[..., 0] * r[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps)`` in float32, cast back to x's dtype, times ``weight``."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: ``dropout(w2(silu(w1 x) * w3 x))``."""

    def __init__(self, config: FARConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout_p)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class KVCache:
    """Keys and values of one attention layer for generation: [B, n_kv_head, length, head_dim]."""

    def __init__(self, batch: int, n_kv_head: int, length: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.k = torch.zeros(batch, n_kv_head, length, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, pos: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, Hkv, S, hd] at positions [pos, pos + S); return all keys/values [B, Hkv, pos + S, hd]."""
        end = pos + k.shape[2]
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE on q and k (fused ``wqkv``, official layout
    ``[q: n_head*hd | k: n_kv_head*hd | v: n_kv_head*hd]``)."""

    def __init__(self, config: FARConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.dim = config.dim
        self.wqkv = nn.Linear(config.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.attn_dropout_p = config.attn_dropout_p
        self.resid_dropout = nn.Dropout(config.resid_dropout_p)

    def forward(self, x: Tensor, rope: Tensor, cache: KVCache | None = None, pos: int = 0) -> Tensor:
        # x: [B, S, D]; rope: [S, hd/2, 2]
        B, S, _ = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv, kv], dim=-1)
        q = apply_rope(q.view(B, S, self.n_head, self.head_dim), rope).transpose(1, 2)  # [B, H, S, hd]
        k = apply_rope(k.view(B, S, self.n_kv_head, self.head_dim), rope).transpose(1, 2)  # [B, Hkv, S, hd]
        v = v.view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)
        mask, causal = None, True
        if cache is not None:
            k, v = cache.update(pos, k, v)  # [B, Hkv, pos + S, hd]
            causal = False
            if S > 1:  # queries at absolute positions pos..pos+S-1 see keys 0..own position
                mask = torch.ones(S, pos + S, dtype=torch.bool, device=x.device).tril(diagonal=pos)
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                             dropout_p=self.attn_dropout_p if self.training else 0.0)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(B, S, self.dim)))

    def decode(self, x: Tensor, rope: Tensor, k_cache: Tensor, v_cache: Tensor, index: Tensor, mask: Tensor) -> Tensor:
        """One new position per row with a static cache (eval mode): x [R, 1, D], rope [1, hd/2, 2];
        k_cache / v_cache [R, Hkv, T, hd] (:class:`StaticCache` buffers, written in place at ``index`` [1] long);
        ``mask`` [L] bool, True for the keys ``[0, L)`` this position reads and sees (L <= T). Shapes never
        depend on the position, so one compiled step serves every position of the same L."""
        R = x.shape[0]
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv, kv], dim=-1)
        q = apply_rope(q.view(R, 1, self.n_head, self.head_dim), rope).transpose(1, 2)  # [R, H, 1, hd]
        k = apply_rope(k.view(R, 1, self.n_kv_head, self.head_dim), rope).transpose(1, 2)  # [R, Hkv, 1, hd]
        k_cache[:, :, index] = k  # index_put_ on the whole buffer: in place under torch.compile too
        v_cache[:, :, index] = v.view(R, 1, self.n_kv_head, self.head_dim).transpose(1, 2)
        L = mask.shape[0]
        out = F.scaled_dot_product_attention(q, k_cache[:, :, :L], v_cache[:, :, :L], attn_mask=mask.view(1, 1, 1, L),
                                             enable_gqa=self.n_kv_head != self.n_head)  # [R, H, 1, hd]
        return self.wo(out.transpose(1, 2).reshape(R, 1, self.dim))


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero whole samples with probability p, scale the rest by 1 / (1 - p)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p).div_(1.0 - p)
    return x * keep


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + dp(attn(norm(x)))``, ``out = h + dp(ffn(norm(h)))``."""

    def __init__(self, config: FARConfig, drop_path_p: float):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.drop_path_p = drop_path_p

    def forward(self, x: Tensor, rope: Tensor, cache: KVCache | None = None, pos: int = 0) -> Tensor:
        h = x + drop_path(self.attention(self.attention_norm(x), rope, cache, pos), self.drop_path_p, self.training)
        return h + drop_path(self.feed_forward(self.ffn_norm(h)), self.drop_path_p, self.training)

    def decode(self, x: Tensor, rope: Tensor, k_cache: Tensor, v_cache: Tensor, index: Tensor, mask: Tensor) -> Tensor:
        """Eval-mode step with a static cache (:meth:`Attention.decode`); no dropout."""
        h = x + self.attention.decode(self.attention_norm(x), rope, k_cache, v_cache, index, mask)
        w = self.feed_forward
        y = self.ffn_norm(h)
        return h + w.w2(F.silu(w.w1(y)) * w.w3(y))


class LabelEmbedder(nn.Module):
    """Class label -> one embedding [B, 1, D]; row ``num_classes`` is the null class of CFG.

    In training mode with ``class_dropout_prob > 0``, each label is replaced by the null class with that
    probability, drawn as the official ``torch.rand(B) < p`` (so a seeded run drops the same labels)."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    def forward(self, labels: Tensor, drop: Tensor | None = None) -> Tensor:
        if drop is None and self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        if drop is not None:
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels).unsqueeze(1)


class FARCache(NamedTuple):
    """Generation state: one KV cache per trunk layer (T positions) and per AR-head layer (k slots)."""

    trunk: list[KVCache]
    head: list[KVCache]


class StaticCache(NamedTuple):
    """Preallocated generation state for a compiled decode step: the keys and values of every trunk layer
    (``block_size`` positions) and every AR-head layer (k slots), one buffer per layer, written in place
    (whole buffers, not views of a stacked one: a compiled step then updates them in place, where a view's
    update would copy its whole base)."""

    trunk_k: list[Tensor]  # n_layer x [R, Hkv, T, hd]
    trunk_v: list[Tensor]
    head_k: list[Tensor]  # ar_n_layer x [R, Hkv, k, hd]
    head_v: list[Tensor]

    def buffers(self) -> list[Tensor]:
        return [*self.trunk_k, *self.trunk_v, *self.head_k, *self.head_v]


# ----------------------------------------------------------------------------------------------
# FAR
# ----------------------------------------------------------------------------------------------
class FAR(nn.Module):
    """Class-conditional factorized AR transformer (FQGAN's FAR) for k sub-codebooks.

    Training: ``model(indices, labels)`` (= ``model.loss``) -> :class:`FARLoss`, the official loss
    ``(CE_1 + ... + CE_k) / k`` through :func:`fqgan_kernels.linear_cross_entropy` (no B*T x V logits).
    Inspection: ``model.logits(indices, labels)`` -> [B, k, T, V] (materialises all logits).
    Generation: :func:`fqgan.generator.generate`.

    Parameters are one tensor per role: ``tok_embed`` [k, V, D] (input embedding of each sub-codebook)
    and ``head`` [k, V, D] (the k output heads, no bias), so the fused loss takes ``head`` as is.
    """

    def __init__(self, config: FARConfig):
        super().__init__()
        if not isinstance(config, FARConfig):
            raise UsageTypeError(f"config must be a FARConfig, got {type(config).__name__}")
        self.config = c = config
        k, V, D = c.num_factors, c.vocab_size, c.dim
        self.class_embed = LabelEmbedder(c.num_classes, D, c.class_dropout_prob)
        self.tok_embed = nn.Parameter(torch.empty(k, V, D))  # [k, V, D]
        self.aggregate = nn.Linear(k * D, D)  # cat of the k sub-token embeddings -> one input per position
        self.tok_dropout = nn.Dropout(c.token_dropout_p)
        # float32 rates as the official linspace(...).item() (device given: works under a meta device context)
        dpr = torch.linspace(0, c.drop_path_rate, c.n_layer, device="cpu").tolist()
        self.layers = nn.ModuleList(TransformerBlock(c, p) for p in dpr)
        dpr = torch.linspace(0, c.drop_path_rate, c.ar_n_layer, device="cpu").tolist()
        self.ar_layers = nn.ModuleList(TransformerBlock(c, p) for p in dpr)
        self.norm = RMSNorm(D, eps=c.norm_eps)
        self.head = nn.Parameter(torch.empty(k, V, D))  # [k, V, D]
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the rotations (as official).
        self._rope = rope_table_2d(c.grid_size, c.head_dim, c.rope_base)  # [1 + T, hd/2, 2] float32
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: Linear and Embedding weights ~ N(0, initializer_range), biases 0, output heads 0."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        nn.init.normal_(self.tok_embed, 0.0, std)
        nn.init.zeros_(self.head)

    def with_dtype(self, dtype: torch.dtype) -> FAR:
        """A copy of this model (eval mode) with its weights in ``dtype`` and the RoPE table in float32, as
        ``copy.deepcopy(self).to(dtype)`` without the full-precision copy in between."""
        with torch.device("meta"):
            twin = FAR(self.config)
        twin.load_state_dict({n: t.detach().to(dtype) for n, t in self.state_dict().items()}, assign=True)
        twin._rope = self._rope
        return twin.eval()

    def rope(self, device: torch.device) -> Tensor:
        """The float32 RoPE table [1 + T, hd/2, 2] on ``device`` (row 0 zeros: the class token)."""
        if self._rope.device != device:
            self._rope = self._rope.to(device)
        return self._rope

    # -- input checks ----------------------------------------------------------------------
    def check_inputs(self, indices: Tensor, labels: Tensor, drop_labels: Tensor | None = None) -> None:
        """Raise TypeError/ValueError unless indices is an integer [B, k, T] tensor (k = num_factors,
        1 <= T <= block_size) with values in [0, vocab_size) and labels an integer [B] tensor in
        [0, num_classes). One host sync for the value checks."""
        c = self.config
        if not isinstance(indices, Tensor) or not isinstance(labels, Tensor):
            raise UsageTypeError(f"indices and labels must be tensors, got {type(indices).__name__} and "
                            f"{type(labels).__name__}")
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise UsageTypeError(f"indices must be an integer tensor, got {indices.dtype}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise UsageTypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if indices.ndim != 3 or indices.shape[1] != c.num_factors:
            raise UsageError(f"indices must have shape [B, k={c.num_factors}, T] (one row of codes per "
                             f"sub-codebook), got {tuple(indices.shape)}")
        B, _, T = indices.shape
        if not 1 <= T <= c.block_size:
            raise UsageError(f"indices has T = {T} positions; this model takes 1..block_size={c.block_size}")
        if labels.shape != (B,):
            raise UsageError(f"labels must have shape [B={B}], got {tuple(labels.shape)}")
        if indices.device != labels.device:
            raise UsageError(f"indices ({indices.device}) and labels ({labels.device}) are on different devices")
        if drop_labels is not None:
            if not isinstance(drop_labels, Tensor) or drop_labels.dtype != torch.bool or drop_labels.shape != (B,):
                raise UsageError(f"drop_labels must be a bool tensor of shape [B={B}] or None")
            if not c.has_null_class:
                raise UsageError("drop_labels needs the null class, but this model has class_dropout_prob = 0")
        if B == 0:
            return
        lo_hi = torch.stack([indices.min().long(), indices.max().long(), labels.min().long(), labels.max().long()])
        if indices.device.type != "cpu" or torch.compiler.is_compiling():
            # No host sync on the GPU (one per training step otherwise): a device-side assert, which
            # stops the process at the next sync with this message.
            ok = (lo_hi[0] >= 0) & (lo_hi[1] < c.vocab_size) & (lo_hi[2] >= 0) & (lo_hi[3] < c.num_classes)
            torch._assert_async(ok, f"FAR: indices must be in [0, vocab_size={c.vocab_size}) and labels in "
                                    f"[0, num_classes={c.num_classes})")
            return
        stats = lo_hi.tolist()
        if stats[0] < 0 or stats[1] >= c.vocab_size:
            raise UsageError(f"indices must be in [0, vocab_size={c.vocab_size}), got values in "
                             f"[{stats[0]}, {stats[1]}]")
        if stats[2] < 0 or stats[3] >= c.num_classes:
            raise UsageError(f"labels must be class ids in [0, num_classes={c.num_classes}), got values in "
                             f"[{stats[2]}, {stats[3]}]")

    # -- training / teacher-forced forward --------------------------------------------------
    def embed(self, indices: Tensor) -> Tensor:
        """Sub-token input embeddings: indices [B, k, T] -> [B, T, k, D] (``tok_embed[i][indices[:, i]]``)."""
        k, V, D = self.tok_embed.shape
        offsets = torch.arange(k, device=indices.device).view(1, k, 1) * V
        return F.embedding(indices.long() + offsets, self.tok_embed.view(k * V, D)).transpose(1, 2)

    def hidden(self, indices: Tensor, labels: Tensor, drop_labels: Tensor | None = None) -> Tensor:
        """Final-norm hidden states of the k head slots, [B, T, k, D]: slot j at position t feeds head j,
        which predicts ``indices[:, j, t]``. ``drop_labels`` [B] bool forces the null class per row (else
        training mode drops labels with ``class_dropout_prob``)."""
        self.check_inputs(indices, labels, drop_labels)
        B, k, T = indices.shape
        D = self.config.dim
        rope = self.rope(indices.device)
        emb = self.embed(indices)  # [B, T, k, D]
        cond = self.class_embed(labels, drop_labels)  # [B, 1, D]
        tokens = self.aggregate(emb.flatten(2))  # [B, T, D]
        h = self.tok_dropout(torch.cat([cond, tokens[:, :-1]], dim=1))  # [B, T, D]
        for layer in self.layers:
            h = layer(h, rope[:T])
        # AR head: slot 0 = the trunk state, slot j >= 1 = embedding of sub-token j-1 (teacher forcing).
        ctx = torch.cat([h.unsqueeze(2), emb[:, :, : k - 1]], dim=2).reshape(B * T, k, D)
        for layer in self.ar_layers:
            ctx = layer(ctx, rope[:k])
        return self.norm(ctx).view(B, T, k, D)

    def _head_operands(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(hidden, weight) for the k heads in one dtype; under autocast the autocast dtype, as F.linear."""
        w = self.head
        if torch.is_autocast_enabled(h.device.type):
            dt = torch.get_autocast_dtype(h.device.type)
            return h.to(dt), w.to(dt)
        return h.to(w.dtype), w

    def forward(self, indices: Tensor, labels: Tensor, *, drop_labels: Tensor | None = None,
                backend: str | None = None) -> FARLoss:
        """The official training loss: mean over heads of the mean cross-entropy of head j's logits at
        every position against ``indices[:, j, :]`` (``(loss_1 + ... + loss_k) / k``).

        :param indices: [B, k, T] integer codes, sub-codebook i in row i (factor order of the checkpoint)
        :param labels: [B] class ids in [0, num_classes)
        :param drop_labels: [B] bool, rows to condition on the null class (None: training-mode dropout)
        :param backend: backend of :func:`fqgan_kernels.linear_cross_entropy` (None: auto; ``"reference"``:
            :func:`fqgan_kernels.reference.linear_cross_entropy`, which materialises the B*T x V logits per head)
        :returns: FARLoss(loss (), per_head (k,)), float32
        """
        return self.head_loss(self.hidden(indices, labels, drop_labels), indices, backend=backend)

    def head_loss(self, h: Tensor, indices: Tensor, *, backend: str | None = None) -> FARLoss:
        """The k output heads + cross-entropy on head hidden states h [B, T, k, D] (:meth:`hidden`) against
        ``indices`` [B, k, T]: the second half of :meth:`forward`."""
        B, k, T = indices.shape
        hidden, weight = self._head_operands(h.permute(2, 0, 1, 3).reshape(k, B * T, -1))  # [k, N, D]
        targets = indices.long().transpose(0, 1).reshape(k, B * T)  # [k, N], rows (b, t) as hidden
        out = fk.linear_cross_entropy(hidden, weight, targets, backend=backend)
        return FARLoss(out.loss, out.per_head)

    def loss(self, indices: Tensor, labels: Tensor, **kwargs) -> FARLoss:
        """Same as ``self(indices, labels, **kwargs)`` (call the module itself under DDP/FSDP)."""
        return self(indices, labels, **kwargs)

    def logits(self, indices: Tensor, labels: Tensor, drop_labels: Tensor | None = None) -> Tensor:
        """Teacher-forced logits of every head, [B, k, T, V] float32 (``logits[:, j, t]`` scores
        ``indices[:, j, t]``). Materialises B*k*T*V floats: for tests and small inputs."""
        h = self.hidden(indices, labels, drop_labels)  # [B, T, k, D]
        hidden, weight = self._head_operands(h)
        return torch.einsum("btkd,kvd->bktv", hidden, weight).float()

    # -- generation steps (used by fqgan.generator.generate) ----------------------------------
    def new_cache(self, batch: int, device: torch.device | str, dtype: torch.dtype | None = None) -> FARCache:
        """Empty KV caches for ``batch`` rows: trunk layers hold T = block_size positions, AR-head layers k slots."""
        c = self.config
        dtype = dtype or self.aggregate.weight.dtype
        device = torch.device(device)
        trunk = [KVCache(batch, c.kv_heads, c.block_size, c.head_dim, dtype, device) for _ in self.layers]
        head = [KVCache(batch, c.kv_heads, c.num_factors, c.head_dim, dtype, device) for _ in self.ar_layers]
        return FARCache(trunk, head)

    def class_input(self, labels: Tensor) -> Tensor:
        """Trunk input at position 0: the label embedding [R, 1, D] (label ``num_classes`` = null class)."""
        return self.class_embed.embedding_table(labels).unsqueeze(1)

    def token_input(self, tokens: Tensor) -> Tensor:
        """Trunk input for one image position from its k sampled sub-tokens [R, k] -> [R, 1, D]."""
        return self.aggregate(self.embed(tokens.unsqueeze(-1)).flatten(2))

    def slot_input(self, tokens: Tensor, factor: int) -> Tensor:
        """AR-head input of slot ``factor + 1``: the embedding of sub-token ``factor`` [R] -> [R, 1, D]."""
        return F.embedding(tokens.long(), self.tok_embed[factor]).unsqueeze(1)

    def decode_trunk(self, x: Tensor, pos: int, cache: FARCache) -> Tensor:
        """Trunk on inputs x [R, S, D] at positions pos..pos+S-1 (0 = class token), with the KV cache."""
        rope = self.rope(x.device)[pos: pos + x.shape[1]]
        for layer, kv in zip(self.layers, cache.trunk):
            x = layer(x, rope, kv, pos)
        return x

    def new_static_cache(self, batch: int, device: torch.device | str, dtype: torch.dtype | None = None) -> StaticCache:
        """Zeroed :class:`StaticCache` buffers for ``batch`` rows (the model's dtype unless given)."""
        c = self.config
        z = dict(dtype=dtype or self.aggregate.weight.dtype, device=torch.device(device))
        trunk = (batch, c.kv_heads, c.block_size, c.head_dim)
        head = (batch, c.kv_heads, c.num_factors, c.head_dim)
        return StaticCache(*([torch.zeros(shape, **z) for _ in range(n)]
                             for shape, n in ((trunk, c.n_layer), (trunk, c.n_layer), (head, c.ar_n_layer),
                                              (head, c.ar_n_layer))))

    def decode_trunk_static(self, x: Tensor, pos: Tensor, cache: StaticCache, length: int | None = None) -> Tensor:
        """Trunk on one input per row x [R, 1, D] at position ``pos`` ([1] long tensor; 0 = class token), with
        the static cache: keys ``[0, length)`` are read (default ``block_size``; ``length > pos``), those after
        ``pos`` masked. Eval mode (no dropout). Same numbers as :meth:`decode_trunk` up to float rounding."""
        length = self.config.block_size if length is None else length
        rope = self.rope(x.device).index_select(0, pos)  # [1, hd/2, 2]
        mask = torch.arange(length, device=x.device) <= pos  # [length]
        for layer, k_cache, v_cache in zip(self.layers, cache.trunk_k, cache.trunk_v):
            x = layer.decode(x, rope, k_cache, v_cache, pos, mask)
        return x

    def decode_slot_static(self, x: Tensor, slot: int, cache: StaticCache) -> Tensor:
        """AR head on one slot input x [R, 1, D] with the static cache -> final-norm hidden [R, D] of head
        ``slot`` (:meth:`decode_slot` with a static cache; eval mode)."""
        k = self.config.num_factors
        index = torch.full((1,), slot, dtype=torch.long, device=x.device)
        rope = self.rope(x.device)[slot: slot + 1]
        mask = torch.arange(k, device=x.device) <= slot
        for layer, k_cache, v_cache in zip(self.ar_layers, cache.head_k, cache.head_v):
            x = layer.decode(x, rope, k_cache, v_cache, index, mask)
        return self.norm(x)[:, 0]

    def decode_slot(self, x: Tensor, slot: int, cache: FARCache) -> Tensor:
        """AR head on one slot input x [R, 1, D] (slot 0: the trunk state) -> final-norm hidden [R, D]
        of head ``slot``."""
        rope = self.rope(x.device)[slot: slot + 1]
        for layer, kv in zip(self.ar_layers, cache.head):
            x = layer(x, rope, kv, slot)
        return self.norm(x)[:, 0]
