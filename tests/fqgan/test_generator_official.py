"""FAR vs the official model: key mapping (from_official), loss / per-head logits / gradient parity,
dropout placement, the official sampling loop, and the RoPE details that are easy to get wrong.

The official model here is ``far_official_ref`` (a test-only re-write with the official module tree and key
names, see its docstring); the package never imports it.
"""

import argparse

import far_official_ref as off
import pytest
import torch
from tolerances import TOLERANCES

import fqgan_kernels as fk
from fqgan.generator import FAR, PRESETS, FARConfig, generate
from fqgan.generator.model import rope_table_2d
from fqgan.generator.official import config_from_official, from_official, to_official_state_dict

RTOL, ATOL = TOLERANCES[torch.float32]
NO_DROPOUT = dict(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
# FAR-B / FAR-L shrunk: their layer ratios and AR-head depth, width 64 / 80 (head_dim 16), small V.
SHAPES = {
    "B-like": dict(dim=64, n_head=4, n_layer=3, ar_n_layer=3, block_size=16),
    "L-like": dict(dim=80, n_head=5, n_layer=4, ar_n_layer=4, block_size=64),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                base = 1.0 if name.endswith("norm.weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return module


def official(k: int, shape: str, V: int = 41, C: int = 9, **kw) -> off.Transformer:
    args = dict(SHAPES[shape], num_factors=k, vocab_size=V, num_classes=C, **NO_DROPOUT)
    args.update(kw)
    return randomize(off.Transformer(off.ModelArgs(**args)))


def load(ref: off.Transformer, **kw) -> FAR:
    a = ref.config
    overrides = dict(token_dropout_p=a.token_dropout_p, resid_dropout_p=a.resid_dropout_p,
                     ffn_dropout_p=a.ffn_dropout_p, attn_dropout_p=a.attn_dropout_p, drop_path_rate=a.drop_path_rate)
    overrides.update(kw)
    return from_official(ref.state_dict(), n_head=a.n_head, block_size=a.block_size, **overrides)


def codes(ref: off.Transformer, B: int = 3, seed: int = 2):
    a = ref.config
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, a.vocab_size, (B, a.num_factors, a.block_size), generator=g),
            torch.randint(0, a.num_classes, (B,), generator=g))


def official_forward(ref, idx, labels, seed=0):
    torch.manual_seed(seed)
    rows = list(idx.unbind(1))
    return ref(rows, labels, targets=rows)  # (k logits [B, T, V], loss)


# ---------------------------------------------------------------------------------------------
# parity: loss, per-head logits, gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_loss_and_logits_equal_official(k, shape):
    ref = official(k, shape).train()  # official forward only works in train mode (see far_official_ref)
    model = load(ref).train()  # class_dropout_prob 0.1: both draw the dropped labels from the same seed
    idx, labels = codes(ref, B=4)
    logits_ref, loss_ref = official_forward(ref, idx, labels, seed=3)
    torch.manual_seed(3)
    out = model(idx, labels)
    torch.manual_seed(3)
    logits = model.logits(idx, labels)  # [B, k, T, V]
    for j in range(k):
        torch.testing.assert_close(logits[:, j], logits_ref[j], rtol=RTOL, atol=10 * ATOL)
    torch.testing.assert_close(out.loss, loss_ref, rtol=RTOL, atol=ATOL)
    torch.manual_seed(3)
    torch.testing.assert_close(model(idx, labels, backend="reference").loss, loss_ref, rtol=RTOL, atol=ATOL)
    # Eval mode with the labels the seed dropped forced to the null class gives the same numbers.
    torch.manual_seed(3)
    drop = torch.rand(4) < 0.1
    torch.testing.assert_close(model.eval()(idx, labels, drop_labels=drop).loss, loss_ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("k", [2, 3])
def test_gradients_equal_official(k):
    ref = official(k, "B-like").train()
    model = load(ref).train()
    idx, labels = codes(ref)
    official_forward(ref, idx, labels, seed=4)[1].backward()
    torch.manual_seed(4)
    model(idx, labels).loss.backward()
    grads = to_official_state_dict_grads(model)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def to_official_state_dict_grads(model: FAR) -> dict:
    holder = FAR(model.config)
    with torch.no_grad():
        for p, q in zip(holder.parameters(), model.parameters()):
            p.copy_(q.grad)
    return to_official_state_dict(holder)


def test_dropout_placement_equals_official():
    """Label, token, attention, residual, FFN dropout and drop-path draw the same masks in the same order."""
    drops = dict(token_dropout_p=0.1, resid_dropout_p=0.1, ffn_dropout_p=0.1, attn_dropout_p=0.1,
                 drop_path_rate=0.2, class_dropout_prob=0.3)
    ref = official(3, "B-like", **drops).train()
    model = from_official(ref.state_dict(), n_head=4, block_size=16, **drops).train()
    idx, labels = codes(ref, B=6)
    for seed in (0, 1):
        loss_ref = official_forward(ref, idx, labels, seed=seed)[1]
        torch.manual_seed(seed)
        torch.testing.assert_close(model(idx, labels).loss, loss_ref, rtol=RTOL, atol=ATOL)
    torch.manual_seed(0)
    assert model(idx, labels).loss != model(idx, labels).loss  # the dropouts are live


# ---------------------------------------------------------------------------------------------
# parity: the official sampling loop (full-length caches + masks, per-factor CFG)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,cfg,temp,top_k,top_p", [
    (2, [3.0, 2.0], [1.0, 0.8], [0, 7], [1.0, 0.9]),
    (3, [1.5, 4.0, 2.0], [1.2, 1.0, 0.9], [5, 0, 0], [1.0, 1.0, 0.8]),
    (2, [1.0, 1.0], [1.0, 1.0], [0, 0], [1.0, 1.0]),  # no guidance
])
def test_generation_equals_official_loop(k, cfg, temp, top_k, top_p):
    ref = official(k, "B-like", V=29).eval()
    model = load(ref)
    labels = torch.tensor([0, 8, 5])
    g = torch.Generator().manual_seed(9)

    def sample_fn(logits, temperature, tk, tp):  # official sample_from_logits, inverse-CDF draw
        u = torch.rand(logits.shape[0], generator=g, dtype=torch.float64)
        return fk.reference.sample(logits[:, -1, :], None, 1.0, temperature, tk, tp, uniform=u).unsqueeze(1)

    # The official loop sizes its caches for 2B rows whenever cfg >= 1 and so cannot run cfg = 1 with B > 1;
    # it treats any cfg <= 1 as "no guidance", which is this package's cfg = 1.
    ref_cfg = [0.5 if s == 1.0 else s for s in cfg]
    want = off.generate_fq(ref, labels, ref.block_size, ref_cfg, temp, top_k, top_p, sample_fn)
    got = generate(model, labels, cfg_scale=cfg, temperature=temp, top_k=top_k, top_p=top_p, seed=9,
                   backend="reference")
    for j in range(k):
        assert torch.equal(got[:, j], want[j]), j


