"""Tokenizer losses: each term against the official formula (showlab/FQGAN tokenizer/vq_loss.py,
tokenizer/models/lpips.py), weight files for LPIPS, and where the gradients of each loss go."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fqgan.runtime.checkpoint import CheckpointError, MissingFileError
from fqgan.runtime.vision import import_torchvision
from fqgan.tokenizer import FQTokenizer, TokenizerLossConfig
from fqgan.tokenizer.discriminator import PatchGANDiscriminator
from fqgan.tokenizer.losses import (
    TokenizerLoss,
    adaptive_weight,
    adopt_weight,
    hinge_d_loss,
    hinge_gen_loss,
    info_nce,
    non_saturating_d_loss,
    non_saturating_d_loss_llamagen,
    non_saturating_gen_loss,
    non_saturating_gen_loss_llamagen,
    reconstruction_loss,
    vanilla_d_loss,
)
from fqgan.tokenizer.lpips import LPIPS, LPIPS_ENV, VGG16_ENV, find_lpips_heads

# -- small functions ---------------------------------------------------------------------------


def test_reconstruction_loss():
    a, b = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(reconstruction_loss(a, b, "l2"), ((a - b) ** 2).mean())
    torch.testing.assert_close(reconstruction_loss(a, b, "l1"), (a - b).abs().mean())
    with pytest.raises(ValueError, match="'l1' or 'l2'"):
        reconstruction_loss(a, b, "l3")


def test_gan_losses_equal_official_formulas():
    real, fake = torch.randn(2, 1, 5, 5) * 2, torch.randn(2, 1, 5, 5) * 2
    torch.testing.assert_close(hinge_d_loss(real, fake),
                               0.5 * (torch.mean(F.relu(1.0 - real)) + torch.mean(F.relu(1.0 + fake))))
    torch.testing.assert_close(vanilla_d_loss(real, fake),
                               0.5 * (torch.mean(F.softplus(-real)) + torch.mean(F.softplus(fake))))
    torch.testing.assert_close(non_saturating_d_loss(real, fake), vanilla_d_loss(real, fake))
    torch.testing.assert_close(hinge_gen_loss(fake), -torch.mean(fake))
    torch.testing.assert_close(non_saturating_gen_loss(fake), F.softplus(-fake).mean())
    # The LlamaGen/FQGAN non-saturating losses call BCE(ones_like(x), x): reproduced literally.
    official_d = 0.5 * (torch.mean(F.binary_cross_entropy_with_logits(torch.ones_like(real), real))
                        + torch.mean(F.binary_cross_entropy_with_logits(torch.zeros_like(fake), fake)))
    torch.testing.assert_close(non_saturating_d_loss_llamagen(real, fake), official_d)
    torch.testing.assert_close(non_saturating_gen_loss_llamagen(fake),
                               torch.mean(F.binary_cross_entropy_with_logits(torch.ones_like(fake), fake)))
    assert not torch.allclose(non_saturating_gen_loss_llamagen(fake), non_saturating_gen_loss(fake))


def test_adopt_weight():
    assert adopt_weight(0.5, 19999, threshold=20000) == 0.0
    assert adopt_weight(0.5, 20000, threshold=20000) == 0.5
    assert adopt_weight(0.5, 3, threshold=0) == 0.5


def test_adaptive_weight():
    w = nn.Parameter(torch.randn(4, 3))
    x = torch.randn(5, 3)
    nll = (x @ w.t()).square().mean()
    g = -(x @ w.t()).sin().mean()
    gn = torch.autograd.grad(nll, w, retain_graph=True)[0]
    gg = torch.autograd.grad(g, w, retain_graph=True)[0]
    expected = torch.clamp(gn.norm() / (gg.norm() + 1e-4), 0.0, 1e4)
    got = adaptive_weight(nll, g, w)
    torch.testing.assert_close(got, expected)
    assert not got.requires_grad
    with pytest.raises(ValueError, match="last_layer"):
        adaptive_weight(nll, g, None)


@pytest.mark.parametrize("batch", [2, 5])
def test_info_nce_equals_official(batch):
    pred = torch.randn(batch, 16, requires_grad=True)
    target = torch.randn(batch, 16)
    t = target / target.norm(dim=-1, keepdim=True)
    s = pred / pred.norm(dim=-1, keepdim=True)
    mat = (s @ t.detach().T).exp()
    official = -(mat.diag() / mat.sum(1)).log().mean()
    ours = info_nce(pred, target)
    torch.testing.assert_close(ours, official)
    g1 = torch.autograd.grad(ours, pred)[0]
    g2 = torch.autograd.grad(official, pred)[0]
    torch.testing.assert_close(g1, g2)


def test_info_nce_batch_one_and_bad_shapes():
    assert info_nce(torch.randn(1, 8), torch.randn(1, 8)).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match=r"both be \[B, W\]"):
        info_nce(torch.randn(2, 8), torch.randn(2, 9))


# -- LPIPS -------------------------------------------------------------------------------------


def random_vgg_file(path):
    """A torchvision-format vgg16 state dict (features.* and classifier.*) with random weights."""
    torch.manual_seed(3)
    with torch.device("meta"):  # torchvision's own layout; shapes only
        feats = import_torchvision().models.vgg16().features.state_dict()
    state = {f"features.{k}": torch.randn(v.shape) * 0.05 for k, v in feats.items()}
    state["classifier.0.weight"] = torch.zeros(4, 4)
    torch.save(state, path)
    return state


def random_heads_file(path):
    torch.manual_seed(4)
    state = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(state, path)
    return state


def official_lpips(vgg_state, heads, x, y):
    """LlamaGen/FQGAN lpips.py: ScalingLayer, vgg16 slices 0-4/4-9/9-16/16-23/23-30, normalize_tensor
    (eps 1e-10), squared difference, 1x1 heads (eval: dropout off), spatial mean, sum."""
    shift = torch.tensor([-.030, -.088, -.188])[None, :, None, None]
    scale = torch.tensor([.458, .448, .450])[None, :, None, None]
    layers = []
    in_ch = 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU(inplace=True)]
            in_ch = v
    features = nn.Sequential(*layers)
    features.load_state_dict({k[9:]: v for k, v in vgg_state.items() if k.startswith("features.")})
    slices = [features[0:4], features[4:9], features[9:16], features[16:23], features[23:30]]

    def taps(inp):
        h, out = (inp - shift) / scale, []
        for s in slices:
            h = s(h)
            out.append(h)
        return out

    def norm(t):
        return t / (torch.sqrt(torch.sum(t ** 2, dim=1, keepdim=True)) + 1e-10)

    val = 0
    for i, (a, b) in enumerate(zip(taps(x), taps(y))):
        diff = (norm(a) - norm(b)) ** 2
        val = val + F.conv2d(diff, heads[f"lin{i}.model.1.weight"]).mean([2, 3], keepdim=True)
    return val


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """(vgg path, heads path, vgg state, heads state): random weights in the real files' formats, made once."""
    d = tmp_path_factory.mktemp("lpips")
    vgg = random_vgg_file(d / "vgg16-397923af.pth")
    heads = random_heads_file(d / "vgg.pth")
    return d / "vgg16-397923af.pth", d / "vgg.pth", vgg, heads


