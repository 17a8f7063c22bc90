"""fqgan.eval.metrics against independent computations: scikit-image's PSNR/SSIM, numpy histograms."""

import math

import numpy as np
import pytest
import torch

import fqgan_kernels as fk
from fqgan.eval.metrics import SSIM_OFFICIAL, SSIM_STANDARD, CodeUsage, MeanMeter, psnr, ssim

skimage_metrics = pytest.importorskip("skimage.metrics")

# (B, C, H, W): the smallest sizes each window fits in, odd and non-square sizes, the tiny preset's 32x32.
SHAPES = [(1, 3, 11, 11), (2, 3, 13, 29), (3, 3, 32, 32), (1, 1, 17, 12)]


def _pair(shape, seed):
    """Random uint8 images and a noisy copy (correlated, so SSIM is far from 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, shape, generator=g, dtype=torch.int16)
    noise = torch.randint(-40, 41, shape, generator=g, dtype=torch.int16)
    return x.to(torch.uint8), (x + noise).clamp(0, 255).to(torch.uint8)


def _hwc01(t, i):
    return t[i].permute(1, 2, 0).double().numpy() / 255.0


@pytest.mark.parametrize("shape", SHAPES)
def test_psnr_matches_skimage(shape):
    x, y = _pair(shape, 0)
    got = psnr(x, y)
    assert got.dtype == torch.float64 and got.shape == (shape[0],)
    for i in range(shape[0]):
        # The official script: peak_signal_noise_ratio(recon_uint8 / 255, gt in [0, 1]) (data range 1).
        ref = skimage_metrics.peak_signal_noise_ratio(_hwc01(x, i), _hwc01(y, i))
        assert got[i].item() == pytest.approx(ref, rel=1e-12)


def test_psnr_of_identical_images_is_inf():
    x, _ = _pair((2, 3, 8, 8), 1)
    assert torch.isinf(psnr(x, x)).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_ssim_standard_matches_skimage_gaussian(shape):
    x, y = _pair(shape, 2)
    got = ssim(x, y)
    assert got.dtype == torch.float64 and got.shape == (shape[0],)
    for i in range(shape[0]):
        ref = skimage_metrics.structural_similarity(
            _hwc01(x, i), _hwc01(y, i), channel_axis=-1, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=1.0)
        assert got[i].item() == pytest.approx(ref, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_ssim_official_matches_the_fqgan_script_call(shape):
    x, y = _pair(shape, 3)
    got = ssim(x, y, SSIM_OFFICIAL)
    for i in range(shape[0]):
        # reconstruction_vq_ddp_dual.py: structural_similarity(restored, gt, data_range=2.0, channel_axis=-1)
        ref = skimage_metrics.structural_similarity(_hwc01(x, i), _hwc01(y, i), data_range=2.0, channel_axis=-1)
        assert got[i].item() == pytest.approx(ref, rel=1e-10, abs=1e-12)
    assert (got > ssim(x, y, SSIM_STANDARD)).all()  # the doubled data range inflates SSIM


def test_ssim_of_identical_images_is_one():
    x, _ = _pair((2, 3, 16, 16), 4)
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))


def test_metric_bad_input():
    x, y = _pair((1, 3, 16, 16), 5)
    with pytest.raises(TypeError, match="uint8"):
        psnr(x.float(), y)
    with pytest.raises(ValueError, match="same shape"):
        ssim(x, y[..., :15])
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        psnr(x[0], y[0])
    with pytest.raises(ValueError, match="smaller than the 11x11 SSIM window"):
        ssim(x[..., :10, :], y[..., :10, :])


def _numpy_stats(indices, k, size):
    flat = indices.permute(1, 0, 2, 3).reshape(k, -1).numpy()
    usage, ppl = [], []
    for i in range(k):
        codes, counts = np.unique(flat[i], return_counts=True)
        usage.append(len(codes) / size)
        p = counts / counts.sum()
        ppl.append(math.exp(-(p * np.log(p)).sum()))
    return np.array(usage), np.array(ppl)


@pytest.mark.parametrize("k,size", [(1, 7), (2, 64), (3, 1000)])
def test_code_usage_matches_numpy_over_batches(k, size):
    g = torch.Generator().manual_seed(k)
    # skewed codes so that usage < 1 and perplexity < size
    batches = [(torch.randint(0, size, (b, k, 3, 5), generator=g) ** 2 // size).clamp_max(size - 1)
               for b in (2, 1, 3)]
    stats = CodeUsage(k, size)
    for b in batches:
        stats.update(b.to(torch.int32))
    everything = torch.cat(batches)
    torch.testing.assert_close(stats.counts, fk.reference.code_counts(
        everything.permute(0, 2, 3, 1).reshape(-1, k), size))
    usage, ppl = _numpy_stats(everything, k, size)
    np.testing.assert_allclose(stats.usage().numpy(), usage, rtol=1e-6)
    np.testing.assert_allclose(stats.perplexity().numpy(), ppl, rtol=1e-6)


def test_code_usage_bad_input():
    stats = CodeUsage(2, 16)
    with pytest.raises(ValueError, match=r"out of range \[0, 16\)"):
        stats.update(torch.full((1, 2, 2, 2), 16))
    with pytest.raises(ValueError, match="out of range"):
        stats.update(torch.full((1, 2, 2, 2), -1))
    with pytest.raises(ValueError, match=r"\[B, 2, h, w\]"):
        stats.update(torch.zeros(1, 3, 2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        stats.update(torch.zeros(1, 2, 2, 2))
    assert stats.counts.sum() == 0  # nothing was added by the rejected batches


def test_mean_meter():
    m = MeanMeter()
    assert math.isnan(m.mean())
    values = torch.rand(7, dtype=torch.float64)
    m.update(values[:3])
    m.update(values[3:])
    assert m.count == 7 and m.mean() == pytest.approx(values.mean().item(), rel=1e-12)