# ---------------------------------------------------------------------------------------------
# RoPE details
# ---------------------------------------------------------------------------------------------
def test_rope_table_layout():
    G, hd = 4, 16
    table = rope_table_2d(G, hd, 10000.0)  # [1 + G*G, hd/2, 2]
    torch.testing.assert_close(table, off.precompute_freqs_cis_2d(G, hd, 10000, 1), rtol=0, atol=0)
    assert table.shape == (17, 8, 2)
    assert (table[0] == 0).all()  # class token: q, k multiplied by zero, not rotated by the identity
    torch.testing.assert_close(table[1], torch.stack([torch.ones(8), torch.zeros(8)], -1))  # cell (0, 0)
    inv = 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8)
    r, c = 2, 3
    angle = torch.cat([r * inv, c * inv])  # first half of the pairs: row, second half: column
    torch.testing.assert_close(table[1 + r * G + c], torch.stack([angle.cos(), angle.sin()], -1))


def test_class_token_and_slot_zero_have_zero_queries_and_keys():
    """Pin the official quirk: changing the class token's rotation row from zeros to the identity changes
    every output (so the parity tests above would catch an implementation that rotates it normally)."""
    ref = official(2, "B-like").train()
    model = load(ref).eval()
    idx, labels = codes(ref)
    base = model.logits(idx, labels)
    model._rope = model._rope.clone()
    model._rope[0, :, 0] = 1.0  # identity rotation for the class token and AR-head slot 0
    assert (model.logits(idx, labels) - base).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# from_official: checkpoint files, prefixes, EMA, ignored state, errors