@pytest.fixture(scope="module")
def random_lpips():
    return LPIPS()


def test_lpips_from_files_equals_official(lpips_files, images):
    vgg_path, heads_path, vgg, heads = lpips_files
    lp = LPIPS.from_files(vgg_path, heads_path).eval()
    x, y = images(2, 32, seed=1), images(2, 32, seed=2)
    out = lp(x, y)
    assert out.shape == (2, 1, 1, 1)
    torch.testing.assert_close(out, official_lpips(vgg, heads, x, y), rtol=1e-4, atol=1e-6)
    assert all(not p.requires_grad for p in lp.parameters())
    xg = x.clone().requires_grad_()
    lp(xg, y).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_lpips_dropout_follows_train_mode(lpips_files, images):
    vgg_path, heads_path, _, _ = lpips_files
    x, y = images(2, 32, seed=1), images(2, 32, seed=2)
    with_dropout = LPIPS.from_files(vgg_path, heads_path)
    without = LPIPS.from_files(vgg_path, heads_path, use_dropout=False)
    ref = with_dropout.eval()(x, y)
    torch.testing.assert_close(without.train()(x, y), ref)
    assert not torch.allclose(with_dropout.train()(x, y), ref)  # official: dropout live in train mode


def test_lpips_files_from_environment(lpips_files, monkeypatch, images):
    vgg_path, heads_path, _, _ = lpips_files
    monkeypatch.setenv(VGG16_ENV, str(vgg_path))
    monkeypatch.setenv(LPIPS_ENV, str(heads_path))
    lp = LPIPS.from_files()
    assert lp(images(1, 32), images(1, 32, seed=1)).shape == (1, 1, 1, 1)


