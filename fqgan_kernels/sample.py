"""Fused CFG + temperature + top-k/top-p sampling: the public op and its custom-op registration.

Backends: ``reference`` (fqgan_kernels/reference.py, one call per row; it syncs), ``cpu``
(csrc/cpu/sample.cpp), ``triton`` (fqgan_kernels/triton/sample.py), ``cuda``
(csrc/cuda/sample.cu). Every compiled backend runs the same per-row algorithm:

1. ``x = (uncond + cfg * (cond - uncond)) / temperature`` in float32 (the reference's op order and
   rounding), ``m = max x``; each x also gets an order-preserving 32-bit key (float bits, sign
   folded), so "x >= t" is "key >= key(t)".
2. top-k (``0 < k < V``): the key of the k-th largest value K_k = the largest key with
   ``count(key >= K) >= k``, found by a radix descent on the key bits (exact, ties at the k-th kept
   as in LlamaGen, no sort). CPU: 8 bits per pass, 256-bin histograms (4 passes, after the first only
   over keys sharing the prefix); Triton: 4 bits per pass, 16 candidates tested at once (8 passes
   over V); CUDA: one bit per pass (32 counting passes with block reductions).
3. ``S = sum exp(x - m)`` over the top-k survivors.
4. top-p (``p < 1``): the crossing key K_p = the largest key with ``mass(key >= K) > p * S``, by the
   same radix descent on masses. Tokens above it are kept; of the c tokens tied at it, the first
   ``min(c, floor((p*S - mass(> K_p)) / e_t) + 1)`` in index order: exactly the prefix rule "remove a
   token when the sorted cumulative mass before it exceeds p", with ties ordered by index (a stable
   sort; LlamaGen's unstable ``torch.sort`` leaves the order of ties unspecified).
5. inverse-CDF draw in index order: ``token = min{j : sum_{i<=j, kept} e_i > u * S_kept}`` (float64
   running sum), ``u`` one uniform number per row.

So no sort and no V-sized temporary besides the guided logits (CPU: V keys + V exps per thread;
Triton/CUDA: a [B, V] float32 workspace). Kernel and reference decide with their own roundings (float32
exps, float64 sums), so they can only differ where a decision sits within rounding of its threshold
(tests/test_sample.py checks that this is the only kind of difference).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _validate, reference
from ._backend import Op, Route, cpu_kernel, cuda_kernel, triton_kernel

__all__ = ["sample", "sample_from_hidden"]

Param = float | int | Tensor


def _reference(cond: Tensor, uncond: Tensor | None, cfg: Tensor, temperature: Tensor, top_k: Tensor,
               top_p: Tensor, uniform: Tensor) -> Tensor:
    """One :func:`fqgan_kernels.reference.sample` call per row: the reference takes scalar parameters
    (this path syncs; it is the ground truth, not a fast path)."""
    out = torch.empty(cond.shape[0], dtype=torch.long, device=cond.device)
    for b in range(cond.shape[0]):
        try:
            out[b] = reference.sample(
                cond[b:b + 1], None if uncond is None else uncond[b:b + 1], float(cfg[b]), float(temperature[b]),
                int(top_k[b]), float(top_p[b]), uniform=uniform[b:b + 1])[0]
        except ValueError as err:
            if "no token to draw" not in str(err):
                raise
            out[b] = -1  # as the kernels: the front door's check names this row (the reference saw one row)
    return out


# No float64 route: float64 logits are computed in float32 by every backend, as the reference does.
OP = Op("sample", {"sample": {
    "cpu": Route(cpu_kernel("sample")),
    "triton": Route(triton_kernel("sample", "sample")),
    "cuda": Route(cuda_kernel("sample")),
}})


@torch.library.custom_op("fqgan::sample", mutates_args=())
def _sample_op(cond: Tensor, uncond: Tensor | None, cfg: Tensor, temperature: Tensor, top_k: Tensor,
               top_p: Tensor, uniform: Tensor, backend: str) -> Tensor:
    return OP.run("sample", backend, cond, uncond, cfg, temperature, top_k, top_p, uniform)


@_sample_op.register_fake
def _(cond: Tensor, uncond: Tensor | None, cfg: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
      uniform: Tensor, backend: str) -> Tensor:
    torch._check(cond.dim() == 2, lambda: f"cond must be [B, V], got {tuple(cond.shape)}")
    torch._check(uncond is None or uncond.shape == cond.shape, lambda: "uncond must match cond")
    return cond.new_empty(cond.shape[0], dtype=torch.long)


def _param(value: Param, name: str, B: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A per-row parameter as a [B] tensor; python scalars are checked here, tensors by
    :func:`_check_values` (only where that needs no device sync)."""
    if isinstance(value, Tensor):
        if dtype.is_floating_point and not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a float tensor, got {value.dtype}")
        if not dtype.is_floating_point and (value.dtype.is_floating_point or value.dtype == torch.bool
                                            or value.dtype.is_complex):
            raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
        if value.dim() == 0:
            value = value.reshape(1)
        if value.dim() != 1 or value.shape[0] not in (1, B):
            raise ValueError(f"{name} must be a python scalar or a tensor of shape ({B},) (one per row), "
                             f"got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the logits are on {device}")
        return value.to(dtype).expand(B)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a python number or a tensor, got {type(value).__name__}")
    if not dtype.is_floating_point and not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return torch.full((B,), value, dtype=dtype, device=device)


