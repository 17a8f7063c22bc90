"""FactorizedQuantizer: API, layouts, losses and gradients against an independent restatement of
FQGAN's per-sub-codebook quantizer (tokenizer/vq_model_triple.py), statistics, state, bad input."""

import pytest
import torch
import torch.nn.functional as F

import fqgan_kernels as fk
from fqgan_kernels import _common


def fqgan_style_loss(z, weights, beta, entropy_ratio, dis_ratio, T=0.01):
    """k FQGAN VectorQuantizers (l2_norm=True) on the channel groups of z [B, k*D, H, W], summed
    as in VQLoss_triple_codebook, plus compute_disentangle_loss averaged over the pairs."""
    k, _, D = weights.shape
    outs, total = [], 0.0
    for i in range(k):
        zi = z[:, i * D:(i + 1) * D].permute(0, 2, 3, 1).contiguous()
        zi = F.normalize(zi, dim=-1)
        flat = zi.view(-1, D)
        emb = F.normalize(weights[i], dim=-1)
        d = (flat**2).sum(1, keepdim=True) + (emb**2).sum(1) - 2 * flat @ emb.t()
        idx = d.argmin(1)
        zq = emb[idx].view(zi.shape)
        vq = torch.mean((zq - zi.detach()) ** 2)
        commit = beta * torch.mean((zq.detach() - zi) ** 2)
        aff = -d / T
        probs, logp = aff.softmax(-1), aff.log_softmax(-1)
        avg = probs.mean(0)
        ent = entropy_ratio * (-(probs * logp).sum(-1).mean() + (avg * torch.log(avg + 1e-5)).sum())
        total = total + vq + commit + ent
        outs.append((zi + (zq - zi).detach()).permute(0, 3, 1, 2))
    pairs = []
    for a in range(k):
        for b in range(a + 1, k):
            qa = F.normalize(outs[a].permute(0, 2, 3, 1).reshape(-1, D), dim=-1)
            qb = F.normalize(outs[b].permute(0, 2, 3, 1).reshape(-1, D), dim=-1)
            pairs.append(torch.mean((qa * qb).sum(1) ** 2) * dis_ratio)
    if pairs:
        total = total + sum(pairs) / len(pairs)
    return torch.cat(outs, 1), total


@pytest.mark.parametrize("k", [1, 2, 3])
def test_matches_fqgan_loss_and_gradients(k):
    q = fk.FactorizedQuantizer(num_codebooks=k, codebook_size=64, codebook_dim=8, entropy_weight=0.03,
                               disentangle_weight=0.1).double()
    with torch.no_grad():
        q.codebooks.copy_(torch.randn_like(q.codebooks))
    z = torch.randn(2, k * 8, 5, 3, dtype=torch.float64, requires_grad=True)
    quantized, indices, loss = q(z)
    z2 = z.detach().clone().requires_grad_()
    w2 = q.codebooks.detach().clone().requires_grad_()
    ref_q, ref_loss = fqgan_style_loss(z2, w2, 0.25, 0.03, 0.1)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(quantized, ref_q.to(quantized.dtype), rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ref_q)
    (loss + (quantized * g).sum()).backward()
    (ref_loss + (ref_q * g).sum()).backward()
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(q.codebooks.grad, w2.grad, rtol=1e-5, atol=1e-7)
    assert indices.shape == (2, k, 5, 3)


def test_unpacking_breakdown_and_decode_channel_first():
    q = fk.FactorizedQuantizer(num_codebooks=3, codebook_size=128, codebook_dim=8)
    z = torch.randn(2, 24, 4, 4)
    quantized, indices, loss = q(z)
    assert quantized.shape == z.shape and indices.shape == (2, 3, 4, 4) and indices.dtype == torch.long
    assert loss.dim() == 0
    out = q(z, return_loss_breakdown=True)
    assert len(out) == 4 and out.breakdown.codebook.shape == (3,) and out.breakdown.perplexity.shape == (3,)
    torch.testing.assert_close(q.decode_indices(indices), quantized)
    # the quantized value is the chosen normalised code
    codes = _common.l2_normalize(q.codebooks)[1][indices[:, 1]]  # [B, H, W, D]
    torch.testing.assert_close(quantized[:, 8:16], codes.permute(0, 3, 1, 2))


