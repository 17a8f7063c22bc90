"""FQTokenizer: shapes through every preset, encode/decode round trip, where each loss term's
gradient goes, the fused quantizer backend in a training step, bad input."""

import pytest
import torch

import fqgan_kernels as fk
from fqgan.tokenizer import PRESETS, FQTokenizer, TokenizerConfig, get_preset


def small(config: TokenizerConfig) -> TokenizerConfig:
    """The preset's structure (k, levels, heads, teachers) with small channel counts and a 4x4 grid."""
    dims = tuple(0 if d == 0 else 32 * (1 + i % 2) for i, d in enumerate(config.feat_pred_dims))
    return config.replace(ch=32, z_channels=32, codebook_size=64, image_size=4 * config.down_factor,
                          num_res_blocks=1, adapter_layers=1, feat_pred_layers=1, feat_pred_dims=dims,
                          norm_groups=min(config.norm_groups, 32))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_shapes_and_round_trip(name, images):
    config = small(PRESETS[name])
    model = FQTokenizer(config).eval()
    x = images(2, config.image_size)
    out = model(x)
    k, g = config.num_codebooks, config.grid_size
    assert out.reconstruction.shape == x.shape
    assert out.indices.shape == (2, k, g, g) and out.indices.dtype == torch.int64
    widths = [(2, config.feat_pred_dims[i]) for i in config.semantic_codebooks]
    assert [f.shape for f in out.semantic_features] == widths
    assert out.losses.codebook.shape == out.losses.entropy.shape == (k,)
    assert out.losses.entropy.abs().sum() == 0  # eval: no entropy loss, as the official quantizer
    idx = model.encode(x)
    assert torch.equal(idx, out.indices)
    # forward decodes the straight-through value z + (codes - z), equal to the codes up to one rounding.
    torch.testing.assert_close(model.decode_indices(idx), out.reconstruction, rtol=1e-4, atol=1e-4)
    # Decoding the codes of the indices gives back the same indices.
    assert torch.equal(model.quantizer(model.quantizer.decode_indices(idx)).indices, idx)


def test_real_preset_structure():
    """The real presets (no weights: meta device): official widths, grid, codebooks."""
    expected = {"fqgan-dual-16": (2, 16, (0, 1024)), "fqgan-dual-8": (2, 32, (0, 1024)),
                "fqgan-triple-16": (3, 16, (0, 384, 768)), "fqgan-triple-8": (3, 32, (0, 384, 768))}
    for name, (k, grid, dims) in expected.items():
        config = get_preset(name)
        assert (config.num_codebooks, config.grid_size, config.feat_pred_dims) == (k, grid, dims)
        with torch.device("meta"):
            model = FQTokenizer(config.replace(quantizer_backend="reference"))
        sd = model.state_dict()
        assert sd["quantizer.codebooks"].shape == (k, 16384, 8)
        assert sd["post_quant_conv.weight"].shape == (256, 8 * k, 1, 1)
        assert sd["branches.0.adapter.positional_embedding"].shape == (grid * grid, 512)
        attn = [n for n in sd if n.startswith("branches.0.adapter.transformer.") and n.endswith("in_proj_weight")]
        assert len(attn) == 6


def test_config_validation():
    with pytest.raises(ValueError, match="feat_pred_dims has 2 entries but num_codebooks = 3"):
        get_preset("tiny", num_codebooks=3)
    with pytest.raises(ValueError, match="not divisible by the downsample factor"):
        get_preset("tiny", image_size=30)
    with pytest.raises(ValueError, match="feat_pred_dims\\[0\\] must be 0"):
        get_preset("tiny", feat_pred_dims=(8, 64))
    with pytest.raises(ValueError, match="unknown tokenizer preset"):
        get_preset("fqgan-quad")
    config = get_preset("tiny")
    assert TokenizerConfig.from_dict(config.to_dict()) == config
    with pytest.raises(TypeError, match="TokenizerConfig or a preset name"):
        FQTokenizer(3)


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n: p.grad for n, p in model.named_parameters()}


def _reached(grads, prefix):
    return any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix))


def test_each_loss_term_reaches_the_right_parameters(tiny_config, images):
    model = FQTokenizer(tiny_config).train()
    out = model(images(2, 32))
    for value in (*out.losses, out.reconstruction, *out.semantic_features):
        assert torch.isfinite(value).all()
    cases = {
        # reconstruction: straight-through to the encoder, never the codebooks (FQGAN/LlamaGen)
        "reconstruction": (out.reconstruction.square().mean(),
                           ["decoder.", "post_quant_conv.", "branches.0.", "branches.1.", "encoder."],
                           ["quantizer.", "feature_predictors."]),
        "codebook": (out.losses.codebook.sum(), ["quantizer."], ["branches.", "encoder.", "decoder."]),
        "commitment": (out.losses.commitment.sum(), ["branches.0.", "branches.1.", "encoder."],
                       ["quantizer.", "decoder."]),
        "entropy": (out.losses.entropy.sum(), ["quantizer.", "branches.0.", "branches.1.", "encoder."], ["decoder."]),
        "disentangle": (out.losses.disentangle, ["branches.0.", "branches.1.", "encoder."], ["quantizer.", "decoder."]),
        # the feature predictor reads sub-codebook 1 only: the visual branch gets nothing from it
        "semantic": (out.semantic_features[0].square().mean(), ["feature_predictors.1.", "branches.1.", "encoder."],
                     ["branches.0.", "quantizer.", "decoder."]),
    }
    for name, (loss, reach, avoid) in cases.items():
        grads = _grads(model, loss)
        for prefix in reach:
            assert _reached(grads, prefix), f"{name} should reach {prefix}"
        for prefix in avoid:
            assert not _reached(grads, prefix), f"{name} should not reach {prefix}"