# The rule each per-row parameter obeys (python scalars are checked in `validate`).
_RULES: dict[str, tuple[Callable[[Tensor], Tensor], str]] = {
    "cfg_scale": (torch.isfinite, "finite"),
    "temperature": (lambda t: (t > 0) & torch.isfinite(t), "> 0 and finite"),
    "top_k": (lambda t: t >= 0, ">= 0 (0 = off)"),
    "top_p": (lambda t: (t > 0) & (t <= 1), "in (0, 1]"),
    "uniform": (lambda t: (t >= 0) & (t < 1), "in [0, 1)"),
}


def _check_tensor_params(params: dict[str, Tensor]) -> None:
    """The values of parameters given as tensors, in one check: on the host for CPU tensors, a
    device-side assert otherwise (no sync)."""
    if not params:
        return
    oks = {name: _RULES[name][0](t) for name, t in params.items()}
    ok = torch.stack([o.all() for o in oks.values()]).all()
    summary = "sampling parameters out of range: " + "; ".join(f"{n} must be {_RULES[n][1]}" for n in params)

    def detail() -> str:
        for name, o in oks.items():
            if not bool(o.all()):
                i = int((~o).nonzero()[0, 0])
                return f"{name} must be {_RULES[name][1]}; row {i} has {params[name][i].item()!r}"
        return summary

    _validate.require(ok, next(iter(params.values())), summary, detail)


def _check_logits(cond: Tensor, uncond: Tensor | None, check_finite: bool | None) -> None:
    """NaN in the logits is an error (infinities are allowed: see :func:`sample`)."""
    if not _validate.check_finite_enabled(check_finite):
        return
    named = [("cond_logits", cond)] + ([("uncond_logits", uncond)] if uncond is not None else [])
    ok = ~torch.stack([torch.isnan(x).any() for _, x in named]).any()

    def detail() -> str:
        for name, x in named:
            rows = torch.isnan(x).any(-1)
            if bool(rows.any()):
                return (f"{name} holds NaN in {int(rows.sum())} of {rows.numel()} rows; first at row "
                        f"{int(rows.nonzero()[0, 0])}")
        return "NaN in the logits"

    _validate.require(ok, cond, "cond_logits/uncond_logits hold NaN", detail)