def test_lpips_missing_vgg_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.delenv(VGG16_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(MissingFileError) as err:
        LPIPS.from_files()
    msg = str(err.value)
    assert f"${VGG16_ENV} (not set)" in msg and str(tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth") in msg
    assert "download.pytorch.org/models/vgg16-397923af.pth" in msg and "perceptual_weight=0" in msg
    with pytest.raises(MissingFileError, match=r"nope.pth \(argument\)"):
        LPIPS.from_files(tmp_path / "nope.pth")


def test_lpips_bad_weight_files(tmp_path, lpips_files):
    vgg_path, heads_path, vgg, _ = lpips_files
    state = {k: v for k, v in vgg.items() if k != "features.28.weight"}
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(CheckpointError, match=r"lack 1 of the 26 feature tensors.*features.28.weight"):
        LPIPS.from_files(tmp_path / "short.pth", heads_path)
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "h2.pth")
    with pytest.raises(CheckpointError, match="lack lin1.model.1.weight"):
        LPIPS.from_files(vgg_path, tmp_path / "h2.pth")
    (tmp_path / "broken.pth").write_bytes(vgg_path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable PyTorch file"):
        LPIPS.from_files(tmp_path / "broken.pth", heads_path)


def test_lpips_heads_of_the_lpips_wheel(lpips_files, monkeypatch):
    monkeypatch.delenv(LPIPS_ENV, raising=False)
    path = find_lpips_heads()
    assert path.name == "vgg.pth" and path.parent.name == "v0.1"
    lp = LPIPS.from_files(lpips_files[0])  # heads found in the wheel; its tensors were saved on CUDA
    assert lp.metric.lin0.model[1].weight.abs().sum() > 0


def test_lpips_equals_the_lpips_package_loading_its_own_heads(lpips_files, monkeypatch, images):
    """The lpips package's own construction (its bundled v0.1 heads, loaded by lpips itself) with the
    same trunk gives the same numbers as from_files, in eval and, with one dropout seed, in train mode."""
    import warnings

    import_torchvision()
    import lpips

    vgg_path, _, vgg, _ = lpips_files
    monkeypatch.delenv(LPIPS_ENV, raising=False)
    ours = LPIPS.from_files(vgg_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # lpips passes torchvision's deprecated pretrained=False
        theirs = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    trunk = {name: p for name, p in theirs.net.named_parameters()}
    with torch.no_grad():
        for name, p in trunk.items():
            p.copy_(vgg["features." + name.split(".", 1)[1]])
    x, y = images(2, 48, seed=5), images(2, 48, seed=6)
    torch.testing.assert_close(ours.eval()(x, y), theirs.eval()(x, y), rtol=0, atol=0)
    ours.train(), theirs.train()
    torch.manual_seed(11)
    a = ours(x, y)
    torch.manual_seed(11)
    torch.testing.assert_close(a, theirs(x, y), rtol=0, atol=0)


def test_lpips_without_dropout_keeps_the_heads_layout(lpips_files):
    lp = LPIPS.from_files(lpips_files[0], lpips_files[1], use_dropout=False)
    assert [type(m) for m in lp.metric.lin0.model] == [nn.Identity, nn.Conv2d]
    assert all(not p.requires_grad for p in lp.parameters())


def test_lpips_files_load_into_torchvision_modules(lpips_files):
    """The trunk is torchvision's vgg16().features (same classes, same indices), with the file's values."""
    tv = import_torchvision()
    vgg_path, heads_path, vgg, heads = lpips_files
    lp = LPIPS.from_files(vgg_path, heads_path)
    with torch.device("meta"):
        reference = tv.models.vgg16().features
    ours = [m for s in (lp.metric.net.slice1, lp.metric.net.slice2, lp.metric.net.slice3, lp.metric.net.slice4,
                        lp.metric.net.slice5) for m in s]
    assert [type(m) for m in ours] == [type(m) for m in reference[:30]]
    for name, p in lp.metric.net.named_parameters():
        assert torch.equal(p, vgg["features." + name.split(".", 1)[1]]), name
    for i in range(5):
        assert torch.equal(lp.metric.lins[i].model[1].weight, heads[f"lin{i}.model.1.weight"])


# -- PatchGAN ----------------------------------------------------------------------------------


class OfficialPatchGAN(nn.Module):
    """Test-only literal re-write of LlamaGen/FQGAN ``discriminator_patchgan.NLayerDiscriminator`` as
    ``VQLoss_*_codebook`` builds it (BatchNorm, so the convs before a norm have no bias), with its
    ``_init_weights`` (every conv weight N(0, 0.02), BatchNorm weight N(1, 0.02) and bias 0)."""

    def __init__(self, input_nc=3, ndf=64, n_layers=3):
        super().__init__()
        norm_layer = nn.BatchNorm2d
        use_bias = norm_layer != nn.BatchNorm2d
        kw, padw = 4, 1
        sequence = [nn.Conv2d(input_nc, ndf, kernel_size=kw, stride=2, padding=padw), nn.LeakyReLU(0.2, True)]
        nf_mult = 1
        for n in range(1, n_layers):
            nf_mult_prev, nf_mult = nf_mult, min(2 ** n, 8)
            sequence += [nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=2, padding=padw,
                                   bias=use_bias), norm_layer(ndf * nf_mult), nn.LeakyReLU(0.2, True)]
        nf_mult_prev, nf_mult = nf_mult, min(2 ** n_layers, 8)
        sequence += [nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=1, padding=padw,
                               bias=use_bias), norm_layer(ndf * nf_mult), nn.LeakyReLU(0.2, True)]
        sequence += [nn.Conv2d(ndf * nf_mult, 1, kernel_size=kw, stride=1, padding=padw)]
        self.main = nn.Sequential(*sequence)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight.data, 0.0, 0.02)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight.data, 1.0, 0.02)
            nn.init.constant_(module.bias.data, 0)

    def forward(self, x):
        return self.main(x)


