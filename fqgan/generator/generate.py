"""Sampling from FAR: KV-cached trunk and AR head, per-factor CFG, temperature, top-k, top-p.

The loop follows the official ``sample_fq`` (showlab/FQGAN ``autoregressive/models/generate_dual.py``):
for each of the T positions, run the trunk on one new input (position 0: the class embedding; then the
aggregated embedding of the previous position's k sub-tokens), then for each factor i run the AR head
on one slot (slot 0: the trunk state; slot i: the embedding of sub-token i-1), sample sub-token i from
head i, and feed it back. With guidance, the batch holds the B conditional rows and B null-class rows;
both halves receive the conditional half's sampled tokens.
"""

from __future__ import annotations

import contextlib
import numbers
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fqgan_kernels as fk
from fqgan.runtime.errors import UsageError, UsageTypeError

from .model import FAR, StaticCache

Param = float | int | Tensor


def _per_factor(value: Param | Sequence[Param], k: int, name: str) -> list[Param]:
    if isinstance(value, (list, tuple)):
        if len(value) != k:
            raise UsageError(f"{name} has {len(value)} values; give one value or one per factor (k = {k})")
        return list(value)
    return [value] * k


def _check_param(v: Param, name: str, B: int, ok, what: str, integer: bool = False) -> None:
    if isinstance(v, Tensor):
        if v.shape != (B,):
            raise UsageError(f"{name} as a tensor must have shape [B={B}] (one value per row), got {tuple(v.shape)}")
        if integer and v.dtype.is_floating_point:
            raise UsageTypeError(f"{name} must be an integer tensor, got {v.dtype}")
        if B and not bool(ok(v.double()).all()):
            raise UsageError(f"{name} values must be {what}, got {v.tolist()}")
        return
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or (integer and not isinstance(v, numbers.Integral)):
        raise UsageTypeError(f"{name} must be {'an int' if integer else 'a number'} or a [B] tensor, got {v!r}")
    if not ok(torch.tensor(float(v), dtype=torch.float64)):
        raise UsageError(f"{name} must be {what}, got {v!r}")


def _guided(scale: Param) -> bool:
    return bool((scale > 1).any()) if isinstance(scale, Tensor) else scale > 1


def _at(v: Param, r: int) -> float | int:
    return v[r].item() if isinstance(v, Tensor) else v


ATTN_BUCKETS = 4  # trunk attention reads the keys of the current quarter of the sequence (one graph each)
RECOMPILE_LIMIT = 64  # graphs of the compiled step kept per process (4 per batch size, dtype and model)


class _Spec(NamedTuple):
    """The sampling settings of one :func:`generate` call, as the decode step reads them."""

    B: int
    use_cfg: bool
    guided: tuple[bool, ...]
    scales: tuple
    temps: tuple
    top_ks: tuple
    top_ps: tuple
    backend: str | None


def _position_step(model: FAR, cache: StaticCache, x: Tensor, pos: Tensor, uniform: Tensor, length: int,
                   spec: _Spec) -> tuple[Tensor, Tensor]:
    """One image position for every row: the trunk on input x [R, 1, D] at ``pos`` ([1] long), then per factor
    i the AR-head slot, head i's logits, CFG + temperature + top-k/top-p and the draw with ``uniform[i]`` [B],
    and that sub-token's embedding into the next slot. Returns (tokens [B, k], the next position's trunk input
    [R, 1, D]). No host reads and no shape that depends on ``pos``: ``torch.compile(fullgraph=True)``
    captures it whole (one graph per attention ``length``)."""
    B, k = spec.B, model.config.num_factors
    slot_in = model.decode_trunk_static(x, pos, cache, length)  # [R, 1, D]
    drawn = []
    for i in range(k):
        h = model.decode_slot_static(slot_in, i, cache)  # [R, D]
        if spec.use_cfg and spec.guided[i]:
            logits = F.linear(h, model.head[i])  # [R, V]: both halves in one GEMM
            cond, uncond = logits[:B], logits[B:]
        else:
            cond, uncond = F.linear(h[:B], model.head[i]), None  # the null rows' logits are not needed
        tok = fk.sample(cond, uncond, cfg_scale=spec.scales[i], temperature=spec.temps[i], top_k=spec.top_ks[i],
                        top_p=spec.top_ps[i], uniform=uniform[i], backend=spec.backend)  # [B]
        tok = torch.cat([tok, tok]) if spec.use_cfg else tok  # the null rows follow the conditional draw
        drawn.append(tok)
        if i + 1 < k:
            slot_in = model.slot_input(tok, i)
    tokens = torch.stack(drawn, dim=1)  # [R, k]
    return tokens[:B], model.token_input(tokens)