def test_channel_last_and_dtypes():
    q = fk.FactorizedQuantizer(num_codebooks=2, codebook_size=32, codebook_dim=4, channel_first=False)
    z = torch.randn(3, 7, 8)
    quantized, indices, _ = q(z)
    assert quantized.shape == z.shape and indices.shape == (3, 7, 2)
    torch.testing.assert_close(q.decode_indices(indices), quantized)
    qb, ib, _ = q(z.bfloat16())
    assert qb.dtype == torch.bfloat16
    # the quantizer computes in fp32: a bf16 input quantises like its fp32 upcast
    assert torch.equal(ib, q(z.bfloat16().float()).indices)


def test_layout_is_explicit():
    """channel_first=True (the default) whatever the rank: a 3-D [B, k*D, L] input is channel-first,
    never guessed to be channel-last; a channel axis without k*D channels is an error naming both."""
    q = fk.FactorizedQuantizer(num_codebooks=2, codebook_size=32, codebook_dim=8)
    z = torch.randn(4, 16, 16)  # [B, k*D, L] with L == k*D: the case the old rank guess got wrong
    quantized, indices, _ = q(z)
    assert indices.shape == (4, 2, 16)
    tokens = z.movedim(1, -1).reshape(-1, 2, 8)
    expected = fk.reference.nearest_code(tokens, q.codebooks.detach()).indices.reshape(4, 16, 2).movedim(-1, 1)
    assert torch.equal(indices, expected)
    torch.testing.assert_close(q.decode_indices(indices), quantized)
    with pytest.raises(ValueError, match=r"pass channel_first=False"):
        q(torch.randn(4, 5, 16))
    last = fk.FactorizedQuantizer(num_codebooks=2, codebook_size=32, codebook_dim=8, channel_first=False)
    with pytest.raises(ValueError, match=r"pass channel_first=True"):
        last(torch.randn(4, 16, 5))
    # No layout guessing at all: None is not a layout, and the message names the two that are.
    for bad in ("yes", None, 1):
        with pytest.raises(TypeError, match=r"channel_first must be a bool: True \(\[B, k\*D, \*spatial\]\) "
                                            r"or False \(\[\.\.\., k\*D\]\)"):
            fk.FactorizedQuantizer(num_codebooks=2, codebook_size=32, codebook_dim=8, channel_first=bad)
    with pytest.raises(TypeError, match="channel_first must be a bool"):
        q.decode_indices(indices, channel_first="yes")


def test_channel_first_is_the_default():
    """README and docs/design.md section 4: ``q(z)`` with z [B, k*D, H, W] and no layout argument."""
    q = fk.FactorizedQuantizer(num_codebooks=2, codebook_size=32, codebook_dim=8)
    assert q.channel_first is True
    z = torch.randn(2, 16, 3, 5)
    quantized, indices, _ = q(z)
    assert quantized.shape == z.shape and indices.shape == (2, 2, 3, 5)
    torch.testing.assert_close(q.decode_indices(indices), quantized)
    last = fk.FactorizedQuantizer(num_codebooks=2, codebook_size=32, codebook_dim=8, channel_first=False)
    last.load_state_dict(q.state_dict())
    assert torch.equal(last(z.movedim(1, -1)).indices, indices.movedim(1, -1))


def test_matches_reference_backend():
    q = fk.FactorizedQuantizer(num_codebooks=2, codebook_size=512, codebook_dim=8, entropy_weight=0.03)
    z = torch.randn(4, 16, 6, 6)
    a = q(z)
    q.backend = "reference"
    b = q(z)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.loss, b.loss)


