"""Training losses of the FQGAN tokenizer, as showlab/FQGAN ``tokenizer/vq_loss.py``
(``VQLoss_dual_codebook`` / ``VQLoss_triple_codebook``, from LlamaGen / taming).

Small named functions (pixel loss, GAN losses, adopt_weight, adaptive weight, InfoNCE) and one
:class:`TokenizerLoss` module that a training loop calls twice per step:
``generator_loss(images, output, step, last_layer)`` and ``discriminator_loss(images, recon, step)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fqgan_kernels as fk
from fqgan.runtime.errors import UsageError, UsageTypeError

from .config import TokenizerConfig, TokenizerLossConfig
from .discriminator import PatchGANDiscriminator
from .lpips import LPIPS
from .model import TokenizerOutput

__all__ = [
    "DiscriminatorLoss",
    "GeneratorLoss",
    "TokenizerLoss",
    "adaptive_weight",
    "adopt_weight",
    "hinge_d_loss",
    "hinge_gen_loss",
    "info_nce",
    "non_saturating_d_loss",
    "non_saturating_d_loss_llamagen",
    "non_saturating_gen_loss",
    "non_saturating_gen_loss_llamagen",
    "reconstruction_loss",
    "vanilla_d_loss",
]


def reconstruction_loss(inputs: Tensor, reconstructions: Tensor, kind: str = "l2") -> Tensor:
    """``F.mse_loss`` (``"l2"``) or ``F.l1_loss`` (``"l1"``) of the images, mean over all elements."""
    if kind == "l2":
        return F.mse_loss(inputs, reconstructions)
    if kind == "l1":
        return F.l1_loss(inputs, reconstructions)
    raise UsageError(f"reconstruction loss must be 'l1' or 'l2', got {kind!r}")


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """``0.5 * (mean(softplus(-real)) + mean(softplus(fake)))``."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def non_saturating_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """``0.5 * (BCE(real, 1) + BCE(fake, 0))`` with logits, the textbook form (equals :func:`vanilla_d_loss`)."""
    return 0.5 * (F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real))
                  + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake)))


def non_saturating_d_loss_llamagen(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """LlamaGen / FQGAN ``non_saturating_d_loss`` verbatim in effect: it calls
    ``binary_cross_entropy_with_logits(ones_like(x), x)``, i.e. with *input* and *target* swapped:
    ``0.5 * (mean(-real * log s(1) - (1 - real) * log(1 - s(1))) + mean(-fake * 0 - ... ))``, s the
    sigmoid -- linear in the logits. Kept for reproducing runs that selected it."""
    ones, zeros = torch.ones_like(logits_real), torch.zeros_like(logits_fake)
    return 0.5 * (F.binary_cross_entropy_with_logits(ones, logits_real)
                  + F.binary_cross_entropy_with_logits(zeros, logits_fake))


def hinge_gen_loss(logits_fake: Tensor) -> Tensor:
    """``-mean(fake)``."""
    return -logits_fake.mean()


def non_saturating_gen_loss(logits_fake: Tensor) -> Tensor:
    """``BCE(fake, 1)`` with logits = ``mean(softplus(-fake))``."""
    return F.binary_cross_entropy_with_logits(logits_fake, torch.ones_like(logits_fake))


def non_saturating_gen_loss_llamagen(logits_fake: Tensor) -> Tensor:
    """LlamaGen / FQGAN ``non_saturating_gen_loss``: ``BCE_with_logits(input=ones, target=fake)``
    (arguments swapped, see :func:`non_saturating_d_loss_llamagen`)."""
    return F.binary_cross_entropy_with_logits(torch.ones_like(logits_fake), logits_fake)


_DISC_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss, "non-saturating": non_saturating_d_loss,
                "non-saturating-llamagen": non_saturating_d_loss_llamagen}
_GEN_LOSSES = {"hinge": hinge_gen_loss, "non-saturating": non_saturating_gen_loss,
               "non-saturating-llamagen": non_saturating_gen_loss_llamagen}


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``value`` before step ``threshold`` (the discriminator start), else ``weight``."""
    return value if global_step < threshold else weight


def adaptive_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor) -> Tensor:
    """``clamp(||d nll / d W|| / (||d g / d W|| + 1e-4), 0, 1e4)``, detached, W = ``last_layer``
    (taming / LlamaGen ``calculate_adaptive_weight``; nll = weighted pixel + perceptual loss)."""
    if not isinstance(last_layer, Tensor) or not last_layer.requires_grad:
        raise UsageError("the adaptive GAN weight needs last_layer: the decoder's last weight with requires_grad "
                         "(pass model.last_layer)")
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(weight, 0.0, 1e4).detach()


