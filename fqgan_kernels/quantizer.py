"""``FactorizedQuantizer``: FQGAN's k sub-codebook vector quantizer as one module.

Equals k LlamaGen/FQGAN ``VectorQuantizer``s applied to the k channel groups of z, plus FQGAN's
disentanglement loss, with the nearest-code search, the streaming entropy loss and the fused
codebook/commitment/disentanglement losses in the kernels of this package, and the codebook
statistics (counts, perplexity, usage) on the device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _common, _usage, _validate
from .entropy_loss import entropy_loss
from .nearest_code import nearest_code
from .outputs import LossBreakdown, QuantizerOutput, QuantizerOutputWithBreakdown
from .vq_losses import vq_losses

__all__ = ["FactorizedQuantizer"]

_NEVER = -(2**62)  # last_used of a code never chosen


def _number(name: str, value: object, minimum: float = 0.0, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {minimum}, got {value}")
    return float(value)


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class FactorizedQuantizer(nn.Module):
    """k independent sub-codebooks (FQGAN-Dual k=2, Triple k=3), each ``[K, D]``.

    ``z`` of ``k*D`` channels is split into k groups of D; group i is quantised against codebook i
    (L2-normalised, nearest code, straight-through); the loss is, as in FQGAN's training,
    ``sum_i (codebook_i + commitment_i + entropy_i) + disentangle``.

    :param num_codebooks: k
    :param codebook_size: K codes per sub-codebook
    :param codebook_dim: D
    :param l2_normalize: normalise z and codes (FQGAN/LlamaGen ``codebook_l2_norm=True``)
    :param commitment_weight: beta (0.25)
    :param codebook_weight: weight of ``mean((zq - sg[z])^2)`` (1.0)
    :param entropy_weight: FQGAN ``entropy_loss_ratio`` (0.03 in its training; 0 disables)
    :param entropy_temperature: T of the entropy loss (0.01)
    :param disentangle_weight: FQGAN ``disentanglement_ratio`` (0.1 in its training; 0 disables)
    :param usage_window: training steps over which ``breakdown.usage`` counts a code as used
    :param channel_first: ``True`` (default): z is ``[B, k*D, *spatial]`` whatever its rank (a 3-D
        ``[B, k*D, L]`` included); ``False``: ``[..., k*D]``. No guessing from the rank: a z whose
        channel axis does not hold ``k*D`` channels is an error naming both layouts.
    :param freeze_codebook: keep the codebooks fixed (no gradient)
    :param distributed: with ``torch.distributed`` initialised (world size > 1), use global-batch
        statistics in training mode: the entropy loss's mean probability over all ranks
        (differentiable all-reduce, see fqgan_kernels/entropy_loss.py for how this differs from
        FQGAN's per-rank form) and the code counts all-reduced before they update ``last_used``,
        ``perplexity`` and ``usage`` (one collective per training step, which every rank runs under
        DDP; every rank then holds the same ``last_used``). In eval mode nothing is all-reduced (a
        forward on one rank alone, e.g. evaluation on rank 0, must not wait for the others): the
        breakdown's perplexity is then this rank's. ``False``: per rank always.
    :param backend: kernel backend (``auto``, ``reference``, ``cpu``, ``triton``, ``cuda``)

    Returns ``(quantized, indices, loss)``, or with ``return_loss_breakdown=True`` a fourth item,
    a :class:`LossBreakdown`. Codebook statistics live on the device and never sync with the host.

    Cost of a training step (entropy on): the codebooks are swept 5 times over the N x K tile
    space, never materialised -- 1 nearest-code search, 2 entropy forward sweeps (row log-sum-exp
    and entropy; column sums of p), 2 entropy backward sweeps (grad z; grad codebooks). The
    nearest-code backward is a scatter of N*k rows, and the codebook, commitment and
    disentanglement losses take one pass over z and the codes forward and one backward
    (:func:`fqgan_kernels.vq_losses`), no codebook sweep. Without the entropy loss (or in eval):
    1 sweep. Extra memory O(k * (N + K)) besides the N x k x D activations.
    """

    def __init__(self, num_codebooks: int = 2, codebook_size: int = 16384, codebook_dim: int = 8,
                 l2_normalize: bool = True, commitment_weight: float = 0.25, codebook_weight: float = 1.0,
                 entropy_weight: float = 0.0, entropy_temperature: float = 0.01,
                 disentangle_weight: float = 0.0, usage_window: int = 100,
                 channel_first: bool = True, freeze_codebook: bool = False,
                 distributed: bool = True, backend: str = "auto") -> None:
        super().__init__()
        self.num_codebooks = _count("num_codebooks", num_codebooks)
        self.codebook_size = _count("codebook_size", codebook_size)
        self.codebook_dim = _count("codebook_dim", codebook_dim)
        self.l2_normalize = bool(l2_normalize)
        self.commitment_weight = _number("commitment_weight", commitment_weight)
        self.codebook_weight = _number("codebook_weight", codebook_weight)
        self.entropy_weight = _number("entropy_weight", entropy_weight)
        self.entropy_temperature = _number("entropy_temperature", entropy_temperature, strict=True)
        self.disentangle_weight = _number("disentangle_weight", disentangle_weight)
        self.usage_window = _count("usage_window", usage_window)
        self.channel_first = _layout(channel_first)
        if not isinstance(distributed, bool):
            raise TypeError(f"distributed must be a bool, got {type(distributed).__name__}")
        self.distributed = distributed
        self.backend = backend

        k, K, D = self.num_codebooks, self.codebook_size, self.codebook_dim
        weight = torch.empty(k, K, D).uniform_(-1.0 / K, 1.0 / K)  # LlamaGen/FQGAN init
        if self.l2_normalize:
            weight = _common.l2_normalize(weight)
        self.codebooks = nn.Parameter(weight)
        if freeze_codebook:
            self.freeze_codebook()
        # Usage without host syncs: the last training step at which each code was chosen.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_used", torch.full((k, K), _NEVER, dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"num_codebooks={self.num_codebooks}, codebook_size={self.codebook_size}, "
                f"codebook_dim={self.codebook_dim}, l2_normalize={self.l2_normalize}, "
                f"commitment_weight={self.commitment_weight}, entropy_weight={self.entropy_weight}, "
                f"disentangle_weight={self.disentangle_weight}, backend={self.backend!r}")

    def freeze_codebook(self, frozen: bool = True) -> FactorizedQuantizer:
        """Stop (or restart, with ``frozen=False``) training the codebooks."""
        self.codebooks.requires_grad_(not frozen)
        return self

    def normalized_codebooks(self) -> Tensor:
        """The codebooks as used for lookup: ``(k, K, D)``, L2-normalised when ``l2_normalize``."""
        return _common.l2_normalize(self.codebooks) if self.l2_normalize else self.codebooks

    # -- layout -----------------------------------------------------------------------------
    def _check_input(self, z: Tensor) -> bool:
        _validate.tensor(z, "z")
        _validate.float_dtype(z, "z")
        cf = self.channel_first
        need = self.num_codebooks * self.codebook_dim
        layout = "[B, k*D, *spatial] (channel_first=True)" if cf else "[..., k*D] (channel_first=False)"
        if z.dim() < 2:
            raise ValueError(f"z must be {layout}, got shape {tuple(z.shape)}")
        channels = z.shape[1] if cf else z.shape[-1]
        if channels != need:
            other = "False" if cf else "True"
            raise ValueError(f"z has shape {tuple(z.shape)}: as {layout} it has {channels} channels, but "
                             f"num_codebooks * codebook_dim = {self.num_codebooks} * {self.codebook_dim} = "
                             f"{need}; pass channel_first={other} if z is laid out the other way")
        if z.numel() == 0:
            raise ValueError(f"z is an empty batch (shape {tuple(z.shape)})")
        if z.device != self.codebooks.device:
            raise ValueError(f"z is on {z.device} but the codebooks are on {self.codebooks.device}")
        return cf

    def _to_tokens(self, z: Tensor, cf: bool) -> Tensor:
        if cf:
            z = z.movedim(1, -1)
        return z.reshape(-1, self.num_codebooks, self.codebook_dim)  # (N, k, D)

    def _from_tokens(self, x: Tensor, shape: torch.Size, cf: bool) -> Tensor:
        if cf:
            spatial = (shape[0], *shape[2:])
            return x.reshape(*spatial, -1).movedim(-1, 1)
        return x.reshape(*shape[:-1], -1)

    def _indices_shape(self, idx: Tensor, shape: torch.Size, cf: bool) -> Tensor:
        if cf:
            return idx.reshape(shape[0], *shape[2:], self.num_codebooks).movedim(-1, 1)
        return idx.reshape(*shape[:-1], self.num_codebooks)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, z: Tensor, return_loss_breakdown: bool = False):
        """Quantise ``z``. See the class docstring for shapes and the loss."""
        cf = self._check_input(z)
        # The step's only NaN/Inf scan (FQGAN_KERNELS_CHECK_FINITE=0 skips it; on CUDA it is a
        # device-side assert): the ops below are told the inputs are checked (check_finite=False).
        _validate.finite(("z", z, 1), ("codebooks", self.codebooks, 2))
        shape = z.shape
        backend, checked = self.backend, {"check_finite": False}
        with torch.autocast(device_type=z.device.type, enabled=False):
            zt = self._to_tokens(z, cf).float()  # (N, k, D); the quantizer works in fp32 like FQGAN
            codebooks = self.codebooks.float()
            zn = _common.l2_normalize(zt) if self.l2_normalize else zt
            codes, idx = nearest_code(zn.detach(), codebooks, self.l2_normalize, backend=backend, **checked)
            quantized = _common.straight_through(zn, codes)

            # Fused codebook / commitment / disentanglement losses.
            dis_weight = self.disentangle_weight if self.num_codebooks > 1 else 0.0
            codebook, commitment, disentangle = vq_losses(
                zn, codes, codebook_weight=self.codebook_weight, commitment_weight=self.commitment_weight,
                disentangle_weight=dis_weight, backend=backend, **checked)
            if self.training and self.entropy_weight > 0:
                en = _common.l2_normalize(codebooks) if self.l2_normalize else codebooks
                entropy = self.entropy_weight * entropy_loss(
                    zn, en, self.entropy_temperature, l2_normalize=False, distributed=self._global_stats(),
                    backend=backend, **checked)
            else:
                entropy = torch.zeros_like(codebook)
            loss = (codebook + commitment + entropy).sum() + disentangle

        counts = self._update_usage(idx)
        out_q = self._from_tokens(quantized, shape, cf).to(z.dtype)
        out_idx = self._indices_shape(idx, shape, cf)
        if not return_loss_breakdown:
            return QuantizerOutput(out_q, out_idx, loss)
        with torch.no_grad():
            perplexity = _usage.perplexity(counts)
            usage = self.codebook_usage()
        breakdown = LossBreakdown(codebook, commitment, entropy, disentangle, perplexity, usage)
        return QuantizerOutputWithBreakdown(out_q, out_idx, loss, breakdown)

    def _global_stats(self) -> bool:
        """Global-batch statistics: ``distributed`` and a process group of more than one rank, in
        training mode only (the points every rank reaches together)."""
        if not (self.distributed and self.training):
            return False
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    @torch.no_grad()
    def _update_usage(self, idx: Tensor) -> Tensor:
        """This step's code counts (k, K) (global over ranks in training with ``distributed``); in
        training also marks the chosen codes as used at the new step. Scatter only: no
        ``torch.unique``, no host sync; under DDP one all-reduce of the counts, so ``last_used``
        stays equal on every rank."""
        counts = _usage.code_counts(idx, self.codebook_size)
        if self._global_stats():
            import torch.distributed as dist

            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        if self.training:
            self.step += 1
            self.last_used.copy_(torch.where(counts > 0, self.step, self.last_used))
        return counts

    @torch.no_grad()
    def codebook_usage(self, window: int | None = None) -> Tensor:
        """(k,) fraction of codes chosen within the last ``window`` training steps (default
        ``usage_window``), on the device; a code chosen at the current step counts."""
        window = self.usage_window if window is None else _count("window", window)
        return _usage.recent_usage(self.step, self.last_used, window)

    # -- decode -----------------------------------------------------------------------------
    def decode_indices(self, indices: Tensor, channel_first: bool | None = None) -> Tensor:
        """Codes for ``indices``: ``[B, k, *spatial] -> [B, k*D, *spatial]`` (channel-first, the
        module's ``channel_first`` unless given) or ``[..., k] -> [..., k*D]``. Equals FQGAN
        ``get_codebook_entry`` per head. Every index must be in ``[0, codebook_size)``; that is always
        checked (on CUDA as a device-side assert, without a sync), since an index past K would read
        a code of the next sub-codebook."""
        _validate.tensor(indices, "indices")
        if indices.dtype not in _validate.INDEX_DTYPES:
            raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
        cf = self.channel_first if channel_first is None else _layout(channel_first)
        k = self.num_codebooks
        axis = 1 if cf else -1
        if indices.dim() < (2 if cf else 1) or indices.shape[axis] != k:
            raise ValueError(f"indices must have k={k} sub-codebooks on dim {axis} "
                             f"({'[B, k, *spatial]' if cf else '[..., k]'}), got shape {tuple(indices.shape)}")
        if indices.device != self.codebooks.device:
            raise ValueError(f"indices are on {indices.device} but the codebooks are on {self.codebooks.device}")
        _validate.index_range(indices, "indices", self.codebook_size)
        idx = (indices.movedim(1, -1) if cf else indices).long()  # (..., k)
        table = self.normalized_codebooks()  # (k, K, D)
        offsets = torch.arange(k, device=idx.device) * self.codebook_size
        codes = F.embedding(idx + offsets, table.reshape(-1, self.codebook_dim))  # (..., k, D)
        codes = codes.flatten(-2)  # (..., k*D)
        return codes.movedim(-1, 1) if cf else codes


def _layout(channel_first: object) -> bool:
    if not isinstance(channel_first, bool):
        raise TypeError(f"channel_first must be a bool: True ([B, k*D, *spatial]) or False ([..., k*D]), "
                        f"got {channel_first!r}")
    return channel_first