def validate(cond_logits: Tensor, uncond_logits: Tensor | None, cfg_scale: Param, temperature: Param,
              top_k: Param, top_p: Param, uniform: Tensor | None,
              generator: torch.Generator | None) -> None:
    _validate.tensor(cond_logits, "cond_logits")
    _validate.rank(cond_logits, "cond_logits", 2, "[B, V]")
    _validate.float_dtype(cond_logits, "cond_logits")
    if cond_logits.shape[1] == 0:
        raise ValueError(f"cond_logits has V = 0 columns (shape {tuple(cond_logits.shape)}); need V >= 1")
    if uncond_logits is not None:
        _validate.tensor(uncond_logits, "uncond_logits")
        if uncond_logits.shape != cond_logits.shape:
            raise ValueError(f"uncond_logits has shape {tuple(uncond_logits.shape)} but cond_logits has "
                             f"{tuple(cond_logits.shape)}: they must match")
        if uncond_logits.dtype != cond_logits.dtype:
            raise TypeError(f"uncond_logits ({uncond_logits.dtype}) and cond_logits ({cond_logits.dtype}) "
                            "must have the same dtype")
        _validate.same_device(("cond_logits", cond_logits), ("uncond_logits", uncond_logits))
    for name, v, lo_ok in (("temperature", temperature, "> 0"), ("top_p", top_p, "in (0, 1]"),
                           ("top_k", top_k, ">= 0 (0 = off)"), ("cfg_scale", cfg_scale, "finite")):
        if isinstance(v, Tensor) or isinstance(v, bool) or not isinstance(v, numbers.Real):
            continue
        bad = {"temperature": not v > 0 or v == float("inf"), "top_p": not 0 < v <= 1, "top_k": v < 0,
               "cfg_scale": not abs(v) < float("inf")}[name]
        if bad:
            raise ValueError(f"{name} must be {lo_ok}, got {v!r}")
    if uniform is not None:
        _validate.tensor(uniform, "uniform")
        _validate.float_dtype(uniform, "uniform")
        B = cond_logits.shape[0]
        if uniform.shape not in ((B,), (B, 1)):
            raise ValueError(f"uniform must have shape ({B},) (one number in [0, 1) per row), "
                             f"got {tuple(uniform.shape)}")
        _validate.same_device(("cond_logits", cond_logits), ("uniform", uniform))
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def sample(cond_logits: Tensor, uncond_logits: Tensor | None = None, *, cfg_scale: Param = 1.0,
           temperature: Param = 1.0, top_k: Param = 0, top_p: Param = 1.0, uniform: Tensor | None = None,
           generator: torch.Generator | None = None, backend: str | None = None,
           check_finite: bool | None = None) -> Tensor:
    """Equals ``torch.multinomial(softmax(top_k_top_p_filter((uncond + cfg * (cond - uncond)) / T)), 1)``
    in distribution, and :func:`fqgan_kernels.reference.sample` draw for draw given the same uniform
    numbers: one fused pass per row instead of a sort over V (see the module docstring).

    LlamaGen/FQGAN ``sample_from_logits`` + ``top_k_top_p_filtering`` semantics: top-k keeps every
    logit >= the k-th largest (ties kept); top-p then keeps the smallest descending prefix whose
    mass exceeds ``top_p`` (the crossing token kept; ties in index order); the draw is by inverse
    CDF, ``token = min{j : cdf_j > u}``, in place of ``torch.multinomial``.

    Non-finite logits, the same rule on every backend (``reference.sample``): NaN in the logits is an
    error (``ValueError`` on CPU, a device-side assert elsewhere; part of the NaN/Inf scan that
    ``check_finite`` switches). Where ``cond == uncond`` (infinities included) the guided logit is
    ``cond``; -inf masks a token; a row whose guided logits hold +inf draws uniformly among its +inf
    tokens ("always this token" for one), as the softmax's limit; a row with no token above -inf is
    an error.

    :param cond_logits: (B, V) float32, bfloat16, float16 (float64 is computed in float32, as the
        reference does)
    :param uncond_logits: (B, V) like ``cond_logits``, or None (no guidance; ``cfg_scale`` ignored)
    :param cfg_scale: guidance scale, python number or (B,) float tensor
    :param temperature: > 0, python number or (B,) float tensor
    :param top_k: >= 0 (0 = off; >= V keeps all), python int or (B,) integer tensor
    :param top_p: in (0, 1] (1 = off), python number or (B,) float tensor
    :param uniform: (B,) numbers in [0, 1), one per row; if None drawn as
        ``torch.rand(B, dtype=float64, generator=generator)`` (the reference's draw)
    :param generator: torch.Generator for ``uniform``
    :param backend: ``auto`` (default, or ``$FQGAN_KERNELS_BACKEND``), ``reference``, ``cpu``,
        ``triton`` or ``cuda``
    :param check_finite: scan the logits for NaN (default: the process setting)
    :returns: (B,) int64 tokens. No host synchronisation on CUDA (the value checks are device-side
        asserts). Not differentiable.
    """
    validate(cond_logits, uncond_logits, cfg_scale, temperature, top_k, top_p, uniform, generator)
    B, _ = cond_logits.shape
    device = cond_logits.device
    name = OP.resolve(backend, device)
    if B == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    given = {"cfg_scale": cfg_scale, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    params = {n: _param(v, n, B, device, torch.int64 if n == "top_k" else torch.float32) for n, v in given.items()}
    if uniform is None:
        uniform = torch.rand(B, generator=generator, device=device, dtype=torch.float64)
    else:
        uniform = uniform.reshape(B).to(torch.float64)
        given["uniform"] = uniform
    _check_tensor_params({n: params.get(n, uniform) for n, v in given.items() if isinstance(v, Tensor)})
    _check_logits(cond_logits, uncond_logits, check_finite)
    # float64 logits are guided in float32, as the reference does.
    cond = cond_logits.detach()
    cond = cond.float() if cond.dtype == torch.float64 else cond
    uncond = None if uncond_logits is None else uncond_logits.detach()
    uncond = uncond.float() if uncond is not None and uncond.dtype == torch.float64 else uncond
    args = (cond, uncond, params["cfg_scale"], params["temperature"], params["top_k"], params["top_p"], uniform)
    tokens = _reference(*args) if name == "reference" else _sample_op(*args, name)
    # Only a row with nothing to draw (every guided logit -inf) leaves -1.
    _validate.require((tokens >= 0).all(), tokens, "a row has no token to draw (every guided logit is -inf)",
                      lambda: f"row {int((tokens < 0).nonzero()[0, 0])} has no token to draw: every guided "
                              "logit is -inf")
    return tokens


def sample_from_hidden(hidden_cond: Tensor, hidden_uncond: Tensor | None, weight: Tensor,
                       bias: Tensor | None = None, **kwargs) -> Tensor:
    """Equals ``sample(hidden_cond @ weight.T + bias, hidden_uncond @ weight.T + bias, **kwargs)``:
    the logits of both halves come from one GEMM (``F.linear`` on the stacked hidden states, in the
    inputs' dtype), then the fused sampling pass.

    :param hidden_cond: (B, H)
    :param hidden_uncond: (B, H) or None
    :param weight: (V, H) output head
    :param bias: (V,) or None
    :param kwargs: the keyword arguments of :func:`sample`
    """
    _validate.tensor(hidden_cond, "hidden_cond")
    _validate.tensor(weight, "weight")
    _validate.rank(hidden_cond, "hidden_cond", 2, "[B, H]")
    _validate.rank(weight, "weight", 2, "[V, H]")
    if weight.shape[1] != hidden_cond.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} = [V, H] does not match hidden_cond "
                         f"{tuple(hidden_cond.shape)} = [B, H]")
    if hidden_uncond is not None:
        _validate.tensor(hidden_uncond, "hidden_uncond")
        if hidden_uncond.shape != hidden_cond.shape:
            raise ValueError(f"hidden_uncond has shape {tuple(hidden_uncond.shape)} but hidden_cond has "
                             f"{tuple(hidden_cond.shape)}")
    if bias is not None:
        _validate.tensor(bias, "bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    B = hidden_cond.shape[0]
    h = hidden_cond if hidden_uncond is None else torch.cat([hidden_cond, hidden_uncond])
    logits = F.linear(h, weight, bias)  # [B or 2B, V], one GEMM
    cond, uncond = (logits, None) if hidden_uncond is None else (logits[:B], logits[B:])
    return sample(cond, uncond, **kwargs)
