"""Sampling from FAR: KV-cached trunk and AR head, per-factor CFG, temperature, top-k, top-p.

The loop follows the official ``sample_fq`` (showlab/FQGAN ``autoregressive/models/generate_dual.py``):
for each of the T positions, run the trunk on one new input (position 0: the class embedding; then the
aggregated embedding of the previous position's k sub-tokens), then for each factor i run the AR head
on one slot (slot 0: the trunk state; slot i: the embedding of sub-token i-1), sample sub-token i from
head i, and feed it back. With guidance, the batch holds the B conditional rows and B null-class rows;
both halves receive the conditional half's sampled tokens.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fqgan_kernels as fk

from .model import FAR

Param = float | int | Tensor


def _per_factor(value: Param | Sequence[Param], k: int, name: str) -> list[Param]:
    if isinstance(value, (list, tuple)):
        if len(value) != k:
            raise ValueError(f"{name} has {len(value)} values; give one value or one per factor (k = {k})")
        return list(value)
    return [value] * k


def _check_param(v: Param, name: str, B: int, ok, what: str, integer: bool = False) -> None:
    if isinstance(v, Tensor):
        if v.shape != (B,):
            raise ValueError(f"{name} as a tensor must have shape [B={B}] (one value per row), got {tuple(v.shape)}")
        if integer and v.dtype.is_floating_point:
            raise TypeError(f"{name} must be an integer tensor, got {v.dtype}")
        if B and not bool(ok(v.double()).all()):
            raise ValueError(f"{name} values must be {what}, got {v.tolist()}")
        return
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or (integer and not isinstance(v, numbers.Integral)):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'} or a [B] tensor, got {v!r}")
    if not ok(torch.tensor(float(v), dtype=torch.float64)):
        raise ValueError(f"{name} must be {what}, got {v!r}")


def _guided(scale: Param) -> bool:
    return bool((scale > 1).any()) if isinstance(scale, Tensor) else scale > 1


def _at(v: Param, r: int) -> float | int:
    return v[r].item() if isinstance(v, Tensor) else v


@torch.no_grad()
def generate(model: FAR, labels: Tensor, *, cfg_scale: Param | Sequence[Param] = 1.0,
             temperature: Param | Sequence[Param] = 1.0, top_k: Param | Sequence[Param] = 0,
             top_p: Param | Sequence[Param] = 1.0, seed: int | None = None,
             generator: torch.Generator | None = None, backend: str | None = None) -> Tensor:
    """Sample ``[B, k, T]`` codes (row i: sub-codebook i, T = block_size positions in raster order) for
    class ``labels`` [B], one position at a time with KV caches in the trunk and the AR head.

    Factor i's token is drawn from ``softmax(filter((u + s_i (c - u)) / temperature_i))`` with ``c``/``u``
    the conditional/null-class logits of head i, ``filter`` the top-k then top-p filter of LlamaGen
    (:func:`fqgan_kernels.sample` semantics), by inverse CDF of one uniform number per row and draw.

    Each sampling parameter is one value for all factors or a sequence of k values (one per factor);
    a value is a number or a [B] tensor (one per row).

    :param model: a :class:`~fqgan.generator.FAR` (run in eval mode; its mode is restored after)
    :param labels: [B] integer class ids in [0, num_classes)
    :param cfg_scale: guidance scale s_i >= 1 per factor; 1 = no guidance for that factor (conditional
        logits only). Any s_i > 1 doubles the batch with null-class rows (needs class_dropout_prob > 0).
        The official sampler treats s <= 1 as "off"; s < 1 is rejected here.
    :param temperature: > 0
    :param top_k: >= 0 (0 = off)
    :param top_p: in (0, 1] (1 = off)
    :param seed: seeds a fresh generator on the labels' device: same seed, model, labels and
        parameters -> the same codes
    :param generator: a torch.Generator to draw from instead of ``seed`` (neither: the global RNG)
    :param backend: backend of :func:`fqgan_kernels.sample` (None: auto); ``"reference"`` samples with
        :func:`fqgan_kernels.reference.sample` (sorts over V), which draws the same uniform numbers as the
        fused kernels, so they agree token for token up to float rounding at a CDF boundary
    :returns: [B, k, T] int64 codes
    """
    if not isinstance(model, FAR):
        raise TypeError(f"model must be a fqgan.generator.FAR, got {type(model).__name__}")
    c = model.config
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.dtype.is_floating_point or \
            labels.dtype == torch.bool:
        raise ValueError(f"labels must be a [B] integer tensor of class ids, got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
    B, k, T = labels.shape[0], c.num_factors, c.block_size
    if B and (int(labels.min()) < 0 or int(labels.max()) >= c.num_classes):
        raise ValueError(f"labels must be class ids in [0, num_classes={c.num_classes}), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    scales = _per_factor(cfg_scale, k, "cfg_scale")
    temps = _per_factor(temperature, k, "temperature")
    top_ks = _per_factor(top_k, k, "top_k")
    top_ps = _per_factor(top_p, k, "top_p")
    for i in range(k):
        _check_param(scales[i], "cfg_scale", B, lambda v: (v >= 1) & torch.isfinite(v), ">= 1 and finite (1 = off)")
        _check_param(temps[i], "temperature", B, lambda v: (v > 0) & torch.isfinite(v), "> 0 and finite")
        _check_param(top_ks[i], "top_k", B, lambda v: v >= 0, ">= 0 (0 = off)", integer=True)
        _check_param(top_ps[i], "top_p", B, lambda v: (v > 0) & (v <= 1), "in (0, 1] (1 = off)")
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    device = labels.device
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    guided = [_guided(s) for s in scales]
    use_cfg = any(guided)
    if use_cfg and not c.has_null_class:
        raise ValueError("cfg_scale > 1 needs the null class, but this model has class_dropout_prob = 0")
    for name, p in (("cfg_scale", scales), ("temperature", temps), ("top_k", top_ks), ("top_p", top_ps)):
        for v in p:
            if isinstance(v, Tensor) and v.device != device:
                raise ValueError(f"{name} tensor is on {v.device} but labels are on {device}")

    rows = torch.cat([labels, torch.full_like(labels, c.num_classes)]) if use_cfg else labels  # [R]
    out = torch.empty(B, k, T, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(rows.shape[0], device)
        x = model.class_input(rows.long())  # [R, 1, D]
        for t in range(T):
            slot_in = model.decode_trunk(x, t, cache)  # [R, 1, D]
            tokens = []
            for i in range(k):
                logits = F.linear(model.decode_slot(slot_in, i, cache), model.head[i])  # [R, V]
                cond, uncond = (logits[:B], logits[B:]) if use_cfg else (logits, None)
                uniform = torch.rand(B, generator=generator, device=device, dtype=torch.float64)
                tok = fk.sample(cond, uncond if guided[i] else None, cfg_scale=scales[i], temperature=temps[i],
                                top_k=top_ks[i], top_p=top_ps[i], uniform=uniform, backend=backend)
                out[:, i, t] = tok
                tok = torch.cat([tok, tok]) if use_cfg else tok  # the null rows follow the conditional draw
                tokens.append(tok)
                if i + 1 < k:
                    slot_in = model.slot_input(tok, i)
            if t + 1 < T:
                x = model.token_input(torch.stack(tokens, dim=1))
    finally:
        model.train(was_training)
    return out


def check_generator_tokenizer(generator_config: Any, tokenizer_config: Any) -> None:
    """Raise ValueError unless a FAR (``FARConfig``) and a tokenizer (``TokenizerConfig``) fit together:
    the same k, the generator's vocabulary = the tokenizer's codebook size, and its T = the token grid."""
    g, t = generator_config, tokenizer_config
    if g.num_factors != t.num_codebooks:
        raise ValueError(f"the generator predicts k={g.num_factors} sub-tokens per position but the tokenizer has "
                         f"{t.num_codebooks} sub-codebooks: use the tokenizer whose codes trained the generator")
    if g.vocab_size != t.codebook_size:
        raise ValueError(f"the generator was built for codebook size {g.vocab_size} but the tokenizer's "
                         f"sub-codebooks have {t.codebook_size} codes: use the tokenizer whose codes trained it")
    if g.block_size != t.grid_size ** 2:
        raise ValueError(f"the generator makes {g.block_size} tokens per image but the tokenizer's grid is "
                         f"{t.grid_size}x{t.grid_size} = {t.grid_size ** 2}: use the matching tokenizer")


@torch.no_grad()
def sample_images(generator: nn.Module, tokenizer: nn.Module, labels: Tensor, *, batch_size: int = 32,
                  **sampling: Any) -> Tensor:
    """Images ``[B, 3, H, W]`` in [-1, 1] for class ids ``labels [B]``: FAR codes
    (:func:`generate` with ``sampling`` = cfg_scale, temperature, top_k, top_p, seed)
    decoded by the tokenizer, ``batch_size`` rows at a time."""
    check_generator_tokenizer(generator.config, tokenizer.config)
    seed = sampling.pop("seed", None)
    g = grid = tokenizer.config.grid_size
    out = []
    for start in range(0, labels.shape[0], batch_size):
        chunk = labels[start:start + batch_size]
        s = None if seed is None else seed + start
        codes = generate(generator, chunk, seed=s, **sampling)  # [b, k, T]
        out.append(tokenizer.decode_indices(codes.view(codes.shape[0], codes.shape[1], g, grid)).clamp(-1, 1))
    return torch.cat(out)