@pytest.mark.parametrize("dim,layers", [(8, 1), (8, 3), (4, 4)])
def test_patchgan_layout_and_outputs_equal_official(dim, layers, images):
    """Same state-dict keys and shapes as the official discriminator (so an official checkpoint's
    "discriminator" entry loads), same layer types, and with its weights the same logits on batch
    statistics (train) and on running statistics (eval)."""
    official, ours = OfficialPatchGAN(3, dim, layers), PatchGANDiscriminator(3, dim, layers)
    theirs = official.state_dict()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in theirs.items()]
    assert [type(m) for m in ours.main] == [type(m) for m in official.main]
    assert [m.negative_slope for m in ours.main if isinstance(m, nn.LeakyReLU)] == [0.2] * (layers + 1)
    ours.load_state_dict(theirs)
    x = images(3, 64)
    official.train(), ours.train()
    torch.testing.assert_close(ours(x), official(x))
    official.eval(), ours.eval()
    torch.testing.assert_close(ours(x), official(x))


def test_patchgan_init_is_official():
    """Conv weights N(0, 0.02), BatchNorm weights N(1, 0.02) and biases 0; the first and the last conv keep
    their bias (PyTorch's default init), the others have none. A default-initialised PatchGAN fails it."""
    torch.manual_seed(0)
    d = PatchGANDiscriminator()  # the official size: 64 filters, 3 layers
    convs = [m for m in d.main if isinstance(m, nn.Conv2d)]
    norms = [m for m in d.main if isinstance(m, nn.BatchNorm2d)]
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert abs(weights.mean().item()) < 1e-3 and abs(weights.std().item() - 0.02) < 5e-4
    gammas = torch.cat([n.weight for n in norms])
    assert abs(gammas.mean().item() - 1.0) < 5e-3 and abs(gammas.std().item() - 0.02) < 3e-3
    assert all(torch.equal(n.bias, torch.zeros_like(n.bias)) for n in norms)