_COMPILED: dict[str | None, Any] = {}


def _compiled_step(device: torch.device):
    """``torch.compile`` of :func:`_position_step`, fullgraph; CUDA graphs on CUDA (``mode="reduce-overhead"``)."""
    mode = "reduce-overhead" if device.type == "cuda" else None
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(_position_step, fullgraph=True, dynamic=False, mode=mode)
    return _COMPILED[mode]


_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its last StaticCache (compiled runs)


def _static_cache(model: FAR, rows: int, device: torch.device) -> StaticCache:
    """The model's static cache for ``rows`` rows, kept between compiled calls: the compiled graphs (and CUDA
    graphs) see the same buffers every call instead of recompiling or re-recording for new ones. Stale keys
    and values of an earlier call are never read: position t writes its own before it attends, and the mask
    hides the rest."""
    dtype = model.aggregate.weight.dtype
    cache = _CACHES.get(model)
    if cache is None or cache.trunk_k[0].shape[0] != rows or cache.trunk_k[0].dtype != dtype or \
            cache.trunk_k[0].device != device:
        cache = model.new_static_cache(rows, device)
        if device.type == "cuda":  # CUDA graphs update these buffers in place (a non-static input is copied)
            for buf in cache.buffers():
                torch._dynamo.mark_static_address(buf)
        _CACHES[model] = cache
    return cache


