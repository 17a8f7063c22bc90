"""The reference ops against values derived by hand and against independent NumPy loops written
straight from the formulas (values), with gradients checked by finite differences of those loops.
These pin down the ground truth every kernel test relies on."""

import math

import numpy as np
import pytest
import torch

from fqgan_kernels import _common
from fqgan_kernels import reference as ref


def np_normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_entropy_loss(z, e, T, l2):
    """One sub-codebook, loops over rows: mean_n H(p_n) - H(mean_n p_n), log(avg + 1e-5)."""
    if l2:
        z, e = np_normalize(z), np_normalize(e)
    N, K = z.shape[0], e.shape[0]
    probs = np.zeros((N, K))
    sample_h = 0.0
    for n in range(N):
        a = np.array([-np.sum((z[n] - e[j]) ** 2) / T for j in range(K)])
        m = a.max()
        lse = m + math.log(np.exp(a - m).sum())
        p = np.exp(a - lse)
        probs[n] = p
        sample_h += -np.sum(p * (a - lse))
    avg = probs.mean(0)
    return sample_h / N - (-np.sum(avg * np.log(avg + 1e-5)))


def numeric_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += eps
        xm[i] -= eps
        g[i] = (f(xp) - f(xm)) / (2 * eps)
    return g


# -- nearest code ---------------------------------------------------------------------------------
def test_nearest_code_by_hand():
    e = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])  # k=1, K=3, D=2
    z = torch.tensor([[[0.9, 0.1]], [[0.0, -2.0]], [[-3.0, 0.2]]])
    codes, idx = ref.nearest_code(z, e, l2_normalize=True)
    # (0,-1) is equally far (sqrt 2) from codes 0 and 2: the tie goes to the lowest index.
    assert idx[:, 0].tolist() == [0, 0, 2]
    assert torch.equal(codes[:, 0], e[0, [0, 0, 2]])
    z = torch.tensor([[[0.4, 0.6]]])  # d = 0.72, 0.32, 2.32 without normalisation
    assert ref.nearest_code(z, e, l2_normalize=False).indices.item() == 1


def test_nearest_code_matches_brute_force_loops():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(37, 3, 5, generator=g, dtype=torch.float64)
    e = torch.randn(3, 23, 5, generator=g, dtype=torch.float64)
    for l2 in (True, False):
        codes, idx = ref.nearest_code(z, e, l2)
        zn, en = (np_normalize(z.numpy()), np_normalize(e.numpy())) if l2 else (z.numpy(), e.numpy())
        for n in range(z.shape[0]):
            for i in range(3):
                d = [np.sum((zn[n, i] - en[i, j]) ** 2) for j in range(e.shape[1])]
                assert idx[n, i].item() == int(np.argmin(d))
                np.testing.assert_allclose(codes[n, i].numpy(), en[i, int(np.argmin(d))])


def test_nearest_code_gradient_goes_to_codebooks_only():
    z = torch.randn(9, 2, 4, dtype=torch.float64, requires_grad=True)
    e = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    codes, idx = ref.nearest_code(z, e, l2_normalize=True)
    w = torch.randn_like(codes)
    (codes * w).sum().backward()
    assert z.grad is None or torch.count_nonzero(z.grad) == 0
    # d/de_j of sum_n w_n . normalize(e_j) over rows that chose j: (I - e^ e^T) w_sum / |e|
    for i in range(2):
        for j in range(6):
            wsum = w[:, i][idx[:, i] == j].sum(0)
            ej = e[i, j].detach()
            eh = ej / ej.norm()
            expect = (wsum - eh * (eh @ wsum)) / ej.norm()
            torch.testing.assert_close(e.grad[i, j], expect)