def info_nce(predicted: Tensor, target: Tensor) -> Tensor:
    """Batch InfoNCE of FQGAN's semantic loss: with ``p``, ``t`` the L2-normalised rows of
    ``predicted`` ``[B, W]`` and ``sg[target]`` ``[B, W]``, ``-mean_b log(exp(p_b . t_b) / sum_c exp(p_b . t_c))``
    (temperature 1). Equals the official ``(s @ t.T).exp()`` / row-sum form; unlike it, B = 1 works
    (the loss is then 0: the official ``squeeze()`` breaks there)."""
    if predicted.dim() != 2 or target.dim() != 2 or predicted.shape != target.shape:
        raise UsageError(f"predicted and target must both be [B, W], got {tuple(predicted.shape)} and "
                         f"{tuple(target.shape)}")
    p = predicted / predicted.norm(dim=-1, keepdim=True)
    t = target.detach() / target.detach().norm(dim=-1, keepdim=True)
    logits = p @ t.t()  # [B, B]
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


class GeneratorLoss(NamedTuple):
    """Every term of the generator loss, each weighted as it enters ``loss``."""

    loss: Tensor  # () the sum to backpropagate
    reconstruction: Tensor  # () reconstruction_weight * pixel loss
    perceptual: Tensor  # () perceptual_weight * mean LPIPS (0 when perceptual_weight = 0)
    adversarial: Tensor  # () adaptive_weight * disc_weight * gen_adv_loss (0 before disc_start)
    quantizer: fk.LossBreakdown  # the quantizer's weighted terms (the model output's ``losses``)
    semantic: Tensor  # (P,) semantic_weight * InfoNCE per feature predictor (P = 0: empty)
    adaptive_weight: Tensor  # () 1 when disc_adaptive_weight is off; 0 while the discriminator is off
    disc_weight: Tensor  # () disc_weight at this step (0 before disc_start)


class DiscriminatorLoss(NamedTuple):
    loss: Tensor  # () disc_weight(step) * disc_loss(logits_real, logits_fake)
    logits_real: Tensor  # () mean logit on the real images, no grad
    logits_fake: Tensor  # () mean logit on the reconstructions, no grad
    disc_weight: Tensor  # ()