def test_bf16_autocast_step(tiny_config, images):
    model = FQTokenizer(tiny_config).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images(2, 32))
        loss = out.reconstruction.float().square().mean() + out.quantizer_loss
    loss.backward()
    assert torch.isfinite(loss) and model.quantizer.codebooks.grad is not None


def test_state_dict_round_trip(tiny_triple_config, images):
    a = FQTokenizer(tiny_triple_config).eval()
    b = FQTokenizer(tiny_triple_config).eval()
    b.load_state_dict(a.state_dict())
    x = images(1, 32)
    assert torch.equal(a.encode(x), b.encode(x))


# -- the fused kernels in a training step --------------------------------------------------------


def _profiled_step(model, x):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = model(x)
        (out.reconstruction.square().mean() + out.quantizer_loss).backward()
    return out, {e.key for e in prof.key_averages()}


def test_cpu_training_step_runs_the_compiled_backend_and_matches_reference(tiny_config, images):
    """With quantizer_backend="auto" a CPU training step runs the compiled CPU kernels: the custom ops
    run and none of the reference's work does (argmin over the N x K distances, their log_softmax);
    the reference backend (fqgan_kernels/reference.py), same weights, does that work, runs none of the
    custom ops, and gives the same losses and gradients."""
    if not fk.backends()["cpu"].available:
        pytest.fail(f"the compiled CPU backend is not available: {fk.backends()['cpu'].reason}")
    config = tiny_config.replace(codebook_size=512)
    assert fk.resolve_backend("nearest_code", "auto", torch.device("cpu")) == "cpu"
    fused = FQTokenizer(config).train()
    ref = FQTokenizer(config.replace(quantizer_backend="reference")).train()
    ref.load_state_dict(fused.state_dict())
    x = images(2, 32)
    out_f, ops_f = _profiled_step(fused, x)
    out_r, ops_r = _profiled_step(ref, x)
    for op in ("fqgan::nearest_code", "fqgan::vq_losses"):
        assert op in ops_f and op not in ops_r
    assert any(op.startswith("fqgan::entropy") for op in ops_f)
    assert not any(op.startswith("fqgan::") for op in ops_r)
    assert "aten::argmin" in ops_r and "aten::argmin" not in ops_f
    assert "aten::log_softmax" in ops_r and "aten::log_softmax" not in ops_f

    assert torch.equal(out_f.indices, out_r.indices)
    for name in ("codebook", "commitment", "entropy", "disentangle"):
        torch.testing.assert_close(getattr(out_f.losses, name), getattr(out_r.losses, name), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_f.quantizer_loss, out_r.quantizer_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_f.reconstruction, out_r.reconstruction)
    ref_params = dict(ref.named_parameters())
    for n, p in fused.named_parameters():
        g_r = ref_params[n].grad
        if n.startswith("feature_predictors."):  # not in this loss
            assert p.grad is None and g_r is None
            continue
        # The entropy loss (T = 0.01) amplifies the kernels' fp32 rounding (a different summation order):
        # compare against the gradient's own scale.
        torch.testing.assert_close(p.grad, g_r, rtol=1e-3, atol=1e-4 * g_r.abs().max().item() + 1e-8,
                                   msg=lambda m, n=n: f"{n}: {m}")


# -- bad input -----------------------------------------------------------------------------------


def test_bad_images(tiny_config, images):
    model = FQTokenizer(tiny_config)
    with pytest.raises(ValueError, match="image size 30x30 is not divisible by the downsample factor 4"):
        model(torch.randn(1, 3, 30, 30))
    with pytest.raises(ValueError, match=r"takes 32x32 images .* got 64x64"):
        model.encode(images(1, 64))
    with pytest.raises(ValueError, match=r"must have 3 channels on dim 1, got shape \(1, 4, 32, 32\)"):
        model.encode(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"must be \[B, 3, H, W\], got shape \(3, 32, 32\)"):
        model.encode(torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        model.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model.encode([[0.0]])
    with pytest.raises(ValueError, match="empty batch"):
        model.encode(torch.randn(0, 3, 32, 32))
    nan = images(1, 32)
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="(?i)nan|finite"):
        model.encode(nan)


def test_bad_indices(tiny_config):
    model = FQTokenizer(tiny_config)
    with pytest.raises(ValueError, match="k=2"):
        model.decode_indices(torch.zeros(1, 3, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"outside \[0, 64\)"):
        model.decode_indices(torch.full((1, 2, 8, 8), 64, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model.decode_indices(torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match=r"\[B, k=2, h, w\]"):
        model.decode_indices(torch.zeros(2, 8, 8, dtype=torch.long))