# ---------------------------------------------------------------------------------------------
def test_checkpoint_file_prefixes_and_ema(tmp_path):
    ref = official(3, "B-like").train()
    sd = ref.state_dict()
    idx, labels = codes(ref)
    expected = load(ref).logits(idx, labels)
    ema = {key: value * 0.5 for key, value in sd.items()}
    path = tmp_path / "0100000.pt"
    torch.save({"model": {"module._orig_mod." + key: v for key, v in sd.items()}, "ema": ema,
                "optimizer": {"state": {}, "param_groups": []}, "steps": 100000,
                "args": argparse.Namespace(gpt_model="FAR-B", vocab_size=41)}, path)
    model = from_official(path, n_head=4, block_size=16, num_factors=3, **NO_DROPOUT)
    assert not model.training and model.config.num_factors == 3
    torch.testing.assert_close(model.logits(idx, labels), expected, rtol=0, atol=0)
    ema_model = from_official(str(path), n_head=4, block_size=16, use_ema=True)
    torch.testing.assert_close(ema_model.head[1], sd["output_2.weight"] * 0.5, rtol=0, atol=0)
    # State dicts taken after the official setup_caches carry KV-cache buffers: ignored.
    ref.setup_caches(2, 17, torch.float32)
    ref.setup_factorized_caches(2, 17, torch.float32)
    assert any("kv_cache" in key for key in ref.state_dict())
    torch.testing.assert_close(load(ref).logits(idx, labels), expected, rtol=0, atol=0)
    # Round trip: our weights under the official names are the official state dict.
    back = to_official_state_dict(model)
    assert sorted(back) == sorted(sd)
    for key in sd:
        torch.testing.assert_close(back[key], sd[key], rtol=0, atol=0)


@pytest.mark.parametrize("name,k", [("FAR-B", 2), ("FAR-B", 3), ("FAR-L", 2), ("FAR-L", 3)])
def test_released_sizes_map_one_to_one(name, k):
    """Full FAR-B / FAR-L (dual and triple) on the meta device: every official key has its counterpart with
    the same shape, and the config inferred from the official shapes is the preset."""
    p = PRESETS[name]
    with torch.device("meta"):
        ref = off.Transformer(off.ModelArgs(dim=p.dim, n_layer=p.n_layer, n_head=p.n_head, ar_n_layer=p.ar_n_layer,
                                            num_factors=k))
        mine = FAR(FARConfig.from_preset(name, num_factors=k))
    sd = ref.state_dict()
    assert config_from_official(sd) == FARConfig.from_preset(name, num_factors=k)
    ours = to_official_state_dict(mine)
    assert sorted(ours) == sorted(sd)
    assert all(ours[key].shape == sd[key].shape for key in sd)
    n_params = sum(v.numel() for v in sd.values())
    assert n_params == sum(q.numel() for q in mine.parameters())


def test_from_official_errors(tmp_path):
    ref = official(3, "B-like")
    sd = dict(ref.state_dict())
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        from_official(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match=r"k = 3 FAR .* num_factors = 2"):
        from_official(sd, n_head=4, block_size=16, num_factors=2)
    with pytest.raises(ValueError, match="cannot infer n_head"):
        from_official(sd, block_size=16)
    with pytest.raises(ValueError, match="missing keys: \\['ar_head.1.ffn_norm.weight'\\]"):
        from_official({key: v for key, v in sd.items() if key != "ar_head.1.ffn_norm.weight"}, n_head=4,
                      block_size=16)
    with pytest.raises(ValueError, match="unexpected keys: \\['output_1.bias'\\]"):
        from_official({**sd, "output_1.bias": torch.zeros(41)}, n_head=4, block_size=16)
    with pytest.raises(ValueError, match="aggregation_layer.weight: checkpoint"):
        from_official({**sd, "aggregation_layer.weight": torch.zeros(64, 128)}, n_head=4, block_size=16)
    with pytest.raises(ValueError, match="3 input embeddings .* 2 output heads"):
        from_official({key: v for key, v in sd.items() if key != "output_3.weight"}, n_head=4, block_size=16)
    with pytest.raises(ValueError, match="text-conditional"):
        from_official({"cls_embedding.cap_proj.fc1.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="not a FAR checkpoint"):
        from_official({"encoder.conv_in.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="no 'ema' entry"):
        from_official({"model": sd}, n_head=4, block_size=16, use_ema=True)
    with pytest.raises(ValueError, match="not a tensor"):
        from_official({**sd, "steps": 5}, n_head=4, block_size=16)
    with pytest.raises(ValueError, match="square"):
        from_official(sd, n_head=4, block_size=15)
    with pytest.raises(TypeError, match="path or a state dict"):
        from_official(42)


@pytest.mark.parametrize("weights,has_ema,expect", [("auto", True, True), ("auto", False, False),
                                                    ("model", True, False), ("ema", True, True)])
def test_load_generator_weights_auto_means_ema_when_present(tmp_path, monkeypatch, weights, has_ema, expect):
    import fqgan.generator.load as loader

    seen = []
    far = load(official(2, "B-like"))
    monkeypatch.setattr(loader, "from_official", lambda ckpt, use_ema: seen.append(use_ema) or far)
    ckpt = {"model": {"tok_embeddings_1.weight": torch.zeros(1)}, **({"ema": {}} if has_ema else {})}
    torch.save(ckpt, tmp_path / "far.pt")
    loader.load_generator(tmp_path / "far.pt", weights)
    assert seen == [expect]