def test_usage_statistics_without_sync_and_window():
    q = fk.FactorizedQuantizer(num_codebooks=2, codebook_size=16, codebook_dim=4, usage_window=2)
    q.train()
    z = torch.randn(1, 8, 2, 2)
    out = q(z, return_loss_breakdown=True)
    used = [len(set(out.indices[:, i].flatten().tolist())) / 16 for i in range(2)]
    torch.testing.assert_close(out.breakdown.usage, torch.tensor(used))
    counts = fk.reference.code_counts(out.indices.movedim(1, -1).reshape(-1, 2), 16)
    torch.testing.assert_close(out.breakdown.perplexity, fk.reference.perplexity(counts))
    # after `usage_window` more steps, only the codes of those last two steps count
    seen = []
    for _ in range(2):
        out = q(torch.randn(1, 8, 1, 1), return_loss_breakdown=True)
        seen.append(out.indices.reshape(2).tolist())
    expected = [len({step[i] for step in seen}) / 16 for i in range(2)]
    torch.testing.assert_close(out.breakdown.usage, torch.tensor(expected))
    assert int(q.step) == 3


def test_freeze_and_state_dict_roundtrip():
    q = fk.FactorizedQuantizer(num_codebooks=2, codebook_size=32, codebook_dim=4, freeze_codebook=True)
    assert not q.codebooks.requires_grad
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    q(z).loss.backward()
    assert q.codebooks.grad is None and z.grad is not None
    q.train()
    q(z)
    q2 = fk.FactorizedQuantizer(num_codebooks=2, codebook_size=32, codebook_dim=4)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2.codebooks, q.codebooks) and torch.equal(q2.last_used, q.last_used)
    assert torch.equal(q2(z).indices, q(z).indices)


def test_no_l2_normalize():
    q = fk.FactorizedQuantizer(num_codebooks=2, codebook_size=20, codebook_dim=3, l2_normalize=False)
    z = torch.randn(5, 6)
    quantized, indices, _ = q(z)
    ref_codes, ref_idx = fk.reference.nearest_code(z.view(5, 2, 3), q.codebooks.detach(), False)
    assert torch.equal(indices, ref_idx)
    torch.testing.assert_close(quantized, ref_codes.view(5, 6))


# -- bad input -----------------------------------------------------------------------------------
@pytest.fixture
def q():
    return fk.FactorizedQuantizer(num_codebooks=2, codebook_size=16, codebook_dim=4)


def test_bad_rank(q):
    with pytest.raises(ValueError, match="shape"):
        q(torch.randn(8), )


def test_channel_mismatch(q):
    with pytest.raises(ValueError, match=r"num_codebooks \* codebook_dim = 2 \* 4 = 8"):
        q(torch.randn(2, 9, 3, 3))


def test_bad_dtype(q):
    with pytest.raises(TypeError, match="dtype"):
        q(torch.randint(0, 3, (2, 8, 3, 3)))
    with pytest.raises(TypeError, match="torch.Tensor"):
        q([[1.0] * 8])