# -- TokenizerLoss -----------------------------------------------------------------------------


class RandomTeacher(nn.Module):
    """A frozen stand-in teacher: a fixed random projection of the pooled image."""

    def __init__(self, width: int):
        super().__init__()
        self.hidden_size = width
        self.proj = nn.Linear(3, width)
        self.requires_grad_(False)

    def forward(self, images):
        return self.proj(images.mean(dim=(2, 3)))


@pytest.fixture
def setup(tiny_config, images, random_lpips):
    model = FQTokenizer(tiny_config).train()
    loss = TokenizerLoss(TokenizerLossConfig(disc_start=2, disc_adaptive_weight=True, disc_dim=8),
                         tiny_config, teachers=[RandomTeacher(64)], lpips=random_lpips).train()
    return model, loss, images(2, 32)


def test_generator_loss_terms_and_gradient_routing(setup):
    model, loss, x = setup
    out = model(x)
    g = loss.generator_loss(x, out, step=5, last_layer=model.last_layer)
    terms = {**g._asdict(), **{f"quantizer.{k}": v for k, v in g.quantizer._asdict().items()}}
    for name, value in terms.items():
        if name != "quantizer":
            assert torch.isfinite(value).all(), name
    c = loss.config
    torch.testing.assert_close(g.reconstruction, c.reconstruction_weight * F.mse_loss(x, out.reconstruction))
    expected = (g.reconstruction + g.perceptual + g.adversarial + out.quantizer_loss + g.semantic.sum())
    torch.testing.assert_close(g.loss, expected)
    assert g.semantic.shape == (1,) and g.disc_weight.item() == c.disc_weight
    assert g.adaptive_weight.item() > 0
    g.loss.backward()
    # The generator loss trains the tokenizer (every parameter that takes part) ...
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    # ... and nothing of the loss module: not the discriminator, nor LPIPS, nor the teacher.
    assert all(p.grad is None for p in loss.parameters())


def test_discriminator_loss_reaches_only_the_discriminator(setup):
    model, loss, x = setup
    out = model(x)
    d = loss.discriminator_loss(x, out.reconstruction, step=5)
    assert torch.isfinite(d.loss) and d.disc_weight.item() == loss.config.disc_weight
    d.loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in loss.discriminator.parameters())
    real, fake = loss.discriminator(x), loss.discriminator(out.reconstruction.detach())
    torch.testing.assert_close(d.loss, loss.config.disc_weight * hinge_d_loss(real, fake))


