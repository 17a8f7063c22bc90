"""Frechet Inception Distance: streaming feature statistics and the Frechet distance of two Gaussians.

``FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` (Heusel et al. 2017), computed as
pytorch-fid's ``calculate_frechet_distance`` and the ADM evaluator's ``FIDStatistics.frechet_distance`` (both
TTUR's steps): ``scipy.linalg.sqrtm``; if the product is singular
(non-finite root), ``eps`` is added to both diagonals; an imaginary part above 1e-3 on the
diagonal is an error, a smaller one is dropped.

:class:`FeatureStats` keeps float64 sums (``sum x``, ``sum x x^T``, count) instead of all features,
so memory is ``O(D^2)`` whatever the number of images, and ranks combine by one all-reduce.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fqgan.eval.metrics import _all_reduce_sum
from fqgan.runtime.checkpoint import MissingFileError
from fqgan.runtime.errors import UsageError, UsageTypeError


class FeatureStats:
    """Mean and covariance of feature vectors added batch by batch.

    :param dim: feature size D (2048 for the FID Inception).
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        if dim < 1:
            raise UsageError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: Tensor) -> None:
        """Add features ``[B, D]`` (any float dtype; accumulated in float64)."""
        if not isinstance(features, Tensor) or not features.is_floating_point():
            raise UsageTypeError("features must be a floating-point tensor")
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise UsageError(f"features must have shape [B, {self.dim}], got {list(features.shape)}")
        if not bool(torch.isfinite(features).all()):
            raise UsageError("features contain NaN or Inf values")
        f = features.detach().to(self.sum.device, torch.float64)
        self.count += f.shape[0]
        self.sum += f.sum(0)
        self.sum_outer.addmm_(f.T, f)

    def all_reduce(self) -> None:
        """Sum the statistics of all ranks (no-op without an initialised process group)."""
        for t in (self.count, self.sum, self.sum_outer):
            _all_reduce_sum(t)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mu [D], sigma [D, D])`` as float64 numpy, sigma with the ``n - 1`` denominator (``np.cov``).

        :raises ValueError: fewer than 2 vectors were added.
        """
        n = float(self.count)
        if n < 2:
            raise UsageError(f"need at least 2 feature vectors for a covariance, got {int(n)}")
        mu = self.sum / n
        sigma = (self.sum_outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (see the module docstring).

    :param mu1: ``[D]``; :param sigma1: ``[D, D]`` symmetric PSD; same for the second Gaussian.
    :param eps: diagonal offset used only when ``sigma1 @ sigma2`` has no finite square root.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise UsageError(f"mu1 {mu1.shape} and mu2 {mu2.shape} must be vectors of the same length")
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise UsageError(f"sigma1 {sigma1.shape} and sigma2 {sigma2.shape} must both be ({d}, {d})")
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise UsageError(f"{name} contains NaN or Inf values")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise UsageError(f"Frechet distance: imaginary component {np.max(np.abs(covmean.imag)):.3g} in the "
                             "matrix square root (covariances not positive semi-definite?)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray) -> Path:
    """Write ``mu``, ``sigma`` to an ``.npz`` with keys ``mu`` and ``sigma`` (pytorch-fid's stats format)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "wb") as f:  # a file object keeps numpy from appending a second ".npz"
        np.savez(f, mu=mu, sigma=sigma)
    return p


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(mu, sigma)`` from an ``.npz`` with keys ``mu`` and ``sigma`` (pytorch-fid's ``--save-stats``)."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"FID statistics file not found: {p} (looked for {p.resolve()})")
    with np.load(p) as data:
        if "mu" not in data or "sigma" not in data:
            raise UsageError(f"{p} must hold arrays 'mu' and 'sigma', found {sorted(data.files)}")
        return data["mu"], data["sigma"]