# -- VQ losses ------------------------------------------------------------------------------------
def test_vq_losses_by_hand_and_gradient_paths():
    z = torch.tensor([[[1.0, 2.0]]], dtype=torch.float64, requires_grad=True)
    codes = torch.tensor([[[0.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    cb, commit = ref.vq_losses(z, codes)
    assert cb.item() == pytest.approx(2.5) and commit.item() == pytest.approx(2.5)
    cb.sum().backward()
    # codebook loss trains the codes only: d/dcodes mean((c - z)^2) = 2 (c - z) / 2
    assert codes.grad.tolist() == [[[-1.0, -2.0]]] and (z.grad is None or not z.grad.any())
    codes.grad = None
    commit.sum().backward()
    assert z.grad.tolist() == [[[1.0, 2.0]]] and (codes.grad is None or not codes.grad.any())


def test_straight_through():
    z = torch.randn(5, 2, 3, requires_grad=True)
    codes = torch.randn(5, 2, 3, requires_grad=True)
    out = _common.straight_through(z, codes)
    torch.testing.assert_close(out, codes)
    out.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z)) and codes.grad is None


# -- entropy --------------------------------------------------------------------------------------
def test_entropy_loss_by_hand():
    # T = 1, D = 1, codes {0, 1}, tokens {0, 1}: p = softmax([0, -1]) and its mirror; mean p = 1/2.
    z = torch.tensor([[[0.0]], [[1.0]]], dtype=torch.float64)
    e = torch.tensor([[[0.0], [1.0]]], dtype=torch.float64)
    p = 1 / (1 + math.exp(-1))
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    h_avg = -2 * 0.5 * math.log(0.5 + 1e-5)
    assert ref.entropy_loss(z, e, temperature=1.0, l2_normalize=False).item() == pytest.approx(h - h_avg)


@pytest.mark.parametrize("l2", [True, False])
@pytest.mark.parametrize("T", [0.01, 1.0])
def test_entropy_loss_matches_loops_value_and_gradient(l2, T):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, 2, 3, generator=g, dtype=torch.float64)
    e = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    zt, et = z.clone().requires_grad_(), e.clone().requires_grad_()
    loss = ref.entropy_loss(zt, et, T, l2)
    loss.sum().backward()
    for i in range(2):
        expect = np_entropy_loss(z[:, i].numpy(), e[i].numpy(), T, l2)
        assert loss[i].item() == pytest.approx(expect, rel=1e-9, abs=1e-12)
        gz = numeric_grad(lambda x, i=i: np_entropy_loss(x, e[i].numpy(), T, l2), z[:, i].numpy())
        ge = numeric_grad(lambda x, i=i: np_entropy_loss(z[:, i].numpy(), x, T, l2), e[i].numpy())
        np.testing.assert_allclose(zt.grad[:, i].numpy(), gz, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(et.grad[i].numpy(), ge, rtol=1e-4, atol=1e-6)


def test_entropy_loss_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        ref.entropy_loss(torch.randn(2, 1, 2), torch.randn(1, 3, 2), temperature=0.0)


# -- disentanglement ------------------------------------------------------------------------------
def test_disentangle_by_hand():
    q = torch.tensor([[[2.0, 0.0], [3.0, 3.0]]])  # normalised: (1,0), (1,1)/sqrt2 -> dot^2 = 1/2
    assert ref.disentangle_loss(q).item() == pytest.approx(0.5)
    q3 = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])  # pairs: 1/2, 0, 1/2 -> mean 1/3
    assert ref.disentangle_loss(q3).item() == pytest.approx(1 / 3)
    assert ref.disentangle_loss(torch.randn(4, 1, 3)).item() == 0.0


def test_disentangle_gradient_matches_loops():
    q = torch.randn(7, 3, 4, dtype=torch.float64)

    def np_loss(x):
        x = np_normalize(x)
        pairs = [(0, 1), (0, 2), (1, 2)]
        return np.mean([np.mean(np.sum(x[:, a] * x[:, b], -1) ** 2) for a, b in pairs])

    qt = q.clone().requires_grad_()
    loss = ref.disentangle_loss(qt)
    loss.backward()
    assert loss.item() == pytest.approx(np_loss(q.numpy()))
    np.testing.assert_allclose(qt.grad.numpy(), numeric_grad(np_loss, q.numpy()), rtol=1e-5, atol=1e-8)


