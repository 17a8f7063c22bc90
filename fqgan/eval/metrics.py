"""Reconstruction metrics (PSNR, SSIM) and codebook statistics (usage, perplexity), in torch.

PSNR and SSIM take 8-bit images (uint8 tensors ``[B, 3, H, W]``, e.g. from
:func:`fqgan.data.images.to_uint8`) and return one value per image, as FQGAN's
``tokenizer/reconstruction_vq_ddp_dual.py`` does with scikit-image on each image before averaging.
All arithmetic is float64 on the images' device.

Codebook statistics accumulate a code histogram per sub-codebook over a whole evaluation set and
read usage and perplexity from it with ``fk.reference.codebook_usage`` / ``fk.reference.perplexity``.
With ``torch.distributed`` initialised, :meth:`CodeUsage.all_reduce` sums the histograms of all ranks.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

import fqgan_kernels as fk
from fqgan.runtime.errors import UsageError, UsageTypeError


class SSIMSettings(NamedTuple):
    """Settings of :func:`ssim`, named as scikit-image's ``structural_similarity`` arguments.

    ``data_range`` is relative to images scaled to [0, 1] (:func:`ssim` divides uint8 by 255).
    """

    gaussian: bool = True  # Gaussian window (sigma) or uniform win_size x win_size box
    win_size: int = 11
    sigma: float = 1.5
    sample_covariance: bool = False  # scale (co)variances by NP / (NP - 1), NP = win_size**2
    data_range: float = 1.0
    k1: float = 0.01
    k2: float = 0.03


# Wang et al. 2004: 11x11 Gaussian window, sigma 1.5 (scipy's truncation at 3.5 sigma gives 11 taps),
# population (co)variances, data range of the images. skimage: gaussian_weights=True, sigma=1.5,
# use_sample_covariance=False, data_range=1.
SSIM_STANDARD = SSIMSettings()
# What FQGAN's reconstruction script measures: skimage's defaults (7x7 uniform window, sample
# covariance) with data_range=2.0 on images in [0, 1]. The doubled range makes C1, C2 four times the
# standard constants, which raises SSIM; reported separately so that numbers compare with the paper's.
SSIM_OFFICIAL = SSIMSettings(gaussian=False, win_size=7, sample_covariance=True, data_range=2.0)


def _check_uint8_pair(x: Tensor, y: Tensor) -> None:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor):
            raise UsageTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.uint8:
            raise UsageTypeError(f"{name} must be a uint8 image tensor (see fqgan.data.images.to_uint8), got {t.dtype}")
        if t.dim() != 4:
            raise UsageError(f"{name} must have shape [B, C, H, W], got {list(t.shape)}")
    if x.shape != y.shape:
        raise UsageError(f"x {list(x.shape)} and y {list(y.shape)} must have the same shape")
    if x.device != y.device:
        raise UsageError(f"x is on {x.device}, y on {y.device}")


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """``10 * log10(255**2 / mean((x - y)**2))`` per image, float64 ``[B]`` (``inf`` where x == y).

    Equal to scikit-image's ``peak_signal_noise_ratio(x / 255, y / 255)`` (data range 1 for floats in
    [0, 1]), which FQGAN's reconstruction script evaluates per image.

    :param x: uint8 ``[B, C, H, W]``.
    :param y: uint8, same shape and device.
    """
    _check_uint8_pair(x, y)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(255.0**2 / mse)


def _window(settings: SSIMSettings, device: torch.device) -> Tensor:
    n = settings.win_size
    if settings.gaussian:
        # scipy.ndimage.gaussian_filter's kernel: radius int(truncate * sigma + 0.5), normalised taps.
        r = (n - 1) / 2
        t = torch.arange(n, dtype=torch.float64, device=device) - r
        w = torch.exp(-0.5 * (t / settings.sigma) ** 2)
    else:
        w = torch.ones(n, dtype=torch.float64, device=device)
    return w / w.sum()


def _band(length: int, w: Tensor) -> Tensor:
    """``[length, length - n + 1]`` matrix whose column j holds the window at rows j .. j + n - 1."""
    n = w.shape[0]
    out = w.new_zeros(length, length - n + 1)
    cols = torch.arange(length - n + 1, device=w.device)
    for t in range(n):
        out[cols + t, cols] = w[t]
    return out


def _filter_valid(x: Tensor, w: Tensor) -> Tensor:
    """Separable 'valid' filtering of ``x [..., H, W]`` with the 1-D window ``w`` on both axes.

    scikit-image filters with reflect padding, then crops (win_size - 1) // 2 pixels per side
    before averaging, which equals a valid convolution. Done as two float64 matmuls with banded
    matrices: more flops than a depthwise convolution, but 5x faster on CPU (dgemm against torch's
    float64 depthwise path, measured on 32 images of 256 x 256).
    """
    y = x @ _band(x.shape[-1], w)  # [..., H, W - n + 1]
    return _band(x.shape[-2], w).T @ y  # [..., H - n + 1, W - n + 1]


def ssim(x: Tensor, y: Tensor, settings: SSIMSettings = SSIM_STANDARD) -> Tensor:
    """Mean structural similarity per image, float64 ``[B]`` (Wang et al. 2004).

    With ``a = x / 255``, ``b = y / 255``, local means ``mu`` and (co)variances ``s`` under the window
    ``w`` (over channels separately)::

        S = (2 mu_a mu_b + C1) (2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1) (s_a + s_b + C2)),
        C1 = (k1 * data_range)^2, C2 = (k2 * data_range)^2

    averaged over all positions where the window fits inside the image and over channels; equal to
    scikit-image's ``structural_similarity(a, b, channel_axis=-1, ...)`` with the matching settings
    (``gaussian_weights``, ``win_size``, ``sigma``, ``use_sample_covariance``, ``data_range``, ``K1``, ``K2``).

    :param x: uint8 ``[B, C, H, W]``, H and W at least ``settings.win_size``.
    :param y: uint8, same shape and device.
    :param settings: :data:`SSIM_STANDARD` (default) or :data:`SSIM_OFFICIAL` (FQGAN's script).
    """
    _check_uint8_pair(x, y)
    n = settings.win_size
    if n < 1 or n % 2 == 0:
        raise UsageError(f"win_size must be odd and positive, got {n}")
    if min(x.shape[-2:]) < n:
        raise UsageError(f"images of {x.shape[-2]}x{x.shape[-1]} are smaller than the {n}x{n} SSIM window")
    if settings.data_range <= 0:
        raise UsageError(f"data_range must be positive, got {settings.data_range}")
    a = x.double() / 255.0
    b = y.double() / 255.0
    w = _window(settings, x.device)
    mu_a, mu_b, aa, bb, ab = _filter_valid(torch.cat([a, b, a * a, b * b, a * b], 1), w).chunk(5, 1)
    scale = n * n / (n * n - 1) if settings.sample_covariance else 1.0
    var_a = scale * (aa - mu_a * mu_a)
    var_b = scale * (bb - mu_b * mu_b)
    cov = scale * (ab - mu_a * mu_b)
    c1 = (settings.k1 * settings.data_range) ** 2
    c2 = (settings.k2 * settings.data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def _all_reduce_sum(t: Tensor) -> Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class CodeUsage:
    """Code histogram per sub-codebook over an evaluation set: ``counts[i, j]`` = how many tokens of
    sub-codebook ``i`` chose code ``j``, int64 ``[k, K]``.

    :param num_codebooks: k.
    :param codebook_size: K.
    """

    def __init__(self, num_codebooks: int, codebook_size: int, device: torch.device | str = "cpu") -> None:
        if num_codebooks < 1 or codebook_size < 1:
            raise UsageError(f"num_codebooks and codebook_size must be positive, got {num_codebooks}, {codebook_size}")
        self.num_codebooks = num_codebooks
        self.codebook_size = codebook_size
        self.counts = torch.zeros(num_codebooks, codebook_size, dtype=torch.int64, device=device)

    def update(self, indices: Tensor) -> None:
        """Add one batch of token indices ``[B, k, h, w]`` (integer, each in ``[0, K)``)."""
        k, size = self.num_codebooks, self.codebook_size
        if not isinstance(indices, Tensor) or indices.dtype.is_floating_point or indices.dtype == torch.bool \
                or indices.is_complex():
            raise UsageTypeError(f"indices must be an integer tensor, got "
                            f"{indices.dtype if isinstance(indices, Tensor) else type(indices).__name__}")
        if indices.dim() != 4 or indices.shape[1] != k:
            raise UsageError(f"indices must have shape [B, {k}, h, w], got {list(indices.shape)}")
        if indices.numel() == 0:
            return
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= size:
            raise UsageError(f"indices out of range [0, {size}): min {lo}, max {hi}")
        flat = indices.to(self.counts.device, torch.int64).transpose(0, 1).reshape(k, -1)
        offsets = torch.arange(k, device=flat.device).unsqueeze(1) * size
        self.counts += torch.bincount((flat + offsets).reshape(-1), minlength=k * size).view(k, size)

    def all_reduce(self) -> None:
        """Sum the histograms of all ranks (no-op without an initialised process group)."""
        _all_reduce_sum(self.counts)

    def usage(self) -> Tensor:
        """Fraction of each sub-codebook's codes used at least once, float32 ``[k]``."""
        return fk.reference.codebook_usage(self.counts)

    def perplexity(self) -> Tensor:
        """``exp(entropy)`` of each sub-codebook's code histogram, float32 ``[k]`` (1 .. K)."""
        return fk.reference.perplexity(self.counts)


class MeanMeter:
    """Running float64 sum and count of per-item values (e.g. per-image PSNR), reducible across ranks."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.state = torch.zeros(2, dtype=torch.float64, device=device)  # [sum, count]

    def update(self, values: Tensor) -> None:
        """Add values ``[B]``."""
        v = values.detach().to(self.state.device, torch.float64).reshape(-1)
        self.state += torch.stack([v.sum(), v.new_tensor(float(v.numel()))])

    def all_reduce(self) -> None:
        """Sum over all ranks (no-op without an initialised process group)."""
        _all_reduce_sum(self.state)

    @property
    def count(self) -> int:
        return int(self.state[1])

    def mean(self) -> float:
        """Mean of all values added (NaN when none)."""
        total, count = self.state.tolist()
        return total / count if count else math.nan
