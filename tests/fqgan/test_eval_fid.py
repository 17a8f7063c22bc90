"""fqgan.eval.fid: streaming statistics against numpy, the Frechet distance against closed forms."""

import numpy as np
import pytest
import torch

from fqgan.eval.fid import FeatureStats, frechet_distance, load_stats, save_stats
from fqgan.runtime.checkpoint import MissingFileError


def _spd(d, rng):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _sqrt_psd(a):
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


@pytest.mark.parametrize("dim", [1, 5, 64])
def test_feature_stats_match_numpy_over_uneven_batches(dim):
    feats = torch.rand(23, dim, dtype=torch.float64) * 3 + 1  # away from 0, as pool3 features
    stats = FeatureStats(dim)
    for chunk in torch.split(feats, [1, 7, 15]):
        stats.update(chunk.float() if dim == 5 else chunk)
    mu, sigma = stats.mean_cov()
    ref = feats.float().double().numpy() if dim == 5 else feats.numpy()
    np.testing.assert_allclose(mu, ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.atleast_2d(np.cov(ref, rowvar=False)), rtol=1e-9, atol=1e-12)


def test_feature_stats_bad_input():
    stats = FeatureStats(4)
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        stats.update(torch.rand(2, 3))
    with pytest.raises(TypeError, match="floating"):
        stats.update(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        stats.update(torch.tensor([[0.0, float("nan"), 0.0, 0.0]]))
    stats.update(torch.rand(1, 4))
    with pytest.raises(ValueError, match="at least 2"):
        stats.mean_cov()


def test_frechet_distance_of_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(32), _spd(32, rng)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_distance_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(1)
    d = 16
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_general_covariances():
    # tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2)): a symmetric eigen-decomposition, independent of sqrtm.
    rng = np.random.default_rng(2)
    d = 24
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _spd(d, rng), _spd(d, rng)
    r = _sqrt_psd(s1)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(_sqrt_psd(r @ s2 @ r))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    # symmetric in its two arguments
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_from_rank_deficient_covariances_is_finite():
    # Fewer samples than dimensions: singular covariances, as with a small evaluation set.
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((5, 40)), rng.standard_normal((6, 40)) + 0.5
    fid = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert np.isfinite(fid) and fid > 0


def test_frechet_distance_bad_input():
    mu, sigma = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="same length"):
        frechet_distance(mu, sigma, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        frechet_distance(mu, sigma, mu, np.eye(2))
    with pytest.raises(ValueError, match="sigma2 contains NaN"):
        frechet_distance(mu, sigma, mu, np.full((3, 3), np.nan))


def test_stats_file_roundtrip(tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma = rng.standard_normal(8), _spd(8, rng)
    path = save_stats(tmp_path / "stats.npz", mu, sigma)
    assert path.name == "stats.npz"
    mu2, sigma2 = load_stats(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    with pytest.raises(MissingFileError, match="other.npz"):
        load_stats(tmp_path / "other.npz")
    np.savez(tmp_path / "wrong.npz", mean=mu)
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        load_stats(tmp_path / "wrong.npz")