def attention_length(t: int, T: int, buckets: int = ATTN_BUCKETS) -> int:
    """Keys the trunk reads at position t of T: the end of t's bucket (T split in ``buckets`` equal parts,
    rounded up to a multiple of 8), so a compiled step has ``buckets`` graphs and reads on average about
    ``T / 2 + T / (2 * buckets)`` keys instead of T."""
    size = -(-T // buckets)
    size = min(T, -(-size // 8) * 8)
    return min(T, (t // size + 1) * size)


@torch.no_grad()
def generate(model: FAR, labels: Tensor, *, cfg_scale: Param | Sequence[Param] = 1.0,
             temperature: Param | Sequence[Param] = 1.0, top_k: Param | Sequence[Param] = 0,
             top_p: Param | Sequence[Param] = 1.0, seed: int | None = None,
             generator: torch.Generator | None = None, backend: str | None = None, uniform: Tensor | None = None,
             compile: bool = False, dtype: torch.dtype | None = None) -> Tensor:
    """Sample ``[B, k, T]`` codes (row i: sub-codebook i, T = block_size positions in raster order) for
    class ``labels`` [B], one position at a time with static KV caches in the trunk and the AR head.

    Factor i's token is drawn from ``softmax(filter((u + s_i (c - u)) / temperature_i))`` with ``c``/``u``
    the conditional/null-class logits of head i, ``filter`` the top-k then top-p filter of LlamaGen
    (:func:`fqgan_kernels.sample` semantics), by inverse CDF of one uniform number per row and draw.

    Each sampling parameter is one value for all factors or a sequence of k values (one per factor);
    a value is a number or a [B] tensor (one per row).

    :param model: a :class:`~fqgan.generator.FAR` (run in eval mode; its mode is restored after)
    :param labels: [B] integer class ids in [0, num_classes)
    :param cfg_scale: guidance scale s_i >= 1 per factor; 1 = no guidance for that factor (conditional
        logits only). Any s_i > 1 doubles the batch with null-class rows (needs class_dropout_prob > 0);
        the conditional and null rows run as one batch.
        The official sampler treats s <= 1 as "off"; s < 1 is rejected here.
    :param temperature: > 0
    :param top_k: >= 0 (0 = off)
    :param top_p: in (0, 1] (1 = off)
    :param seed: seeds a fresh generator on the labels' device: same seed, model, labels and
        parameters -> the same codes
    :param generator: a torch.Generator to draw from instead of ``seed`` (neither: the global RNG). The
        uniform numbers are drawn up front, ``torch.rand(T, k, B, dtype=float64)`` (on CPU the same numbers
        as one ``torch.rand(B)`` per draw in the order of the draws)
    :param backend: backend of :func:`fqgan_kernels.sample` (None: auto); ``"reference"`` samples with
        :func:`fqgan_kernels.reference.sample` (sorts over V), which draws the same uniform numbers as the
        fused kernels, so they agree token for token up to float rounding at a CDF boundary
    :param uniform: [B, k, T] float numbers in [0, 1), the draws themselves (instead of seed / generator):
        row b's codes then depend on row b's numbers only, not on the batch it is sampled in
    :param compile: run each position as one ``torch.compile(fullgraph=True)`` graph (CUDA graphs on
        CUDA): the same codes as eager up to float rounding at a CDF boundary. The first call compiles
        (seconds to minutes); later calls with the same shapes reuse the graphs, and the KV caches of the
        model's last batch size are kept between calls (freed with the model)
    :param dtype: the weights' dtype for this call (None: the model's own). A model of another dtype is
        copied in it for the call (:meth:`FAR.with_dtype`); cast the model once to avoid the copy. bf16
        runs several times faster on GPUs and on CPUs with AMX or AVX512-BF16 (the official sampling
        script's default precision)
    :returns: [B, k, T] int64 codes
    """
    if not isinstance(model, FAR):
        raise UsageTypeError(f"model must be a fqgan.generator.FAR, got {type(model).__name__}")
    c = model.config
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.dtype.is_floating_point or \
            labels.dtype == torch.bool:
        raise UsageError(f"labels must be a [B] integer tensor of class ids, got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
    B, k, T = labels.shape[0], c.num_factors, c.block_size
    if B and (int(labels.min()) < 0 or int(labels.max()) >= c.num_classes):
        raise UsageError(f"labels must be class ids in [0, num_classes={c.num_classes}), got values in "
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
    if sum(x is not None for x in (seed, generator, uniform)) > 1:
        raise UsageError("give seed or generator or uniform, not several")
    device = labels.device
    if uniform is not None:
        if not isinstance(uniform, Tensor) or not uniform.dtype.is_floating_point or uniform.shape != (B, k, T):
            raise UsageError(f"uniform must be a float tensor of shape [B={B}, k={k}, T={T}], got "
                             f"{getattr(uniform, 'dtype', type(uniform).__name__)} "
                             f"{tuple(getattr(uniform, 'shape', ()))}")
        if uniform.device != device:
            raise UsageError(f"uniform is on {uniform.device} but labels are on {device}")
        if B and not bool(((uniform >= 0) & (uniform < 1)).all()):
            raise UsageError("uniform values must be in [0, 1)")
    if compile and backend == "reference":
        raise UsageError("compile=True needs a fused sampler backend (fk.reference.sample reads values on the host)")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise UsageTypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    guided = [_guided(s) for s in scales]
    use_cfg = any(guided)
    if use_cfg and not c.has_null_class:
        raise UsageError("cfg_scale > 1 needs the null class, but this model has class_dropout_prob = 0")
    for name, p in (("cfg_scale", scales), ("temperature", temps), ("top_k", top_ks), ("top_p", top_ps)):
        for v in p:
            if isinstance(v, Tensor) and v.device != device:
                raise UsageError(f"{name} tensor is on {v.device} but labels are on {device}")

    out = torch.empty(B, k, T, dtype=torch.long, device=device)
    if B == 0:
        return out
    if uniform is None:  # [T, k, B]: draw (t, i) of every row
        uniform = torch.rand(T, k, B, generator=generator, device=device, dtype=torch.float64)
    else:
        uniform = uniform.to(torch.float64).permute(2, 1, 0).contiguous()
    rows = torch.cat([labels, torch.full_like(labels, c.num_classes)]) if use_cfg else labels  # [R]
    net = model if dtype is None or dtype == model.aggregate.weight.dtype else model.with_dtype(dtype)
    spec = _Spec(B, use_cfg, tuple(guided), tuple(scales), tuple(temps), tuple(top_ks), tuple(top_ps), backend)
    step = _compiled_step(device) if compile else _position_step
    graphs = compile and device.type == "cuda"
    # One graph per (attention length, rows, dtype, settings): several batch sizes or models in one process
    # pass dynamo's default of 8 entries per function, after which it would stop compiling.
    limit = torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)) \
        if compile else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    net.eval()
    try:
        with limit:
            net.rope(device)  # the RoPE table onto the device once, outside any graph
            cache = _static_cache(net, rows.shape[0], device) if compile else net.new_static_cache(rows.shape[0],
                                                                                                   device)
            positions = torch.arange(T, device=device).view(T, 1)
            x = net.class_input(rows.long())  # [R, 1, D]
            for t in range(T):
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                tokens, x = step(net, cache, x, positions[t], uniform[t], attention_length(t, T), spec)
                out[:, :, t] = tokens
                if graphs:
                    x = x.clone()  # the next replay overwrites this graph's outputs
    finally:
        model.train(was_training)
    return out


def check_generator_tokenizer(generator_config: Any, tokenizer_config: Any) -> None:
    """Raise ValueError unless a FAR (``FARConfig``) and a tokenizer (``TokenizerConfig``) fit together:
    the same k, the generator's vocabulary = the tokenizer's codebook size, and its T = the token grid."""
    g, t = generator_config, tokenizer_config
    if g.num_factors != t.num_codebooks:
        raise UsageError(f"the generator predicts k={g.num_factors} sub-tokens per position but the tokenizer has "
                         f"{t.num_codebooks} sub-codebooks: use the tokenizer whose codes trained the generator")
    if g.vocab_size != t.codebook_size:
        raise UsageError(f"the generator was built for codebook size {g.vocab_size} but the tokenizer's "
                         f"sub-codebooks have {t.codebook_size} codes: use the tokenizer whose codes trained it")
    if g.block_size != t.grid_size ** 2:
        raise UsageError(f"the generator makes {g.block_size} tokens per image but the tokenizer's grid is "
                         f"{t.grid_size}x{t.grid_size} = {t.grid_size ** 2}: use the matching tokenizer")


@torch.no_grad()
def sample_images(generator: nn.Module, tokenizer: nn.Module, labels: Tensor, *, batch_size: int = 32,
                  uniform: Tensor | None = None, **sampling: Any) -> Tensor:
    """Images ``[B, 3, H, W]`` in [-1, 1] for class ids ``labels [B]``: FAR codes
    (:func:`generate` with ``sampling`` = cfg_scale, temperature, top_k, top_p, seed, compile, dtype)
    decoded by the tokenizer, ``batch_size`` rows at a time. ``uniform`` [B, k, T]: every row's draws
    (:func:`image_uniforms`), in place of ``seed``."""
    check_generator_tokenizer(generator.config, tokenizer.config)
    seed = sampling.pop("seed", None)
    g = grid = tokenizer.config.grid_size
    out = []
    for start in range(0, labels.shape[0], batch_size):
        chunk = labels[start:start + batch_size]
        if uniform is not None:
            draws = dict(uniform=uniform[start:start + batch_size])
        else:
            draws = dict(seed=None if seed is None else seed + start)
        codes = generate(generator, chunk, **draws, **sampling)  # [b, k, T]
        out.append(tokenizer.decode_indices(codes.view(codes.shape[0], codes.shape[1], g, grid)).clamp(-1, 1))
    return torch.cat(out)


# -- sampling at scale (fqgan sample --npz): draws and classes that depend on an image's global index alone --
_DRAWS, _CLASSES = 0x5A3B1E, 0xC1A55E5  # independent streams of one seed


def image_uniforms(seed: int, indices: Sequence[int] | np.ndarray, k: int, T: int,
                   device: torch.device | str = "cpu") -> Tensor:
    """The uniform numbers of images ``indices`` of a sampling run, ``[n, k, T]`` float64 (:func:`generate`'s
    ``uniform``): image i's from ``numpy.random.default_rng([stream, seed, i])`` alone, so an image is the same
    whatever the batch, shard or number of processes it is sampled in."""
    rows = [np.random.default_rng([_DRAWS, seed, int(i)]).random((k, T)) for i in indices]
    return torch.from_numpy(np.stack(rows) if rows else np.zeros((0, k, T))).to(device)


def class_labels(num_images: int, classes: Sequence[int], order: str = "balanced", seed: int = 0) -> np.ndarray:
    """The class of each image of a sampling run, ``[num_images]`` int64.

    ``"balanced"``: image i has class ``classes[i % C]``, so every class has ``num_images // C`` or one more
    (50 each for 50,000 ImageNet samples) and every prefix is as balanced as it can be. ``"random"``: the
    official ``sample_c2i_ddp_*_code.py``'s distribution, a uniform draw per image (from ``(seed, i)``: the
    official script's own draws depend on its number of GPUs)."""
    classes = np.asarray(list(classes), dtype=np.int64)
    if classes.ndim != 1 or classes.size == 0:
        raise UsageError("classes must be a non-empty list of class ids")
    if order == "balanced":
        return classes[np.arange(num_images) % classes.size]
    if order == "random":
        picks = [np.random.default_rng([_CLASSES, seed, i]).integers(classes.size) for i in range(num_images)]
        return classes[np.asarray(picks, dtype=np.int64)]
    raise UsageError(f"order must be 'balanced' or 'random', got {order!r}")
