"""Test-only: the official FAR (showlab/FQGAN ``autoregressive/models/far_dual.py`` / ``far_triple.py`` and
``generate_dual.py`` / ``generate_triple.py``), re-written operation for operation with the official module
tree and key names, for k factors (the official files are k = 2 and k = 3 and differ only in k).

It keeps the official quirks on purpose -- they are what the parity tests pin:
- RoPE row 0 (class token) is all zeros, so the class token's q and k are zero in every layer;
- the AR head's slots take rows 0..k-1 of the trunk table (slot 0 zeros, slot 1 the identity, ...);
- the AR-head blocks get the mask in the ``start_pos`` argument (so training attention is ``is_causal``);
- in eval mode ``forward`` indexes RoPE by ``input_pos`` (unusable without it): compare in train mode;
- generation caches span ``find_multiple(1 + T, 8)`` positions with a boolean mask over all of them.
Not imported by the package; nothing here is used outside tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layer: int = 32
    ar_n_layer: int = 4
    n_head: int = 32
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256
    num_factors: int = 2  # 2: far_dual.py, 3: far_triple.py


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels).unsqueeze(1)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden_dim = int(2 * (4 * config.dim) / 3)
        if config.ffn_dim_multiplier is not None:
            hidden_dim = int(config.ffn_dim_multiplier * hidden_dim)
        hidden_dim = find_multiple(hidden_dim, config.multiple_of)
        self.w1 = nn.Linear(config.dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(config.dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout_p)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class KVCache(nn.Module):
    def __init__(self, max_batch_size, max_seq_length, n_head, head_dim, dtype):
        super().__init__()
        shape = (max_batch_size, n_head, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype))

    def update(self, input_pos, k_val, v_val):
        self.k_cache[:, :, input_pos] = k_val
        self.v_cache[:, :, input_pos] = v_val
        return self.k_cache, self.v_cache


def apply_rotary_emb(x, freqs_cis):
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    f = freqs_cis.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack([xs[..., 0] * f[..., 0] - xs[..., 1] * f[..., 1],
                       xs[..., 1] * f[..., 0] + xs[..., 0] * f[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)


def precompute_freqs_cis_2d(grid_size, n_elem, base=10000, cls_token_num=120):
    half_dim = n_elem // 2
    freqs = 1.0 / (base ** (torch.arange(0, half_dim, 2)[: (half_dim // 2)].float() / half_dim))
    t = torch.arange(grid_size, device=freqs.device)
    freqs = torch.outer(t, freqs)
    freqs_grid = torch.concat([freqs[:, None, :].expand(-1, grid_size, -1),
                               freqs[None, :, :].expand(grid_size, -1, -1)], dim=-1)
    cache = torch.stack([torch.cos(freqs_grid), torch.sin(freqs_grid)], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(cls_token_num, n_elem // 2, 2), cache])


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dim = config.dim
        self.head_dim = config.dim // config.n_head
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head if config.n_kv_head is not None else config.n_head
        total_kv_dim = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.wqkv = nn.Linear(config.dim, total_kv_dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.kv_cache = None
        self.attn_dropout_p = config.attn_dropout_p
        self.resid_dropout = nn.Dropout(config.resid_dropout_p)

    def forward(self, x, freqs_cis=None, input_pos=None, mask=None):
        bsz, seqlen, _ = x.shape
        kv_size = self.n_kv_head * self.head_dim
        xq, xk, xv = self.wqkv(x).split([self.dim, kv_size, kv_size], dim=-1)
        xq = xq.view(bsz, seqlen, self.n_head, self.head_dim)
        xk = xk.view(bsz, seqlen, self.n_kv_head, self.head_dim)
        xv = xv.view(bsz, seqlen, self.n_kv_head, self.head_dim)
        xq = apply_rotary_emb(xq, freqs_cis)
        xk = apply_rotary_emb(xk, freqs_cis)
        xq, xk, xv = (t.transpose(1, 2) for t in (xq, xk, xv))
        if self.kv_cache is not None:
            keys, values = self.kv_cache.update(input_pos, xk, xv)
        else:
            keys, values = xk, xv
        keys = keys.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        values = values.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        output = F.scaled_dot_product_attention(xq, keys, values, attn_mask=mask, is_causal=mask is None,
                                                dropout_p=self.attn_dropout_p if self.training else 0)
        output = output.transpose(1, 2).contiguous().view(bsz, seqlen, self.dim)
        return self.resid_dropout(self.wo(output))


class DropPath(nn.Module):
    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1 - self.drop_prob
        random_tensor = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        random_tensor.div_(keep_prob)
        return x * random_tensor


class TransformerBlock(nn.Module):
    def __init__(self, config, drop_path):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x, freqs_cis, start_pos, mask=None):
        h = x + self.drop_path(self.attention(self.attention_norm(x), freqs_cis, start_pos, mask))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))


class Transformer(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        self.k = config.num_factors
        self.num_classes = config.num_classes
        self.cls_token_num = config.cls_token_num
        self.block_size = config.block_size
        self.cls_embedding = LabelEmbedder(config.num_classes, config.dim, config.class_dropout_prob)
        for i in range(1, self.k + 1):
            setattr(self, f"tok_embeddings_{i}", nn.Embedding(config.vocab_size, config.dim))
        self.aggregation_layer = nn.Linear(config.dim * self.k, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        dpr = [x.item() for x in torch.linspace(0, config.drop_path_rate, config.n_layer, device="cpu")]
        self.layers = nn.ModuleList(TransformerBlock(config, dpr[i]) for i in range(config.n_layer))
        dpr = [x.item() for x in torch.linspace(0, config.drop_path_rate, config.ar_n_layer, device="cpu")]
        self.ar_head = nn.ModuleList(TransformerBlock(config, dpr[i]) for i in range(config.ar_n_layer))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        for i in range(1, self.k + 1):
            setattr(self, f"output_{i}", nn.Linear(config.dim, config.vocab_size, bias=False))
        grid_size = int(self.block_size ** 0.5)
        self.freqs_cis = precompute_freqs_cis_2d(grid_size, config.dim // config.n_head, config.rope_base,
                                                 self.cls_token_num)

    def emb(self, i):
        return getattr(self, f"tok_embeddings_{i}")

    def out(self, i):
        return getattr(self, f"output_{i}")

    def setup_caches(self, max_batch_size, max_seq_length, dtype):
        head_dim = self.config.dim // self.config.n_head
        max_seq_length = find_multiple(max_seq_length, 8)
        for b in self.layers:
            b.attention.kv_cache = KVCache(max_batch_size, max_seq_length, self.config.n_head, head_dim, dtype)
        causal_mask = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool))
        self.causal_mask = causal_mask.unsqueeze(0).repeat(max_batch_size, 1, 1)

    def setup_factorized_caches(self, max_batch_size, max_seq_length, dtype):
        head_dim = self.config.dim // self.config.n_head
        max_seq_length = find_multiple(max_seq_length, 8)
        for b in self.ar_head:
            b.attention.kv_cache = KVCache(max_batch_size, max_seq_length, self.config.n_head, head_dim, dtype)

    def forward(self, idx, cond_idx, targets=None):
        """idx, targets: lists of k [B, T] code tensors (official idx_1, idx_2[, idx_3])."""
        cond_embeddings = self.cls_embedding(cond_idx, train=self.training)[:, :self.cls_token_num]
        embs = [self.emb(i + 1)(idx[i]) for i in range(self.k)]
        token_embeddings = self.aggregation_layer(torch.cat(embs, dim=-1))
        token_embeddings = torch.cat((cond_embeddings, token_embeddings[:, :-1, :]), dim=1)
        h = self.tok_dropout(token_embeddings)
        B, N, D = h.shape
        freqs_cis = self.freqs_cis[:token_embeddings.shape[1]]
        for layer in self.layers:
            h = layer(h, freqs_cis, None, None)
        factorized_ctx = torch.stack([h, *embs[: self.k - 1]], dim=-2).contiguous().view(B * N, -1, D)
        factorized_ctx_freqs_cis = freqs_cis[:factorized_ctx.shape[1]]
        for block in self.ar_head:
            factorized_ctx = block(factorized_ctx, factorized_ctx_freqs_cis, None)  # mask lands in start_pos
        h = self.norm(factorized_ctx.contiguous().view(B, N, -1, D))
        logits = [self.out(i + 1)(h[:, :, i, :]).float() for i in range(self.k)]
        logits = [lg[:, self.cls_token_num - 1:].contiguous() for lg in logits]
        loss = None
        if targets is not None:
            losses = [F.cross_entropy(lg.view(-1, lg.size(-1)), t.reshape(-1)) for lg, t in zip(logits, targets)]
            loss = sum(losses) / float(self.k)
        return logits, loss

    def generate_context(self, idx, input_pos=None, first_step=False):
        if first_step:
            token_embeddings = self.cls_embedding(idx, train=self.training).squeeze(-2)
        else:
            token_embeddings = self.aggregation_layer(torch.cat([self.emb(i + 1)(idx[i]) for i in range(self.k)],
                                                                dim=-1))
        bs = token_embeddings.shape[0]
        mask = self.causal_mask[:bs, None, input_pos]
        h = self.tok_dropout(token_embeddings)
        freq_cis = self.freqs_cis[input_pos]
        for block in self.layers:
            h = block(h, freq_cis, input_pos, mask)
        return h

    def decode_subtoken(self, h, x, input_pos=None, step=0):
        B, N, D = h.shape
        if step == 0:
            factorized_ctx = h.contiguous().reshape(B * N, -1, D)
        else:
            factorized_ctx = self.emb(step)(x[0]).reshape(B * N, -1, D)
        mask = self.causal_mask[:B, None, input_pos]
        freqs = self.freqs_cis[input_pos]
        for block in self.ar_head:
            factorized_ctx = block(factorized_ctx, freqs, start_pos=input_pos, mask=mask)
        h = self.norm(factorized_ctx.reshape(B, N, -1, D))
        return self.out(step + 1)(h[:, :, 0, :])


@torch.no_grad()
def generate_fq(model, cond, max_new_tokens, cfg_scale, temperature, top_k, top_p, sample_fn):
    """Official ``generate_fq`` + ``sample_fq`` / ``sample_tri_fq`` for k factors; ``sample_fn(logits [B, 1, V],
    temperature, top_k, top_p) -> [B, 1]`` replaces ``sample_from_logits`` (which draws with multinomial)."""
    model.training = False
    k = model.k
    x = cond.unsqueeze(-1)
    if cfg_scale[0] > 1.0:
        x = torch.cat([x, torch.ones_like(x) * model.num_classes])
    bs = x.shape[0]
    device = x.device
    if cfg_scale[0] > 1.0:
        cond_token, uncond_token = torch.split(x, bs // 2, dim=0)
    else:
        cond_token = x
    samples = [cond_token] * k
    cond_len = x.shape[1]
    max_batch_size = x.shape[0] // 2 if cfg_scale[0] > 1.0 else x.shape[0]
    max_seq_length = cond_len + max_new_tokens
    max_batch_size_cfg = max_batch_size * 2 if cfg_scale[0] >= 1.0 else max_batch_size
    dtype = model.emb(1).weight.dtype
    with torch.device(device):
        model.setup_caches(max_batch_size=max_batch_size_cfg, max_seq_length=max_seq_length, dtype=dtype)
    for n in range(max_new_tokens):
        if n == 0:
            input_pos = torch.arange(0, cond_len, device=device)
        elif n == 1:
            input_pos = torch.tensor([cond_len], device=device)
        else:
            input_pos = input_pos + 1
        h = model.generate_context(x, input_pos=input_pos, first_step=(n == 0))
        x = []
        with torch.device(device):
            model.setup_factorized_caches(max_batch_size=max_batch_size_cfg, max_seq_length=max_seq_length,
                                          dtype=dtype)
        factor_x = None
        for i in range(k):
            logits = model.decode_subtoken(h, factor_x, torch.tensor([i], device=device), step=i)
            if cfg_scale[i] > 1.0:
                cond_logits, uncond_logits = torch.split(logits, bs // 2, dim=0)
                logits = uncond_logits + (cond_logits - uncond_logits) * cfg_scale[i]
            factor_x = sample_fn(logits, temperature[i], top_k[i], top_p[i])
            samples[i] = torch.cat((samples[i], factor_x), dim=1)
            if cfg_scale[i] > 1.0:
                cfg_x = torch.concat([factor_x, factor_x])
                factor_x = [cfg_x, torch.concat([cond_token, uncond_token])]
                x.append(cfg_x)
            else:
                factor_x = (factor_x, cond_token)
                x.append(factor_x[0])
    return [s[:, cond_len:] for s in samples]