class TokenizerLoss(nn.Module):
    """The FQGAN tokenizer's training losses: pixel, LPIPS, PatchGAN, the quantizer's terms, InfoNCE.

    :param config: loss options (:class:`TokenizerLossConfig`; defaults = the released training)
    :param tokenizer: the tokenizer's config (for its feature predictors; ``None``: no semantic loss)
    :param teachers: the frozen teachers of the feature predictors, ``{sub-codebook index: teacher}`` or a
        sequence in ``tokenizer.semantic_codebooks`` order (:func:`fqgan.tokenizer.teachers.load_teachers`);
        required when ``semantic_weight > 0`` and the tokenizer has feature predictors
    :param lpips: a ready :class:`LPIPS`; else built by :meth:`LPIPS.from_files` from
        ``vgg16_weights`` / ``lpips_weights`` (or their environment variables) when ``perceptual_weight > 0``

    Submodules: ``discriminator`` (the only trainable part: give its parameters to the discriminator
    optimizer, save its ``state_dict``), ``perceptual`` (frozen LPIPS or None), ``teachers`` (frozen).
    Put the module in training mode during training, as the official loop does (LPIPS dropout and the
    discriminator's BatchNorm batch statistics depend on it).
    """

    def __init__(self, config: TokenizerLossConfig | None = None, tokenizer: TokenizerConfig | None = None, *,
                 teachers: Mapping[int, nn.Module] | Sequence[nn.Module] | None = None,
                 lpips: LPIPS | None = None, vgg16_weights: str | os.PathLike | None = None,
                 lpips_weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.config = c = config if config is not None else TokenizerLossConfig()
        if not isinstance(c, TokenizerLossConfig):
            raise UsageTypeError(f"config must be a TokenizerLossConfig, got {type(c).__name__}")
        self.discriminator = PatchGANDiscriminator(c.disc_in_channels, c.disc_dim, c.disc_num_layers)
        self.disc_loss_fn = _DISC_LOSSES[c.disc_loss]
        self.gen_loss_fn = _GEN_LOSSES[c.gen_loss]
        if c.perceptual_weight > 0:
            self.perceptual = lpips if lpips is not None else LPIPS.from_files(vgg16_weights, lpips_weights,
                                                                               use_dropout=c.lpips_dropout)
        else:
            self.perceptual = None
        self.semantic_codebooks = tokenizer.semantic_codebooks if tokenizer is not None else ()
        self.teachers = nn.ModuleDict()
        if self.semantic_codebooks and c.semantic_weight > 0:
            if teachers is None:
                raise UsageError(f"the tokenizer has feature predictors on sub-codebooks "
                                 f"{list(self.semantic_codebooks)} and "
                                 f"semantic_weight = {c.semantic_weight}: pass teachers= "
                                 "(fqgan.tokenizer.teachers.load_teachers(config)) or set semantic_weight=0")
            if not isinstance(teachers, Mapping):
                teachers = list(teachers)
                if len(teachers) != len(self.semantic_codebooks):
                    raise UsageError(f"{len(teachers)} teachers for {len(self.semantic_codebooks)} feature predictors "
                                     f"(sub-codebooks {list(self.semantic_codebooks)})")
                teachers = dict(zip(self.semantic_codebooks, teachers))
            for i in self.semantic_codebooks:
                if i not in teachers:
                    raise UsageError(f"no teacher for the feature predictor of sub-codebook {i}")
                width = getattr(teachers[i], "hidden_size", None)
                if width is not None and width != tokenizer.feat_pred_dims[i]:
                    raise UsageError(f"the teacher of sub-codebook {i} has hidden size {width} but its feature "
                                     f"predictor predicts {tokenizer.feat_pred_dims[i]}-d features")
                self.teachers[str(i)] = teachers[i]

    def disc_weight(self, step: int) -> float:
        """``disc_weight`` from step ``disc_start`` on, 0 before (official ``adopt_weight``)."""
        return adopt_weight(self.config.disc_weight, step, threshold=self.config.disc_start)

    def discriminator_active(self, step: int) -> bool:
        """Whether the GAN terms are on at ``step`` (a loop may skip the discriminator step before)."""
        return self.disc_weight(step) > 0

    def _frozen_discriminator(self, images: Tensor) -> Tensor:
        # The generator step needs D's gradient w.r.t. its input only: run it on detached parameters, so
        # it neither fills D's .grad nor needs D's DDP wrapper (buffers -- BatchNorm statistics -- are the
        # module's own, updated as in the official generator step).
        disc = getattr(self.discriminator, "module", self.discriminator)
        params = {name: p.detach() for name, p in disc.named_parameters()}
        return torch.func.functional_call(disc, params, (images,))

    def generator_loss(self, images: Tensor, output: TokenizerOutput, step: int,
                       last_layer: Tensor | None = None) -> GeneratorLoss:
        """The generator (tokenizer) loss of one step.

        :param images: the input images ``[B, 3, H, W]`` in [-1, 1]
        :param output: ``model(images)``
        :param step: the global step, counted from 1 as the official loop (``train_steps + 1``)
        :param last_layer: ``model.last_layer``; needed when ``disc_adaptive_weight``
        """
        c = self.config
        if not isinstance(output, TokenizerOutput):
            raise UsageTypeError(f"output must be the TokenizerOutput of the model's forward, got "
                                 f"{type(output).__name__}")
        recon = output.reconstruction
        if images.shape != recon.shape:
            raise UsageError(f"images {tuple(images.shape)} and reconstruction {tuple(recon.shape)} differ in shape")
        images, recon = images.contiguous(), recon.contiguous()
        rec = reconstruction_loss(images, recon, c.reconstruction_loss)
        zero = rec.new_zeros(())
        p_loss = self.perceptual(images, recon).mean() if self.perceptual is not None else zero

        semantic = []
        for i, predicted in zip(self.semantic_codebooks, output.semantic_features):
            if str(i) in self.teachers:
                semantic.append(c.semantic_weight * info_nce(predicted, self.teachers[str(i)](images)))
        semantic_t = torch.stack(semantic) if semantic else rec.new_zeros((0,))

        disc_w = self.disc_weight(step)
        if disc_w > 0:
            g_loss = self.gen_loss_fn(self._frozen_discriminator(recon))
            if c.disc_adaptive_weight:
                nll = c.reconstruction_weight * rec + c.perceptual_weight * p_loss
                a_weight = adaptive_weight(nll, g_loss, last_layer)
            else:
                a_weight = rec.new_ones(())
            adversarial = a_weight * disc_w * g_loss
        else:
            # Official: D still runs and its term is multiplied by 0; skipping it gives the same loss.
            a_weight = zero if c.disc_adaptive_weight else rec.new_ones(())
            adversarial = zero

        loss = (c.reconstruction_weight * rec + c.perceptual_weight * p_loss + adversarial + output.quantizer_loss
                 + semantic_t.sum())
        return GeneratorLoss(loss, c.reconstruction_weight * rec, c.perceptual_weight * p_loss, adversarial,
                             output.losses, semantic_t, a_weight, rec.new_tensor(disc_w))

    def discriminator_loss(self, images: Tensor, reconstructions: Tensor, step: int,
                           discriminator: nn.Module | None = None) -> DiscriminatorLoss:
        """The discriminator loss of one step: ``disc_weight(step) * disc_loss(D(x), D(sg[x_hat]))``; D runs
        on the real and the reconstructed batch in two calls (separate BatchNorm statistics, as official).
        Nothing reaches the tokenizer (both inputs are detached).

        :param discriminator: the module to run (e.g. a DDP wrapper of ``self.discriminator``); default it
        """
        if images.shape != reconstructions.shape:
            raise UsageError(f"images {tuple(images.shape)} and reconstructions {tuple(reconstructions.shape)} "
                             "differ in shape")
        disc = discriminator if discriminator is not None else self.discriminator
        logits_real = disc(images.contiguous().detach())
        logits_fake = disc(reconstructions.contiguous().detach())
        w = self.disc_weight(step)
        loss = w * self.disc_loss_fn(logits_real, logits_fake)
        return DiscriminatorLoss(loss, logits_real.detach().mean(), logits_fake.detach().mean(),
                                 logits_real.new_tensor(w))
