"""from_official(): key mapping of the released FQGAN-Dual / FQGAN-Triple checkpoints, and parity of
outputs with the official model.

The official model is re-implemented below, test-only, following the module tree, the parameter
names and the forward passes of showlab/FQGAN ``tokenizer/vq_model_dual.py`` and
``vq_model_triple.py`` line by line (nn.MultiheadAttention in LND layout, bmm attention, einsum
distances, the 65536-entry ``codebook_used`` buffer, ...). The only change: the hard-coded sizes
(adapter width 512, grid 256 // down_factor, 6 adapter layers, 3 feature-head layers, feature widths)
are arguments, so that the tests run with small channel counts.
"""

import argparse
import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fqgan.runtime.checkpoint import CheckpointError, MissingFileError
from fqgan.tokenizer import FQTokenizer
from fqgan.tokenizer.config import FQGAN_DUAL_16, FQGAN_TRIPLE_16
from fqgan.tokenizer.official import (
    from_official,
    infer_official_config,
    state_dict_from_official,
    to_official_state_dict,
)

# ----------------------------------------------------------------------------------------------
# Test-only literal re-implementation of the official model.
# ----------------------------------------------------------------------------------------------


def o_nonlinearity(x):
    return x * torch.sigmoid(x)


def o_normalize(c):
    return nn.GroupNorm(num_groups=32, num_channels=c, eps=1e-6, affine=True)


class OResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.norm1 = o_normalize(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2 = o_normalize(cout)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1, 1, 0)

    def forward(self, x):
        h = self.norm1(x)
        h = o_nonlinearity(h)
        h = self.conv1(h)
        h = self.norm2(h)
        h = o_nonlinearity(h)
        h = self.dropout(h)
        h = self.conv2(h)
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class OAttnBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = o_normalize(c)
        self.q, self.k, self.v = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        q = q.reshape(b, c, h * w).permute(0, 2, 1)
        k = k.reshape(b, c, h * w)
        w_ = torch.bmm(q, k) * (int(c) ** (-0.5))
        w_ = F.softmax(w_, dim=2)
        v = v.reshape(b, c, h * w)
        w_ = w_.permute(0, 2, 1)
        h_ = torch.bmm(v, w_).reshape(b, c, h, w)
        return x + self.proj_out(h_)


class OUpsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ODownsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class OResidualAttentionBlock(nn.Module):
    def __init__(self, d, n_head, mlp_ratio=4.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, n_head)
        self.mlp_ratio = mlp_ratio
        self.ln_2 = nn.LayerNorm(d)
        w = int(d * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d, w)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(w, d))]))

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class OFactorizedAdapter(nn.Module):
    def __init__(self, width, grid, layers, heads=8):
        super().__init__()
        self.num_layers = layers
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(grid ** 2, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList([OResidualAttentionBlock(width, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)

    def forward(self, x):
        h = x.shape[-1]
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1).permute(0, 2, 1)  # b c h w -> b (h w) c
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = x.permute(1, 0, 2)
        for i in range(self.num_layers):
            x = self.transformer[i](x)
        x = x.permute(1, 0, 2)
        x = self.ln_post(x)
        return x.permute(0, 2, 1).reshape(b, c, -1, h)  # b (h w) c -> b c h w


class OFeaturePredictor(nn.Module):
    def __init__(self, input_dim, width, grid, layers, heads=8):
        super().__init__()
        self.num_layers = layers
        self.upscale = nn.Sequential(nn.Linear(input_dim, width), nn.ReLU(), nn.Linear(width, width))
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(1, width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList([OResidualAttentionBlock(width, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)

    def forward(self, x):
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1).permute(0, 2, 1)
        x = self.upscale(x)
        x = torch.cat([self.class_embedding.unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = x.permute(1, 0, 2)
        for i in range(self.num_layers):
            x = self.transformer[i](x)
        x = x.permute(1, 0, 2)
        return self.ln_post(x)


def o_entropy_loss(affinity, temperature=0.01):
    flat_affinity = affinity.reshape(-1, affinity.shape[-1])
    flat_affinity /= temperature
    probs = F.softmax(flat_affinity, dim=-1)
    log_probs = F.log_softmax(flat_affinity + 1e-5, dim=-1)
    avg_probs = torch.mean(probs, dim=0)
    avg_entropy = -torch.sum(avg_probs * torch.log(avg_probs + 1e-5))
    sample_entropy = -torch.mean(torch.sum(probs * log_probs, dim=-1))
    return sample_entropy - avg_entropy


class OVectorQuantizer(nn.Module):
    def __init__(self, n_e, e_dim, beta=0.25, entropy_loss_ratio=0.0):
        super().__init__()
        self.n_e, self.e_dim, self.beta, self.entropy_loss_ratio = n_e, e_dim, beta, entropy_loss_ratio
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
        self.embedding.weight.data = F.normalize(self.embedding.weight.data, p=2, dim=-1)
        # Official: register_buffer("codebook_used", nn.Parameter(torch.zeros(65536))). A leaf that requires
        # grad refuses the in-place updates below on CPU; on the GPU the official .to(device) turns it into
        # a non-leaf copy. A plain buffer has the same values and name.
        self.register_buffer("codebook_used", torch.zeros(65536))

    def forward(self, z):
        z = torch.einsum("b c h w -> b h w c", z).contiguous()
        z_flattened = z.view(-1, self.e_dim)
        z = F.normalize(z, p=2, dim=-1)
        z_flattened = F.normalize(z_flattened, p=2, dim=-1)
        embedding = F.normalize(self.embedding.weight, p=2, dim=-1)
        d = torch.sum(z_flattened ** 2, dim=1, keepdim=True) + torch.sum(embedding ** 2, dim=1) - 2 * \
            torch.einsum("bd,dn->bn", z_flattened, torch.einsum("n d -> d n", embedding))
        min_encoding_indices = torch.argmin(d, dim=1)
        z_q = embedding[min_encoding_indices].view(z.shape)
        vq_loss = commit_loss = entropy_loss = None
        codebook_usage = 0
        if self.training:
            cur_len = min_encoding_indices.shape[0]
            self.codebook_used[:-cur_len] = self.codebook_used[cur_len:].clone()
            self.codebook_used[-cur_len:] = min_encoding_indices
            codebook_usage = len(torch.unique(self.codebook_used)) / self.n_e
            vq_loss = torch.mean((z_q - z.detach()) ** 2)
            commit_loss = self.beta * torch.mean((z_q.detach() - z) ** 2)
            entropy_loss = self.entropy_loss_ratio * o_entropy_loss(-d)
        z_q = z + (z_q - z).detach()
        z_q = torch.einsum("b h w c -> b c h w", z_q)
        return z_q, (vq_loss, commit_loss, entropy_loss, codebook_usage), (None, None, min_encoding_indices)

    def get_codebook_entry(self, indices, shape=None, channel_first=True):
        embedding = F.normalize(self.embedding.weight, p=2, dim=-1)
        z_q = embedding[indices]
        if shape is not None:
            z_q = z_q.reshape(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2).contiguous()
        return z_q


class OEncoder(nn.Module):
    """Official Encoder; ``heads`` = [(adapter list name, suffix)] in the official attribute order."""

    def __init__(self, heads, ch, ch_mult, num_res_blocks, z_channels, grid, adapter_layers):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        in_ch_mult = (1, *ch_mult)
        self.conv_blocks = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            conv_block = nn.Module()
            res_block, attn_block = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                res_block.append(OResnetBlock(block_in, block_out))
                block_in = block_out
                if i_level == self.num_resolutions - 1:
                    attn_block.append(OAttnBlock(block_in))
            conv_block.res, conv_block.attn = res_block, attn_block
            if i_level != self.num_resolutions - 1:
                conv_block.downsample = ODownsample(block_in)
            self.conv_blocks.append(conv_block)
        self.mid = nn.ModuleList([OResnetBlock(block_in, block_in), OAttnBlock(block_in),
                                  OResnetBlock(block_in, block_in)])
        self.head_names = heads
        for adapter, _ in heads:
            setattr(self, adapter, nn.ModuleList([OFactorizedAdapter(block_in, grid, adapter_layers)]))
        for _, s in heads:
            setattr(self, f"norm_out_{s}", o_normalize(block_in))
            setattr(self, f"conv_out_{s}", nn.Conv2d(block_in, z_channels, 3, 1, 1))

    def trunk(self, x):
        h = self.conv_in(x)
        for i_level, block in enumerate(self.conv_blocks):
            for i_block in range(self.num_res_blocks):
                h = block.res[i_block](h)
                if len(block.attn) > 0:
                    h = block.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = block.downsample(h)
        for mid_block in self.mid:
            h = mid_block(h)
        return h

    def head(self, h, adapter, s):
        for blk in getattr(self, adapter):
            h = blk(h)
        h = getattr(self, f"norm_out_{s}")(h)
        h = o_nonlinearity(h)
        return getattr(self, f"conv_out_{s}")(h)


class ODecoder(nn.Module):
    def __init__(self, z_channels, ch, ch_mult, num_res_blocks):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = nn.ModuleList([OResnetBlock(block_in, block_in), OAttnBlock(block_in),
                                  OResnetBlock(block_in, block_in)])
        self.conv_blocks = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            conv_block = nn.Module()
            res_block, attn_block = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                res_block.append(OResnetBlock(block_in, block_out))
                block_in = block_out
                if i_level == self.num_resolutions - 1:
                    attn_block.append(OAttnBlock(block_in))
            conv_block.res, conv_block.attn = res_block, attn_block
            if i_level != 0:
                conv_block.upsample = OUpsample(block_in)
            self.conv_blocks.append(conv_block)
        self.norm_out = o_normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, 1, 1)

    def forward(self, z):
        h = self.conv_in(z)
        for mid_block in self.mid:
            h = mid_block(h)
        for i_level, block in enumerate(self.conv_blocks):
            for i_block in range(self.num_res_blocks + 1):
                h = block.res[i_block](h)
                if len(block.attn) > 0:
                    h = block.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = block.upsample(h)
        h = self.norm_out(h)
        h = o_nonlinearity(h)
        return self.conv_out(h)


def o_disentangle(quant_a, quant_b, ratio):
    a = F.normalize(quant_a.permute(0, 2, 3, 1).reshape(-1, quant_a.shape[1]), p=2, dim=-1)
    b = F.normalize(quant_b.permute(0, 2, 3, 1).reshape(-1, quant_b.shape[1]), p=2, dim=-1)
    return torch.mean(torch.sum(a * b, dim=1) ** 2) * ratio


class OVQModel(nn.Module):
    """VQModel of vq_model_dual.py (k=2) / vq_model_triple.py (k=3) with clip supervision and
    disentanglement on; small sizes as arguments."""

    def __init__(self, k, ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, z_channels=32, codebook_size=64,
                 embed_dim=8, image_size=64, adapter_layers=2, feat_layers=1, feat_widths=None, entropy=0.03,
                 disentangle=0.1, with_feat=True):
        super().__init__()
        self.k, self.disentanglement_ratio, self.with_feat = k, disentangle, with_feat
        grid = image_size // 2 ** (len(ch_mult) - 1)
        if k == 2:
            heads = [("semantic_head", "sem"), ("visual_head", "vis")]
            quant_order = ["sem", "vis"]
        else:
            heads = [("semantic_head_mid", "sem_mid"), ("semantic_head_high", "sem_high"), ("visual_head", "vis")]
            quant_order = ["vis", "sem_mid", "sem_high"]
        self.encoder = OEncoder(heads, ch, ch_mult, num_res_blocks, z_channels, grid, adapter_layers)
        for s in quant_order:
            setattr(self, f"quantize_{s}", OVectorQuantizer(codebook_size, embed_dim, 0.25, entropy))
            setattr(self, f"quant_conv_{s}", nn.Conv2d(z_channels, embed_dim, 1))
        self.post_quant_conv = nn.Conv2d(embed_dim * k, z_channels, 1)
        self.decoder = ODecoder(z_channels, ch, ch_mult, num_res_blocks)
        if with_feat:
            if k == 2:
                self.feat_pred_head = OFeaturePredictor(embed_dim, feat_widths[0], grid, feat_layers)
            else:
                self.mid_sem_feat_pred = OFeaturePredictor(embed_dim, feat_widths[0], grid, feat_layers)
                self.high_sem_feat_pred = OFeaturePredictor(embed_dim, feat_widths[1], grid, feat_layers)

    def _encode_heads(self, x):
        h = self.encoder.trunk(x)
        if self.k == 2:  # Encoder.forward returns (h_sem, h_vis); the semantic head runs first
            h_sem = self.encoder.head(h, "semantic_head", "sem")
            h_vis = self.encoder.head(h, "visual_head", "vis")
            return {"vis": self.quant_conv_vis(h_vis), "sem": self.quant_conv_sem(h_sem)}
        h_mid = self.encoder.head(h, "semantic_head_mid", "sem_mid")
        h_high = self.encoder.head(h, "semantic_head_high", "sem_high")
        h_vis = self.encoder.head(h, "visual_head", "vis")
        return {"vis": self.quant_conv_vis(h_vis), "sem_mid": self.quant_conv_sem_mid(h_mid),
                "sem_high": self.quant_conv_sem_high(h_high)}

    def names(self):
        return ["vis", "sem"] if self.k == 2 else ["vis", "sem_mid", "sem_high"]

    def forward(self, x):
        hs = self._encode_heads(x)
        q = {s: getattr(self, f"quantize_{s}")(hs[s]) for s in self.names()}
        quant = {s: q[s][0] for s in q}
        if self.k == 2:
            feats = [self.feat_pred_head(quant["sem"])] if self.with_feat else []
            dis = o_disentangle(quant["vis"], quant["sem"], self.disentanglement_ratio)
        else:
            feats = ([self.mid_sem_feat_pred(quant["sem_mid"]), self.high_sem_feat_pred(quant["sem_high"])]
                     if self.with_feat else [])
            r = self.disentanglement_ratio
            dis = (o_disentangle(quant["vis"], quant["sem_mid"], r) + o_disentangle(quant["vis"], quant["sem_high"], r)
                   + o_disentangle(quant["sem_mid"], quant["sem_high"], r)) / 3.0
        dec = self.decoder(self.post_quant_conv(torch.cat([quant[s] for s in self.names()], dim=1)))
        return dec, {s: q[s][1] for s in q}, dis, feats

    def encode(self, x):
        hs = self._encode_heads(x)
        return {s: getattr(self, f"quantize_{s}")(hs[s]) for s in self.names()}

    def decode_code(self, indices, shape):
        quant = [getattr(self, f"quantize_{s}").get_codebook_entry(indices[s], shape) for s in self.names()]
        return self.decoder(self.post_quant_conv(torch.cat(quant, dim=1)))


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb the 1-D parameters (norm affines, biases) too, so that a swapped mapping cannot hide
    behind identical default initialisations."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


CASES = {  # (k, ch_mult, image size)
    "dual16": (2, (1, 1, 2, 2, 4), 64),
    "dual8": (2, (1, 2, 2, 4), 32),
    "triple16": (3, (1, 1, 2, 2, 4), 64),
    "triple8": (3, (1, 2, 2, 4), 32),
}


def make_official(case: str, with_feat: bool = True, seed: int = 0) -> OVQModel:
    k, ch_mult, size = CASES[case]
    torch.manual_seed(seed)
    widths = [64] if k == 2 else [32, 64]
    return randomize_(OVQModel(k, ch_mult=ch_mult, image_size=size, feat_widths=widths, with_feat=with_feat), seed)


def official_indices(om: OVQModel, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    enc = om.encode(x)
    b = x.shape[0]
    g = enc["vis"][0].shape[-1]
    idx = {s: enc[s][2][2] for s in om.names()}
    stacked = torch.stack([idx[s].reshape(b, g, g) for s in om.names()], dim=1)
    return stacked, idx, enc["vis"][0].shape


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------


def assert_fp32_parity(ours, official32, official64, name="", slack=3.0):
    """``ours`` (fp32) is as close to the official model in float64 as the official model in fp32 is:
    max |ours - ref64| <= slack * max |official32 - ref64| + 1e-6 (fp32 tolerance measured, not guessed)."""
    ours, official32, official64 = ours.double(), official32.double(), official64.double()
    err_ours = (ours - official64).abs().max().item()
    err_official = (official32 - official64).abs().max().item()
    assert err_ours <= slack * err_official + 1e-6, (name, err_ours, err_official)


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_official_model(case):
    """Same weights: identical indices, equal reconstructions (eval, from indices and through forward),
    equal semantic features and equal quantizer loss terms (train mode), all within the official
    model's own fp32 error against its float64 run."""
    om = make_official(case).eval()
    om64 = copy.deepcopy(om).double()
    model = from_official({"model": om.state_dict()})
    k, ch_mult, size = CASES[case]
    assert model.config.num_codebooks == k and model.config.down_factor == 2 ** (len(ch_mult) - 1)
    assert model.config.image_size == size and not model.training
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1

    with torch.no_grad():
        ref_idx, idx_by_name, shape = official_indices(om, x)
        ref64_idx, idx64_by_name, _ = official_indices(om64, x.double())
        ref_rec = om.decode_code(idx_by_name, shape)
        ref64_rec = om64.decode_code(idx64_by_name, shape)
        ours_idx = model.encode(x)
        ours_rec = model.decode_indices(ours_idx)
    assert torch.equal(ref_idx, ref64_idx)  # no near-tie in this draw: the comparison below is exact
    assert torch.equal(ours_idx, ref_idx)
    assert_fp32_parity(ours_rec, ref_rec, ref64_rec, "decode_indices")

    om.train()
    om64.train()
    model.train()
    dec, emb, dis, feats = om(x)
    dec64, emb64, dis64, feats64 = om64(x.double())
    out = model(x)
    assert_fp32_parity(out.reconstruction, dec, dec64, "forward reconstruction")
    names = om.names()
    for j, field in enumerate(("codebook", "commitment", "entropy")):
        assert_fp32_parity(getattr(out.losses, field), torch.stack([emb[s][j] for s in names]),
                           torch.stack([emb64[s][j] for s in names]), field)
    assert_fp32_parity(out.losses.disentangle, dis, dis64, "disentangle")
    assert len(out.semantic_features) == len(feats) == k - 1
    for ours, theirs, theirs64 in zip(out.semantic_features, feats, feats64):
        assert_fp32_parity(ours, theirs[:, 0], theirs64[:, 0], "semantic features")


def test_gradients_match_official():
    """Train-mode gradients of reconstruction + all quantizer terms + feature predictor reach the same
    parameters with the same values (mapped back to the official names), within the official model's
    own fp32 error against its float64 run."""
    om = make_official("dual16").train()
    om64 = copy.deepcopy(om).double()
    model = from_official(om.state_dict()).train()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    for m, inp in ((om, x), (om64, x.double())):
        dec, emb, dis, feats = m(inp)
        ref = dec.square().mean() + sum(sum(emb[s][:3]) for s in emb) + dis + feats[0][:, 0].square().mean()
        ref.backward()
    out = model(x)
    (out.reconstruction.square().mean() + out.quantizer_loss + out.semantic_features[0].square().mean()).backward()
    grads = to_official_state_dict_grads(model, dict(model.named_parameters()))
    grads64 = {n: p.grad for n, p in om64.named_parameters()}
    for name, p in om.named_parameters():
        assert p.grad is not None and grads64[name] is not None, name
        # slack 10: the entropy loss (T = 0.01) amplifies rounding in z, so the official model's own fp32
        # gradient error is itself erratic: 5e-7 .. 1e-5 on quant_conv_vis.weight (scale 6e-2) when the
        # input moves by 1e-7 (measured). A mapping or formula error would be of the gradient's own scale.
        assert_fp32_parity(grads[name], p.grad, grads64[name], name, slack=10.0)


def to_official_state_dict_grads(model, named):
    """Our gradients under the official names (codebook grads split per sub-codebook)."""
    saved = {n: p.data for n, p in named.items()}
    try:
        for p in named.values():
            p.data = p.grad if p.grad is not None else torch.zeros_like(p)
        return to_official_state_dict(model)
    finally:
        for n, p in named.items():
            p.data = saved[n]


@pytest.mark.parametrize("case", ["dual16", "triple8"])
def test_official_state_dict_round_trip(case):
    om = make_official(case)
    model = from_official(om.state_dict())
    back = to_official_state_dict(model)
    ref = {k: v for k, v in om.state_dict().items() if not k.endswith("codebook_used")}
    assert set(back) == set(ref)
    for key in ref:
        assert torch.equal(back[key], ref[key]), key


def test_checkpoint_files_and_entries(tmp_path):
    om = make_official("dual8")
    sd = om.state_dict()
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in sd.items()}
    ckpt = {"model": sd, "ema": ema, "steps": 7, "args": argparse.Namespace(vq_model="VQ-8", lr=1e-4)}
    path = tmp_path / "0000007.pt"
    torch.save(ckpt, path)
    auto = from_official(path)
    assert torch.equal(auto.quantizer.codebooks[0], ema["quantize_vis.embedding.weight"])  # EMA first
    plain = from_official(path, weights="model")
    assert torch.equal(plain.quantizer.codebooks[1], sd["quantize_sem.embedding.weight"])
    # DDP / compile prefixes and a bare state dict.
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "bare.pt")
    bare = from_official(tmp_path / "bare.pt")
    assert torch.equal(bare.post_quant_conv.weight, sd["post_quant_conv.weight"])
    with pytest.raises(CheckpointError, match="no 'state_dict' entry"):
        from_official(path, weights="state_dict")


def test_without_feature_heads_and_with_config():
    om = make_official("triple16", with_feat=False)
    model = from_official(om.state_dict())
    assert model.config.feat_pred_dims == (0, 0, 0) and len(model.feature_predictors) == 0
    config = infer_official_config(state_dict_from_official(om.state_dict())[0])
    assert config == model.config
    # A config asking for feature predictors that the checkpoint lacks: the missing keys are listed.
    with pytest.raises(CheckpointError, match=r"missing keys \(\d+\): \['mid_sem_feat_pred\."):
        from_official(om.state_dict(), config.replace(feat_pred_dims=(0, 32, 64)))


def test_presets_match_official_names():
    """The real presets' key sets equal the official ones (no weights: shapes on the meta device)."""
    for preset, k in ((FQGAN_DUAL_16, 2), (FQGAN_TRIPLE_16, 3)):
        with torch.device("meta"):
            model = FQTokenizer(preset.replace(quantizer_backend="reference"))
        names = set(to_official_state_dict(model))
        if k == 2:
            assert {"quantize_vis.embedding.weight", "quantize_sem.embedding.weight",
                    "encoder.semantic_head.0.transformer.5.attn.in_proj_weight",
                    "feat_pred_head.transformer.2.mlp.c_proj.weight", "quant_conv_sem.weight"} <= names
            assert model.state_dict()["feature_predictors.1.class_embedding"].shape == (1, 1024)
        else:
            assert {"quantize_sem_mid.embedding.weight", "mid_sem_feat_pred.class_embedding",
                    "high_sem_feat_pred.class_embedding", "encoder.conv_out_sem_high.weight"} <= names
        assert model.state_dict()["branches.0.adapter.positional_embedding"].shape == (256, 512)
        assert model.state_dict()["quantizer.codebooks"].shape == (k, 16384, 8)


# -- bad input ---------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(MissingFileError, match="no such file"):
        from_official(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError
        from_official(tmp_path / "nope.pt")


def test_wrong_k(tmp_path):
    om = make_official("dual16")
    config = infer_official_config(state_dict_from_official(
        make_official("triple16").state_dict())[0])
    with pytest.raises(CheckpointError, match=r"FQGAN-Dual checkpoint \(k=2.*num_codebooks=3"):
        from_official(om.state_dict(), config)


def test_truncated_and_corrupted_files(tmp_path):
    om = make_official("dual8")
    path = tmp_path / "ckpt.pt"
    torch.save({"model": om.state_dict()}, path)
    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt is not a readable PyTorch file"):
        from_official(tmp_path / "truncated.pt")
    corrupted = bytearray(data)
    for i in range(0, len(corrupted), 97):
        corrupted[i] ^= 0xFF
    (tmp_path / "corrupted.pt").write_bytes(bytes(corrupted))
    with pytest.raises(CheckpointError, match="corrupted.pt is not a readable PyTorch file"):
        from_official(tmp_path / "corrupted.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="expected a dict, got Tensor"):
        from_official(tmp_path / "tensor.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch file"):
        from_official(tmp_path / "text.pt")


def test_missing_unexpected_and_misshapen_keys():
    sd = dict(make_official("dual16").state_dict())
    sd.pop("decoder.conv_out.weight")
    sd.pop("encoder.semantic_head.0.ln_pre.bias")
    sd["encoder.extra_head.weight"] = torch.zeros(3)
    config = infer_official_config(state_dict_from_official(
        make_official("dual16").state_dict())[0])
    with pytest.raises(CheckpointError) as err:
        from_official(sd, config)
    msg = str(err.value)
    assert "missing keys (2)" in msg and "decoder.conv_out.weight" in msg
    assert "encoder.semantic_head.0.ln_pre.bias" in msg
    assert "unexpected keys (1): ['encoder.extra_head.weight']" in msg
    sd = dict(make_official("dual16").state_dict())
    sd["post_quant_conv.weight"] = torch.zeros(32, 24, 1, 1)
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): \['post_quant_conv.weight: checkpoint"):
        from_official(sd, config)
    with pytest.raises(CheckpointError, match="not an FQGAN-Dual or FQGAN-Triple"):
        from_official({"model": {"conv.weight": torch.zeros(1)}})
    with pytest.raises(CheckpointError, match=r"entries that are not tensors: \['a'\]"):
        from_official({"model": {"a": 1}})
    with pytest.raises(TypeError, match="source must be a checkpoint path or a"):
        from_official(torch.zeros(3))


class _Custom:  # a class torch's weights_only unpickler refuses
    pass


def test_load_torch_file_reasons(tmp_path):
    """A broken file says so, with the unpickler's reason and without torch's advice for trusted files;
    a well-formed file with pickled classes points to trusted=True."""
    from fqgan.runtime.checkpoint import load_torch_file

    (tmp_path / "junk.pt").write_bytes(b"\x80\x02" + bytes(range(7, 250)))
    with pytest.raises(CheckpointError, match=r"junk.pt is not a readable PyTorch file.*: Unsupported") as info:
        load_torch_file(tmp_path / "junk.pt", "teacher")
    assert "weights_only" not in str(info.value) and "file an issue" not in str(info.value)
    assert "trusted=True" not in str(info.value)
    torch.save({"w": torch.ones(2), "extra": _Custom()}, tmp_path / "custom.pt")
    with pytest.raises(CheckpointError, match=r"custom.pt holds Python objects.*trusted=True.*Unsupported global"):
        load_torch_file(tmp_path / "custom.pt", "teacher")
    assert isinstance(load_torch_file(tmp_path / "custom.pt", "teacher", trusted=True)["extra"], _Custom)
    with pytest.raises(MissingFileError, match="teacher: no such file"):
        load_torch_file(tmp_path / "missing.pt", "teacher")