def test_discriminator_start(setup):
    model, loss, x = setup
    out = model(x)
    before = loss.discriminator.main[3].num_batches_tracked.clone()
    g = loss.generator_loss(x, out, step=1, last_layer=model.last_layer)
    assert g.adversarial.item() == 0.0 and g.disc_weight.item() == 0.0
    assert torch.equal(loss.discriminator.main[3].num_batches_tracked, before)  # D not run before the start
    d = loss.discriminator_loss(x, out.reconstruction, step=1)
    assert d.loss.item() == 0.0 and not loss.discriminator_active(1) and loss.discriminator_active(2)
    g2 = loss.generator_loss(x, out, step=2, last_layer=model.last_layer)
    assert g2.adversarial.item() != 0.0


def test_adversarial_term_formula(setup):
    model, loss, x = setup
    out = model(x)
    g = loss.generator_loss(x, out, step=3, last_layer=model.last_layer)
    logits_fake = loss.discriminator(out.reconstruction)
    g_loss = hinge_gen_loss(logits_fake)
    nll = g.reconstruction + g.perceptual  # weights 1.0
    a = adaptive_weight(nll, g_loss, model.last_layer)
    torch.testing.assert_close(g.adaptive_weight, a)
    torch.testing.assert_close(g.adversarial, a * loss.config.disc_weight * g_loss, rtol=1e-5, atol=1e-7)


def test_perceptual_weight_zero_needs_no_files(tiny_config, images, monkeypatch, tmp_path):
    monkeypatch.delenv(VGG16_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    loss = TokenizerLoss(TokenizerLossConfig(perceptual_weight=0.0, semantic_weight=0.0), tiny_config)
    assert loss.perceptual is None and len(loss.teachers) == 0
    model = FQTokenizer(tiny_config)
    x = images(2, 32)
    g = loss.generator_loss(x, model(x), step=1)
    assert g.perceptual.item() == 0.0 and g.semantic.shape == (0,)
    with pytest.raises(MissingFileError, match=VGG16_ENV):
        TokenizerLoss(TokenizerLossConfig(semantic_weight=0.0), tiny_config)


def test_teacher_errors(tiny_config, random_lpips):
    with pytest.raises(ValueError, match=r"feature predictors on sub-codebooks \[1\].*pass teachers="):
        TokenizerLoss(TokenizerLossConfig(), tiny_config, lpips=random_lpips)
    with pytest.raises(ValueError, match="hidden size 32 but its feature predictor predicts 64-d"):
        TokenizerLoss(TokenizerLossConfig(), tiny_config, teachers=[RandomTeacher(32)], lpips=random_lpips)
    with pytest.raises(ValueError, match="2 teachers for 1 feature predictors"):
        TokenizerLoss(TokenizerLossConfig(), tiny_config, teachers=[RandomTeacher(64)] * 2, lpips=random_lpips)


@pytest.mark.parametrize("changes", [dict(reconstruction_loss="l3"), dict(disc_loss="wgan"), dict(gen_loss="vanilla"),
                                     dict(disc_start=-1), dict(perceptual_weight=-1.0), dict(disc_dim=0)])
def test_bad_loss_options(changes):
    with pytest.raises((ValueError, TypeError)):
        TokenizerLossConfig(**changes)


def test_triple_semantic_terms(tiny_triple_config, images):
    model = FQTokenizer(tiny_triple_config).train()
    loss = TokenizerLoss(TokenizerLossConfig(perceptual_weight=0.0, disc_start=0, disc_dim=8), tiny_triple_config,
                         teachers={1: RandomTeacher(64), 2: RandomTeacher(64)}).train()
    x = images(3, 32)
    out = model(x)
    g = loss.generator_loss(x, out, step=1)
    assert g.semantic.shape == (2,) and torch.isfinite(g.loss)
    expected = [0.5 * info_nce(f, loss.teachers[str(i)](x)) for i, f in zip((1, 2), out.semantic_features)]
    torch.testing.assert_close(g.semantic, torch.stack(expected))