# -- usage ----------------------------------------------------------------------------------------
def test_counts_perplexity_usage_by_hand():
    idx = torch.tensor([[0, 3], [1, 3], [0, 3], [1, 3]])
    counts = ref.code_counts(idx, 4)
    assert counts.tolist() == [[2, 2, 0, 0], [0, 0, 0, 4]]
    torch.testing.assert_close(ref.perplexity(counts), torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(ref.codebook_usage(counts), torch.tensor([0.5, 0.25]))


# -- linear + cross-entropy ----------------------------------------------------------------------
def np_ce(logits, t, ignore, smoothing, z_loss):
    V = logits.shape[-1]
    out = np.zeros(len(t))
    for n, tn in enumerate(t):
        if tn == ignore:
            continue
        m = logits[n].max()
        lse = m + math.log(np.exp(logits[n] - m).sum())
        logp = logits[n] - lse
        out[n] = -(1 - smoothing) * logp[tn] - smoothing * logp.sum() / V + z_loss * lse * lse
    return out


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing,z_loss", [(0.0, 0.0), (0.1, 1e-3)])
def test_linear_cross_entropy_matches_loops(reduction, smoothing, z_loss):
    g = torch.Generator().manual_seed(3)
    k, N, H, V = 2, 5, 4, 7
    hidden = torch.randn(k, N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(k, V, H, generator=g, dtype=torch.float64)
    bias = torch.randn(k, V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (k, N), generator=g)
    targets[0, 1] = targets[1, 4] = -100
    out = ref.linear_cross_entropy(hidden, weight, targets, bias, label_smoothing=smoothing,
                                   reduction=reduction, z_loss=z_loss, return_lse=True)
    per_row = np.stack([np_ce(hidden[h].numpy() @ weight[h].numpy().T + bias[h].numpy(),
                              targets[h].tolist(), -100, smoothing, z_loss) for h in range(k)])
    valid = (targets != -100).numpy()
    if reduction == "none":
        np.testing.assert_allclose(out.loss.numpy(), per_row, rtol=1e-10, atol=1e-12)
    else:
        per_head = per_row.sum(1) if reduction == "sum" else per_row.sum(1) / valid.sum(1)
        np.testing.assert_allclose(out.per_head.numpy(), per_head, rtol=1e-10)
        assert out.loss.item() == pytest.approx(per_head.mean())
    assert out.lse.shape == (k, N)


def test_linear_cross_entropy_matches_torch_and_far_mean():
    hidden, weight = torch.randn(3, 8, 6), torch.randn(3, 11, 6)
    targets = torch.randint(0, 11, (3, 8))
    out = ref.linear_cross_entropy(hidden, weight, targets)
    losses = [torch.nn.functional.cross_entropy(hidden[h] @ weight[h].T, targets[h]) for h in range(3)]
    torch.testing.assert_close(out.loss, (losses[0] + losses[1] + losses[2]) / 3.0)  # FAR's head average


def test_linear_cross_entropy_all_ignored_is_nan_like_pytorch():
    hidden = torch.randn(1, 3, 2, requires_grad=True)
    weight = torch.randn(1, 4, 2)
    targets = torch.full((1, 3), -100)
    out = ref.linear_cross_entropy(hidden, weight, targets)
    assert torch.isnan(out.loss)
    assert torch.isnan(torch.nn.functional.cross_entropy(hidden[0] @ weight[0].T, targets[0]))
    assert ref.linear_cross_entropy(hidden, weight, targets, reduction="sum").loss.item() == 0.0


# -- sampling -------------------------------------------------------------------------------------
def test_sampling_by_hand():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    p = np.exp([3.0, 2.0, 1.0, 0.0])
    p /= p.sum()  # 0.644, 0.237, 0.087, 0.032
    u = torch.tensor([0.70])
    assert ref.sample(logits, uniform=u).item() == 1  # cdf 0.644 < 0.70 <= 0.881
    assert ref.sample(logits, uniform=torch.tensor([0.99])).item() == 3
    # top_k=2 keeps {0, 1}: p' = (0.731, 0.269); u=0.70 -> token 0, u=0.8 -> token 1
    assert ref.sample(logits, top_k=2, uniform=u).item() == 0
    assert ref.sample(logits, top_k=2, uniform=torch.tensor([0.8])).item() == 1
    # top_p=0.5: token 0 alone crosses 0.5 -> always 0; top_p=0.7 keeps {0, 1}
    assert ref.sample(logits, top_p=0.5, uniform=torch.tensor([0.99])).item() == 0
    assert ref.sample(logits, top_p=0.7, uniform=torch.tensor([0.99])).item() == 1
    # CFG: uncond + 2 (cond - uncond) = (2, 0); temperature 2 -> (1, 0)
    cond, uncond = torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2)
    q = 1 / (1 + math.exp(-1))
    assert ref.sample(cond, uncond, cfg_scale=2.0, temperature=2.0, uniform=torch.tensor([q - 1e-6])).item() == 0
    assert ref.sample(cond, uncond, cfg_scale=2.0, temperature=2.0, uniform=torch.tensor([q + 1e-6])).item() == 1
    assert p[0] < 0.70 <= p[0] + p[1]


def test_top_k_keeps_ties():
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    kept = ref.top_k_top_p_filter(logits, top_k=1)
    assert torch.isfinite(kept).tolist() == [[False, True, True, False]]