def test_nan_and_inf(q):
    z = torch.randn(2, 8, 3, 3)
    z[0, 1, 2, 2] = float("nan")
    z[1, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite.*in 2 of 2 rows"):
        q(z)


def test_nan_in_codebooks(q):
    with torch.no_grad():
        q.codebooks[1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="codebooks has non-finite.*in 1 of 32 rows"):
        q(torch.randn(2, 8, 3, 3))


def test_one_finite_scan_per_step(monkeypatch):
    """A training step scans its inputs for NaN/Inf once (one sync for z and the codebooks), not
    once per op: the ops are called with check_finite=False; the per-row detail runs only to word
    an error."""
    from fqgan_kernels import _validate

    def detail(*args, **kwargs):
        raise AssertionError("the error-wording scan ran on finite inputs")

    scans = []
    finite = _validate.finite

    def counting(*named, enabled=None):
        if _validate.check_finite_enabled(enabled):
            scans.append([name for name, _, _ in named])
        return finite(*named, enabled=enabled)

    monkeypatch.setattr(_validate, "_first_non_finite", detail)
    monkeypatch.setattr(_validate, "finite", counting)
    q = fk.FactorizedQuantizer(num_codebooks=3, codebook_size=64, codebook_dim=8, entropy_weight=0.03,
                               disentangle_weight=0.1)
    _, _, loss = q(torch.randn(2, 24, 4, 4))
    loss.backward()
    assert scans == [["z", "codebooks"]]


def test_empty_batch(q):
    with pytest.raises(ValueError, match="empty batch"):
        q(torch.randn(0, 8, 3, 3))


def test_device_mismatch(q):
    with pytest.raises(ValueError, match="meta"):
        q(torch.randn(2, 8, 3, 3, device="meta"))


@pytest.mark.parametrize("scan", [True, False], ids=["scan-on", "scan-off"])
def test_decode_out_of_range(q, scan):
    """The range check of decode_indices is always on: with the NaN scan off too, an index >= K must
    not read a code of the next sub-codebook."""
    from fqgan_kernels import _validate

    _validate.set_check_finite(scan)
    try:
        idx = torch.zeros(1, 2, 2, 2, dtype=torch.long)
        idx[0, 0, 1, 1] = 16  # in the first sub-codebook: flat index 16 is code 0 of the second
        with pytest.raises(ValueError, match=r"indices has 1 entries outside \[0, 16\); first at index "
                                             r"\(0, 0, 1, 1\): value 16"):
            q.decode_indices(idx)
        idx[0, 0, 1, 1] = -1
        with pytest.raises(ValueError, match="value -1"):
            q.decode_indices(idx)
    finally:
        _validate.set_check_finite(True)
    with pytest.raises(ValueError, match="k=2"):
        q.decode_indices(torch.zeros(1, 3, 2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        q.decode_indices(torch.zeros(1, 2, 2, 2))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="num_codebooks"):
        fk.FactorizedQuantizer(num_codebooks=0)
    with pytest.raises(TypeError, match="entropy_weight"):
        fk.FactorizedQuantizer(entropy_weight="0.1")
    with pytest.raises(ValueError, match="entropy_temperature"):
        fk.FactorizedQuantizer(entropy_temperature=0.0)
    # non-finite weights and temperatures: a NaN weight used to give a NaN loss, and entropy_weight=nan
    # silently switched the entropy term off (nan > 0 is False)
    for name in ("commitment_weight", "codebook_weight", "entropy_weight", "disentangle_weight",
                 "entropy_temperature"):
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match=f"{name} must be a finite number"):
                fk.FactorizedQuantizer(**{name: bad})


def test_torch_compile_fullgraph_training_step():
    q = fk.FactorizedQuantizer(num_codebooks=2, codebook_size=256, codebook_dim=8, entropy_weight=0.03,
                               disentangle_weight=0.1).train()
    z = torch.randn(2, 16, 4, 4, requires_grad=True)
    eager = q(z, return_loss_breakdown=True)
    compiled = torch.compile(q, fullgraph=True, backend="eager")(z, return_loss_breakdown=True)
    assert torch.equal(compiled.indices, eager.indices)
    torch.testing.assert_close(compiled.loss, eager.loss)
    compiled.loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_training_step_matches_reference_backend(backend):
    """The FQGAN configuration (k = 3, K = 16384, D = 8, entropy and disentanglement on) on the GPU:
    indices, losses and gradients of the fused backends against backend='reference' in float32."""
    torch.manual_seed(0)
    q = fk.FactorizedQuantizer(num_codebooks=3, codebook_size=16384, codebook_dim=8, entropy_weight=0.03,
                               disentangle_weight=0.1).cuda().train()
    z = torch.randn(4, 24, 16, 16, device="cuda")
    outs = []
    for name in (backend, "reference"):
        q.backend = name
        q.zero_grad()
        zz = z.clone().requires_grad_()
        out = q(zz, return_loss_breakdown=True)
        g = torch.randn(out.quantized.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        (out.loss + (out.quantized * g).sum()).backward()
        outs.append((out, zz.grad, q.codebooks.grad.clone()))
    (a, gz_a, ge_a), (b, gz_b, ge_b) = outs
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.quantized, b.quantized)
    torch.testing.assert_close(gz_a, gz_b, rtol=1e-3, atol=1e-4 * gz_b.abs().max().item())
    torch.testing.assert_close(ge_a, ge_b, rtol=1e-3, atol=1e-4 * ge_b.abs().max().item())
