"""FAR model and generation: shapes, fused vs reference loss, causality, KV cache, CFG, determinism, fast sampling
(static cache, torch.compile, bf16, per-row draws), bad input."""


import sys

import pytest
import torch
import torch.nn.functional as F
from test_sample import MAX_NEAR_BOUNDARY, near_boundary
from tolerances import TOLERANCES

import fqgan_kernels as fk
from fqgan.generator import FAR, PRESETS, FARConfig, generate
from fqgan.generator.generate import attention_length

RTOL, ATOL = TOLERANCES[torch.float32]


pytestmark = pytest.mark.usefixtures("one_thread")


def small_config(**kw) -> FARConfig:
    args = dict(num_factors=2, vocab_size=37, block_size=16, num_classes=7, dim=32, n_layer=2, n_head=2,
                ar_n_layer=2, multiple_of=16)
    args.update(kw)
    return FARConfig(**args)


def randomize(model: FAR, seed: int = 1) -> FAR:
    """Random weights at a scale where every layer matters (the official init zeroes the heads)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if name.endswith("norm.weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def make(seed: int = 1, **kw) -> FAR:
    return randomize(FAR(small_config(**kw)), seed).eval()


def inputs(model: FAR, B: int = 3, T: int | None = None, seed: int = 2):
    c = model.config
    g = torch.Generator().manual_seed(seed)
    T = c.block_size if T is None else T
    return (torch.randint(0, c.vocab_size, (B, c.num_factors, T), generator=g),
            torch.randint(0, c.num_classes, (B,), generator=g))


def close(a, b, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# shapes and presets
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset,k,V", [("FAR-tiny", 2, 16384), ("FAR-tiny", 3, 512), ("FAR-B", 2, 16384),
                                        ("FAR-L", 3, 1024)])
def test_preset_forward_shapes(preset, k, V):
    # Real width and heads of each preset; one trunk and one head layer keep it fast.
    cfg = FARConfig.from_preset(preset, num_factors=k, vocab_size=V, n_layer=1, ar_n_layer=1)
    model = FAR(cfg).eval()
    idx, lab = inputs(model, B=2, T=5)
    h = model.hidden(idx, lab)
    assert h.shape == (2, 5, k, cfg.dim)
    out = model(idx, lab)
    assert out.loss.shape == () and out.per_head.shape == (k,)
    # Official init zeroes the heads: uniform logits, loss = log V per head.
    close(out.per_head, torch.full((k,), float(torch.log(torch.tensor(float(cfg.vocab_size))))))
    assert model.head.shape == (k, cfg.vocab_size, cfg.dim) and model.tok_embed.shape == (k, cfg.vocab_size, cfg.dim)


def test_preset_sizes():
    assert (PRESETS["FAR-B"].dim, PRESETS["FAR-B"].n_layer, PRESETS["FAR-B"].n_head, PRESETS["FAR-B"].ar_n_layer) \
        == (1024, 24, 16, 3)
    assert (PRESETS["FAR-L"].dim, PRESETS["FAR-L"].n_layer, PRESETS["FAR-L"].n_head, PRESETS["FAR-L"].ar_n_layer) \
        == (1280, 36, 20, 4)
    assert PRESETS["FAR-B"].hidden_dim == 2816 and PRESETS["FAR-L"].hidden_dim == 3584  # official SwiGLU sizes
    with torch.device("meta"):
        tiny = FAR(PRESETS["FAR-tiny"])
    n = sum(p.numel() for p in tiny.parameters()) - tiny.tok_embed.numel() - tiny.head.numel()
    assert n < 2e6, n  # the transformer part; trains on CPU in minutes


# ---------------------------------------------------------------------------------------------
# loss: fused heads vs reference heads, logits
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,V,T,B", [(2, 37, 16, 3), (3, 50, 9, 1), (1, 13, 4, 2), (2, 16384, 4, 2)])
def test_loss_and_grads_fused_equal_reference(k, V, T, B):
    model = make(num_factors=k, vocab_size=V, block_size=16 if T > 9 else 9 if T == 9 else 4)
    idx, lab = inputs(model, B=B, T=T)
    outs, grads = [], []
    for reference in (False, True):
        model.zero_grad()
        out = model(idx, lab, backend="reference" if reference else None)
        out.loss.backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    close(outs[0].loss, outs[1].loss)
    close(outs[0].per_head, outs[1].per_head)
    for name in grads[1]:
        close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)
    assert grads[0]["head"].abs().sum() > 0 and grads[0]["layers.0.attention.wqkv.weight"].abs().sum() > 0


def test_logits_cross_entropy_is_the_loss():
    model = make(num_factors=3)
    idx, lab = inputs(model)
    logits = model.logits(idx, lab)  # [B, k, T, V]
    assert logits.shape == (3, 3, 16, 37) and logits.dtype == torch.float32
    per_head = torch.stack([F.cross_entropy(logits[:, j].reshape(-1, 37), idx[:, j].reshape(-1)) for j in range(3)])
    out = model(idx, lab)
    close(out.per_head, per_head)
    close(out.loss, per_head.mean())


def test_loss_bfloat16_model():
    model = make()
    idx, lab = inputs(model)
    ref = model(idx, lab).loss
    low = model.to(torch.bfloat16)(idx, lab)
    assert low.loss.dtype == torch.float32
    rtol, atol = TOLERANCES[torch.bfloat16]
    close(low.loss, ref, rtol=2 * rtol, atol=2 * atol)


def test_loss_under_autocast():
    model = make()
    idx, lab = inputs(model)
    ref = model(idx, lab)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model.hidden(idx, lab)
        hidden, weight = model._head_operands(h)
        low = model(idx, lab)
    assert hidden.dtype == weight.dtype == torch.bfloat16  # the heads run in the autocast dtype, as F.linear
    assert low.loss.dtype == torch.float32
    rtol, atol = TOLERANCES[torch.bfloat16]
    close(low.per_head, ref.per_head, rtol=2 * rtol, atol=2 * atol)
    low.loss.backward()
    assert model.head.grad.dtype == torch.float32 and torch.isfinite(model.head.grad).all()


# ---------------------------------------------------------------------------------------------
# causality
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3])
def test_causal_positions_and_slots(k):
    model = make(num_factors=k)
    idx, lab = inputs(model)
    base = model.logits(idx, lab)  # [B, k, T, V]
    V = model.config.vocab_size
    for t in (0, 7, 15):
        for j in range(k):
            changed = idx.clone()
            changed[:, j, t] = (changed[:, j, t] + 1 + torch.arange(3)) % V
            new = model.logits(changed, lab)
            # Positions before t, and heads 0..j at position t (they see sub-tokens < j only), are unchanged.
            close(new[:, :, :t], base[:, :, :t], rtol=0, atol=0)
            close(new[:, : j + 1, t], base[:, : j + 1, t], rtol=0, atol=0)
            # ...and the change is seen: by head j+1 at t, else by the next position.
            if j + 1 < k:
                assert (new[:, j + 1, t] - base[:, j + 1, t]).abs().max() > 1e-4
            if t + 1 < 16:
                assert (new[:, :, t + 1] - base[:, :, t + 1]).abs().max() > 1e-4


def test_class_label_changes_every_position():
    model = make()
    idx, lab = inputs(model)
    a = model.logits(idx, lab)
    b = model.logits(idx, (lab + 1) % 7)
    assert ((a - b).abs().amax(dim=(1, 3)) > 1e-4).all()


# ---------------------------------------------------------------------------------------------
# KV cache: step-by-step decoding equals the full-sequence forward
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,n_kv_head", [(2, None), (3, 1)])
def test_kv_cache_decode_equals_full_forward(k, n_kv_head):
    model = make(num_factors=k, n_kv_head=n_kv_head)
    idx, lab = inputs(model)
    B, _, T = idx.shape
    with torch.no_grad():
        full = model.hidden(idx, lab)  # [B, T, k, D]
        cache = model.new_cache(B, "cpu")
        x = model.class_input(lab)
        for t in range(T):
            slot_in = model.decode_trunk(x, t, cache)
            for j in range(k):
                close(model.decode_slot(slot_in, j, cache), full[:, t, j], rtol=1e-5, atol=1e-5)
                if j + 1 < k:
                    slot_in = model.slot_input(idx[:, j, t], j)
            x = model.token_input(idx[:, :, t])
        # A multi-position prefill through the cache matches too.
        cache = model.new_cache(B, "cpu")
        first = model.decode_trunk(model.class_input(lab), 0, cache)
        rest = torch.cat([model.token_input(idx[:, :, t]) for t in range(T - 1)], dim=1)
        prefill = model.decode_trunk(rest, 1, cache)
        ref = model.hidden(idx, lab)
        slot0 = torch.cat([first, prefill], dim=1)  # trunk states; head slot 0 of each position
        cache2 = model.new_cache(B * T, "cpu")
        close(model.decode_slot(slot0.reshape(B * T, 1, -1), 0, cache2).view(B, T, -1), ref[:, :, 0],
              rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# generation: the cached loop equals a naive recompute with the per-factor CFG formula
# ---------------------------------------------------------------------------------------------
def naive_generate(model, labels, cfg, temp, top_k, top_p, seed):
    """Recompute the whole prefix for every draw (model.logits), guidance written out per factor."""
    c = model.config
    B, k, T = labels.shape[0], c.num_factors, c.block_size
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(B, k, T, dtype=torch.long)
    null = torch.ones(B, dtype=torch.bool)
    with torch.no_grad():
        for t in range(T):
            for j in range(k):
                cond = model.logits(out, labels)[:, j, t]
                uncond = model.logits(out, labels, drop_labels=null)[:, j, t]
                guided = uncond + cfg[j] * (cond - uncond) if cfg[j] > 1 else cond
                u = torch.rand(B, generator=g, dtype=torch.float64)
                out[:, j, t] = fk.reference.sample(guided, None, 1.0, temp[j], top_k[j], top_p[j], uniform=u)
    return out


@pytest.mark.parametrize("k,cfg,temp,top_k,top_p", [
    (2, [3.0, 1.5], [1.0, 0.7], [0, 5], [1.0, 0.9]),
    (2, [2.0, 1.0], [1.3, 1.0], [10, 0], [0.8, 1.0]),   # factor 2 unguided in a guided batch
    (3, [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0, 0, 0], [1.0, 1.0, 1.0]),  # no guidance at all
    (3, [4.0, 2.5, 1.5], [0.9, 1.0, 1.1], [0, 3, 0], [0.95, 1.0, 0.7]),
])
@pytest.mark.parametrize("reference", [True, False])
def test_generate_equals_naive_recompute(k, cfg, temp, top_k, top_p, reference):
    model = make(num_factors=k, vocab_size=23, block_size=9)
    labels = torch.tensor([0, 6, 3])
    want = naive_generate(model, labels, cfg, temp, top_k, top_p, seed=5)
    got = generate(model, labels, cfg_scale=cfg, temperature=temp, top_k=top_k, top_p=top_p, seed=5,
                   backend="reference" if reference else None)
    assert got.shape == (3, k, 9) and got.dtype == torch.long
    assert torch.equal(got, want)


def test_generate_per_row_tensor_parameters():
    model = make(vocab_size=23, block_size=4)
    labels = torch.tensor([1, 2, 3])
    kw = dict(cfg_scale=[torch.tensor([1.0, 2.0, 3.0]), 1.5], temperature=torch.tensor([0.5, 1.0, 2.0]),
              top_k=[torch.tensor([0, 2, 5]), 0], top_p=[1.0, torch.tensor([0.5, 1.0, 0.9])], seed=3)
    fused = generate(model, labels, **kw)
    assert torch.equal(fused, generate(model, labels, backend="reference", **kw))
    # A per-row tensor of equal values is the same as the number.
    same = dict(kw, cfg_scale=[torch.full((3,), 2.0), 1.5], temperature=torch.ones(3), top_k=[torch.zeros(3).long(), 0],
                top_p=1.0)
    assert torch.equal(generate(model, labels, **same), generate(model, labels, cfg_scale=[2.0, 1.5], seed=3))


def test_generate_deterministic_and_seeded():
    model = make(vocab_size=23, block_size=9)
    labels = torch.tensor([4, 4, 1, 0, 2])
    a = generate(model, labels, cfg_scale=2.0, seed=11)
    assert torch.equal(a, generate(model, labels, cfg_scale=2.0, seed=11))
    assert not torch.equal(a, generate(model, labels, cfg_scale=2.0, seed=12))
    assert torch.equal(a, generate(model, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(11)))
    torch.manual_seed(7)
    b = generate(model, labels)
    torch.manual_seed(7)
    assert torch.equal(b, generate(model, labels))
    # Rows differ (sampled, not copied) and codes are in range.
    assert a.min() >= 0 and a.max() < 23 and not torch.equal(a[0], a[1])


def test_generate_restores_mode_and_ignores_dropout():
    model = make(vocab_size=23, block_size=4, token_dropout_p=0.5, resid_dropout_p=0.5, ffn_dropout_p=0.5)
    labels = torch.tensor([1, 2])
    eval_out = generate(model, labels, seed=0)
    model.train()
    assert torch.equal(generate(model, labels, seed=0), eval_out)
    assert model.training


def test_greedy_follows_argmax():
    model = make(vocab_size=23, block_size=4)
    labels = torch.tensor([3])
    out = generate(model, labels, top_k=1, seed=0)
    logits = model.logits(out, labels)
    assert torch.equal(logits.argmax(-1), out)


# ---------------------------------------------------------------------------------------------
# fast sampling: static caches, one compiled graph per attention length, bf16, per-row draws
# ---------------------------------------------------------------------------------------------
def assert_same_codes(got, want, model, labels, uniform, cfg, temp, top_k, top_p, what=""):
    """Equal codes, except rows whose first differing draw sits within float rounding of a threshold of the
    sampler (tests/test_sample.py's near_boundary on the logits of the common prefix); such rows must be rare.
    ``uniform`` [B, k, T]: the draws; cfg, temp, top_k, top_p: one value per factor."""
    if torch.equal(got, want):
        return
    B, k, _ = want.shape
    bad = []
    for b in range(B):
        diff = (got[b] != want[b]).t().flatten()  # draw order: position, then factor
        if not diff.any():
            continue
        t, i = divmod(int(diff.nonzero()[0, 0]), k)
        prefix, lab = want[b:b + 1], labels[b:b + 1]
        cond = model.logits(prefix, lab)[:, i, t]
        uncond = model.logits(prefix, lab, drop_labels=torch.ones(1, dtype=torch.bool))[:, i, t] if cfg[i] > 1 \
            else None
        assert near_boundary(cond, uncond, cfg[i], temp[i], top_k[i], top_p[i], uniform[b:b + 1, i, t]).all(), \
            f"{what}: row {b} differs at position {t}, factor {i}, away from any sampling threshold"
        bad.append(b)
    assert len(bad) <= max(1, MAX_NEAR_BOUNDARY * B), f"{what}: {len(bad)} of {B} rows at a near-tie"


@pytest.mark.parametrize("k,n_kv_head", [(2, None), (3, 1)])
def test_static_cache_decode_equals_the_growing_cache(k, n_kv_head):
    model = make(num_factors=k, n_kv_head=n_kv_head)
    idx, lab = inputs(model)
    B, _, T = idx.shape
    with torch.no_grad():
        grow, static = model.new_cache(B, "cpu"), model.new_static_cache(B, "cpu")
        x = model.class_input(lab)
        for t in range(T):
            pos = torch.tensor([t])
            a, b = model.decode_trunk(x, t, grow), model.decode_trunk_static(x, pos, static, attention_length(t, T))
            close(b, a, rtol=1e-5, atol=1e-5)
            for j in range(k):
                close(model.decode_slot_static(b, j, static), model.decode_slot(a, j, grow), rtol=1e-5, atol=1e-5)
                if j + 1 < k:
                    a = b = model.slot_input(idx[:, j, t], j)
            x = model.token_input(idx[:, :, t])


def test_attention_length_buckets():
    assert [attention_length(t, 256) for t in (0, 63, 64, 127, 128, 200, 255)] == [64, 64, 128, 128, 192, 256, 256]
    assert sorted({attention_length(t, 16) for t in range(16)}) == [8, 16]
    assert {attention_length(t, 4) for t in range(4)} == {4}
    assert all(attention_length(t, 9) > t for t in range(9))


def test_compiled_step_is_one_graph_per_attention_length(monkeypatch):
    """fullgraph (no graph break) and no recompile across positions: 64 positions, 4 lengths, 4 graphs; a second
    call compiles nothing. Dynamo only (backend "eager"): the inductor run is the next test."""
    from torch._dynamo.testing import CompileCounter

    gen_module = sys.modules["fqgan.generator.generate"]
    counter = CompileCounter()
    monkeypatch.setitem(gen_module._COMPILED, None, torch.compile(gen_module._position_step, fullgraph=True,
                                                                 dynamic=False, backend=counter))
    model = make(num_factors=3, n_kv_head=1, vocab_size=23, block_size=64)
    labels = torch.tensor([0, 6, 3])
    kw = dict(cfg_scale=[3.0, 1.0, 1.5], temperature=[1.0, 0.7, 1.2], top_k=[0, 5, 0], top_p=[1.0, 0.9, 1.0], seed=4)
    eager = generate(model, labels, **kw)
    assert torch.equal(generate(model, labels, compile=True, **kw), eager)
    assert counter.frame_count == 4
    generate(model, labels, compile=True, **kw)
    assert counter.frame_count == 4


def test_compiled_generate_equals_eager():
    """torch.compile (inductor, this CPU) against eager: the same codes up to float rounding at a threshold."""
    model = make(vocab_size=29, block_size=16, n_layer=1, ar_n_layer=1)
    labels = torch.tensor([0, 6, 3, 2])
    cfg, temp, top_k, top_p = [3.0, 1.5], [1.0, 0.8], [0, 7], [0.9, 1.0]
    uniform = torch.rand(4, 2, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kw = dict(cfg_scale=cfg, temperature=temp, top_k=top_k, top_p=top_p, uniform=uniform)
    got = generate(model, labels, compile=True, **kw)
    assert_same_codes(got, generate(model, labels, **kw), model, labels, uniform, cfg, temp, top_k, top_p, "compiled")


def test_generate_in_bfloat16():
    model = make(vocab_size=23, block_size=16)
    labels = torch.tensor([1, 4, 2])
    out = generate(model, labels, cfg_scale=2.0, seed=3, dtype=torch.bfloat16)
    assert model.head.dtype == torch.float32  # the model itself is not cast
    twin = model.with_dtype(torch.bfloat16)
    assert twin.head.dtype == torch.bfloat16 and twin.rope(torch.device("cpu")).dtype == torch.float32
    assert torch.equal(out, generate(twin, labels, cfg_scale=2.0, seed=3))
    assert out.dtype == torch.long and out.shape == (3, 2, 16)
    with pytest.raises(TypeError, match="dtype"):
        generate(model, labels, dtype=torch.int32)


def test_uniform_draws_make_rows_independent_of_their_batch():
    model = make(vocab_size=23, block_size=9)
    labels = torch.tensor([5, 1, 3, 3])
    uniform = torch.rand(4, 2, 9, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    cfg, temp, top_k, top_p = [2.0, 2.0], [1.0, 1.0], [0, 0], [1.0, 1.0]
    batch = generate(model, labels, cfg_scale=cfg, uniform=uniform)
    alone = torch.cat([generate(model, labels[b:b + 1], cfg_scale=cfg, uniform=uniform[b:b + 1]) for b in range(4)])
    assert_same_codes(alone, batch, model, labels, uniform, cfg, temp, top_k, top_p, "alone vs batch")
    # the seed's draws are torch.rand(T, k, B): the same codes as those numbers given as uniform
    g = torch.Generator().manual_seed(2)
    drawn = torch.rand(9, 2, 4, generator=g, dtype=torch.float64).permute(2, 1, 0)
    assert torch.equal(generate(model, labels, cfg_scale=cfg, seed=2), generate(model, labels, cfg_scale=cfg,
                                                                                 uniform=drawn))
    with pytest.raises(ValueError, match=r"uniform must be a float tensor of shape \[B=4, k=2, T=9\]"):
        generate(model, labels, uniform=uniform[:, :, :3])
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        generate(model, labels, uniform=uniform + 1)
    with pytest.raises(ValueError, match="not several"):
        generate(model, labels, uniform=uniform, seed=1)
    with pytest.raises(ValueError, match="fused sampler"):
        generate(model, labels, compile=True, backend="reference")


# ---------------------------------------------------------------------------------------------
# label / token dropout
# ---------------------------------------------------------------------------------------------
def test_label_dropout_draws_as_official():
    model = make(class_dropout_prob=0.5, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    idx, lab = inputs(model, B=8)
    torch.manual_seed(3)
    drop = torch.rand(8) < 0.5
    assert 0 < drop.sum() < 8
    model.train()
    torch.manual_seed(3)
    trained = model(idx, lab).loss
    model.eval()
    close(trained, model(idx, lab, drop_labels=drop).loss, rtol=0, atol=0)
    # The null class (the label table's extra last row) replaces whatever label a dropped row had.
    assert model.class_embed.embedding_table.weight.shape[0] == 8
    every = torch.ones(8, dtype=torch.bool)
    close(model.logits(idx, lab, drop_labels=every), model.logits(idx, (lab + 3) % 7, drop_labels=every),
          rtol=0, atol=0)


def test_dropout_only_in_training():
    model = make(token_dropout_p=0.3, class_dropout_prob=0.0)
    idx, lab = inputs(model)
    a, b = model(idx, lab).loss, model(idx, lab).loss
    assert a == b
    model.train()
    assert model(idx, lab).loss != model(idx, lab).loss


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_bad_inputs():
    model = make()
    idx, lab = inputs(model)
    with pytest.raises(ValueError, match=r"\[B, k=2, T\]"):
        model(idx[:, :1], lab)  # k = 1 codes for a k = 2 model
    with pytest.raises(ValueError, match=r"\[B, k=2, T\]"):
        model(torch.zeros(3, 3, 16, dtype=torch.long), lab)
    with pytest.raises(ValueError, match="block_size=16"):
        model(torch.zeros(3, 2, 17, dtype=torch.long), lab)
    with pytest.raises(ValueError, match=r"num_classes=7"):
        model(idx, torch.tensor([0, 7, 1]))
    with pytest.raises(ValueError, match=r"num_classes=7"):
        model(idx, torch.tensor([0, -1, 1]))
    bad = idx.clone()
    bad[1, 1, 3] = 37
    with pytest.raises(ValueError, match=r"vocab_size=37"):
        model(bad, lab)
    bad[1, 1, 3] = -2
    with pytest.raises(ValueError, match=r"vocab_size=37"):
        model.logits(bad, lab)
    with pytest.raises(TypeError, match="integer"):
        model(idx.float(), lab)
    with pytest.raises(ValueError, match=r"labels must have shape \[B=3\]"):
        model(idx, lab[:2])
    with pytest.raises(ValueError, match="num_classes=7"):
        generate(model, torch.tensor([9]))
    with pytest.raises(ValueError, match="cfg_scale"):
        generate(model, lab, cfg_scale=0.5)
    with pytest.raises(ValueError, match="one per factor"):
        generate(model, lab, cfg_scale=[2.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="temperature"):
        generate(model, lab, temperature=[1.0, 0.0])
    with pytest.raises(ValueError, match="top_p"):
        generate(model, lab, top_p=1.5)
    with pytest.raises(TypeError, match="top_k"):
        generate(model, lab, top_k=1.5)
    with pytest.raises(ValueError, match=r"shape \[B=3\]"):
        generate(model, lab, temperature=torch.ones(2))
    with pytest.raises(ValueError, match="seed or generator"):
        generate(model, lab, seed=1, generator=torch.Generator())
    no_null = make(class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="null class"):
        generate(no_null, lab, cfg_scale=2.0)
    with pytest.raises(ValueError, match="null class"):
        no_null(idx, lab, drop_labels=torch.ones(3, dtype=torch.bool))


def test_bad_config():
    with pytest.raises(ValueError, match="divisible by n_head"):
        small_config(dim=30, n_head=4)
    with pytest.raises(ValueError, match="divisible by 4"):
        small_config(dim=12, n_head=2)
    with pytest.raises(ValueError, match="square"):
        small_config(block_size=12)
    with pytest.raises(ValueError, match="unknown FAR preset"):
        FARConfig.from_preset("FAR-XXL")
    with pytest.raises(ValueError, match="unknown FARConfig fields"):
        FARConfig.from_preset("FAR-B", layers=3)
    with pytest.raises(TypeError, match="FARConfig"):
        FAR({"dim": 3})


# ---------------------------------------------------------------------------------------------
# no host sync in a training step (GPU)
# ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_cuda_training_step_has_no_sync():
    """The input checks of a training forward are device-side asserts on the GPU: a step (forward,
    fused heads, backward) runs under torch.cuda.set_sync_debug_mode("error")."""
    model = randomize(FAR(small_config(vocab_size=16384))).cuda().train()
    indices, labels = (t.cuda() for t in inputs(model))
    model(indices, labels).loss.backward()  # warm-up: kernel loading may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(indices, labels).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_compiled_training_forward_checks_without_graph_break():
    """Under torch.compile the value check is a device-side assert (no .tolist() graph break: fullgraph).
    Eval mode, so that dropout draws do not differ between the two runs."""
    model = make()
    indices, labels = inputs(model)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    close(compiled(indices, labels).loss, model(indices, labels).loss)
    indices[0, 0, 0] = model.config.vocab_size
    with pytest.raises(RuntimeError, match="FAR: indices must be in"):
        compiled(indices, labels)
