"""Fused linear + cross-entropy over k heads: the public op, its custom ops and autograd.

Backends: ``reference`` (fqgan_kernels/reference.py, N x V logits), ``torch`` (plain PyTorch in row
chunks, this file), ``cpu`` (csrc/cpu/linear_cross_entropy.cpp), ``triton``
(fqgan_kernels/triton/linear_cross_entropy.py), ``cuda`` (csrc/cuda/linear_cross_entropy{.cu,_glue.cpp}).

Maths, per head h and row n (``z = x_n W^T + b`` the V logits, t the target, eps the label
smoothing, zl the z-loss weight, ``valid = t != ignore_index``)::

    lse_n  = logsumexp_j z_j,   p_j = exp(z_j - lse_n)
    loss_n = valid * [ lse_n - (1 - eps) z_t - (eps / V) sum_j z_j + zl lse_n^2 ]
             # = F.cross_entropy(z, t, label_smoothing=eps, reduction='none') + zl lse^2
    dloss_n / dz_j = valid * [ (1 + 2 zl lse_n) p_j - eps / V - (1 - eps) [j == t] ]

``mean`` divides the per-head sum by the number of valid rows (0/0 = NaN when every row of a head
is ignored, as ``F.cross_entropy``), ``sum`` does not; ``loss`` is the mean of the k per-head
losses. With ``g_n = dL/dloss_n`` the gradients are ``dlogits = g * dloss/dz``,
``grad_hidden = dlogits @ W``, ``grad_weight = dlogits^T @ x``, ``grad_bias = sum_n dlogits``.

Where the gradients are computed (the choice this file makes):

* ``mean``/``sum`` on the ``cpu``, ``cuda`` and ``torch`` backends: in the forward, with
  ``g_n = 1/count`` (``1`` for sum) on valid rows, as Liger-Kernel does. ``dL/dloss_n`` is then
  the per-head upstream gradient times that constant, so the backward only scales the stored
  gradients by the k upstream scalars: 3 GEMMs in all instead of 4 (the logits GEMM is not
  recomputed), at the cost of holding grad_hidden and grad_weight (which the backward returns
  anyway) from the forward to the backward. Only when some input requires grad.
* ``none`` (``g_n`` arbitrary, known only in the backward) and the ``triton`` backend: the
  backward recomputes the logits chunk by chunk (``triton``: tile by tile) from the saved lse.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch
from torch import Tensor

from . import _ext, _validate, reference
from ._backend import Op, Route
from .outputs import LinearCrossEntropyOutput

__all__ = ["linear_cross_entropy"]

REDUCTIONS = ("mean", "sum", "none")
# Rows per chunk of the chunked backends (torch, cpu, cuda); 0 = each backend's default size
# (a chunk of float32 logits of about 16 MiB for torch, 32 MiB for cpu, 64 MiB for cuda).
# Tests set it small to cross chunk edges on small shapes.
chunk_rows: int = 0
_CHUNK_BYTES = 16 << 20

_Grads = tuple[Tensor | None, Tensor | None, Tensor | None]
_Result = tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunk(n: int, v: int, elem: int) -> int:
    rows = chunk_rows if chunk_rows > 0 else _CHUNK_BYTES // max(1, v * elem)
    return max(1, min(rows, n))


def _torch_impl(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, row_grad: Tensor | None,
                lse: Tensor | None, ignore_index: int, eps: float, zl: float) -> _Result:
    """The chunked algorithm in plain PyTorch (any device); the C++ backends do the same with a
    fused epilogue. Extra memory: one chunk of logits and its exp (2 x ~16 MiB). It computes in the
    accumulation dtype whatever autocast the caller runs under: a bf16 autocast would turn its matmuls
    bf16 (and the gradient's scatter into them would fail on the dtype)."""
    with torch.autocast(hidden.device.type, enabled=False):
        return _torch_chunks(hidden, weight, targets, bias, row_grad, ignore_index, eps, zl)


def _torch_chunks(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, row_grad: Tensor | None,
                  ignore_index: int, eps: float, zl: float) -> _Result:
    k, n_rows, _ = hidden.shape
    v = weight.shape[1]
    acc = _acc_dtype(hidden)
    rows = hidden.new_empty((k, n_rows), dtype=acc)
    lse_out = hidden.new_empty((k, n_rows), dtype=acc)
    grad = row_grad is not None
    gh = torch.empty_like(hidden) if grad else None
    gw = torch.empty_like(weight) if grad else None
    gb = torch.empty_like(bias) if grad and bias is not None else None
    step = _chunk(n_rows, v, 8 if acc == torch.float64 else 4)
    for h in range(k):
        w = weight[h].to(acc)
        b = bias[h].to(acc) if bias is not None else None
        gw_acc = torch.zeros_like(w) if grad else None
        gb_acc = torch.zeros(v, dtype=acc, device=w.device) if grad and b is not None else None
        for s in range(0, n_rows, step):
            x = hidden[h, s:s + step].to(acc)
            t = targets[h, s:s + step]
            z = x @ w.t()
            if b is not None:
                z += b
            valid = t != ignore_index
            t0 = torch.where(valid, t, 0)
            lse_c = torch.logsumexp(z, dim=-1)
            zt = z.gather(1, t0[:, None])[:, 0]
            row = lse_c - (1 - eps) * zt - eps / v * z.sum(-1) + zl * lse_c * lse_c
            rows[h, s:s + step] = torch.where(valid, row, torch.zeros_like(row))
            lse_out[h, s:s + step] = lse_c
            if not grad:
                continue
            g = torch.where(valid, row_grad[h, s:s + step].to(acc), torch.zeros_like(lse_c))
            z.sub_(lse_c[:, None]).exp_().mul_((g * (1 + 2 * zl * lse_c))[:, None]).sub_((g * eps / v)[:, None])
            z.scatter_add_(1, t0[:, None], (-(1 - eps) * g)[:, None])
            gh[h, s:s + step] = (z @ w).to(gh.dtype)
            gw_acc.addmm_(z.t(), x)
            if gb_acc is not None:
                gb_acc += z.sum(0)
        if grad:
            gw[h] = gw_acc.to(gw.dtype)
            if gb is not None:
                gb[h] = gb_acc.to(gb.dtype)
    return rows, lse_out, gh, gw, gb


def _cpu_impl(hidden, weight, targets, bias, row_grad, lse, ignore_index, eps, zl) -> _Result:
    return _ext.cpu().linear_cross_entropy(hidden, weight, targets, bias, row_grad, ignore_index, eps, zl,
                                           chunk_rows)


def _cuda_impl(hidden, weight, targets, bias, row_grad, lse, ignore_index, eps, zl) -> _Result:
    return _ext.cuda().linear_cross_entropy(hidden, weight, targets, bias, row_grad, ignore_index, eps, zl,
                                            chunk_rows)


def _triton_impl(hidden, weight, targets, bias, row_grad, lse, ignore_index, eps, zl) -> _Result:
    """Forward (``row_grad`` None): losses and lse. Backward (``row_grad`` and the forward's ``lse``
    given, from :func:`_lce_backward_op`): the gradients, tiles recomputed."""
    from .triton import linear_cross_entropy as tk

    if row_grad is None:
        rows, lse = tk.forward(hidden, weight, targets, bias, ignore_index, eps, zl)
        return rows, lse, None, None, None
    gh, gw, gb = tk.backward(hidden, weight, targets, bias, lse, row_grad, ignore_index, eps, zl)
    return hidden.new_empty((0,)), lse, gh, gw, gb


# One stage: (hidden, weight, targets, bias, row_grad, lse, ignore_index, eps, zl) -> _Result, run by
# the forward op (row_grad given when it computes the gradients) and by the backward op.
OP = Op("linear_cross_entropy", {"run": {
    "torch": Route(_torch_impl),
    "cpu": Route(_cpu_impl),  # float64 in float64
    # Triton's tl.dot has no float64 on every GPU; the cuda epilogue is fp32: float64 takes the torch path.
    "triton": Route(_triton_impl, float64="torch"),
    "cuda": Route(_cuda_impl, float64="torch"),
}})


def _forward_grads(backend: str, reduction: str, compute_grad: bool) -> bool:
    """Whether the forward op returns the gradients (scaled later by the upstream scalars)."""
    return compute_grad and reduction != "none" and backend != "triton"


def _row_scale(targets: Tensor, ignore_index: int, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """(valid [k, N] as 0/1 in ``acc``, count [k]) of non-ignored rows."""
    valid = (targets != ignore_index).to(acc)
    return valid, valid.sum(1)


@torch.library.custom_op("fqgan::linear_cross_entropy", mutates_args=())
def _lce_op(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, ignore_index: int,
            label_smoothing: float, reduction: str, z_loss: float, compute_grad: bool,
            backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (loss: [k] per head for mean/sum, [k, N] for none; lse [k, N]; and, when
    :func:`_forward_grads`, grad_hidden, grad_weight, grad_bias for ``dL/dloss_h = 1``, else empty)."""
    acc = _acc_dtype(hidden)
    valid, count = _row_scale(targets, ignore_index, acc)
    row_grad = None
    if _forward_grads(OP.routed("run", backend, hidden.dtype), reduction, compute_grad):
        scale = 1.0 / count.clamp_min(1) if reduction == "mean" else torch.ones_like(count)
        row_grad = valid * scale[:, None]
    rows, lse, gh, gw, gb = OP.run("run", backend, hidden, weight, targets, bias, row_grad, None, ignore_index,
                                   float(label_smoothing), float(z_loss))
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum(1)
    else:
        loss = rows.sum(1) / count  # 0/0 = NaN for a head whose rows are all ignored, as F.cross_entropy
    def out(g: Tensor | None) -> Tensor:  # distinct empty tensors: custom-op outputs may not alias
        return g if g is not None else hidden.new_empty((0,))

    return loss, lse, out(gh), out(gw), out(gb)


@_lce_op.register_fake
def _(hidden, weight, targets, bias, ignore_index, label_smoothing, reduction, z_loss, compute_grad, backend):
    k, n = targets.shape
    acc = _acc_dtype(hidden)
    loss = hidden.new_empty((k, n) if reduction == "none" else (k,), dtype=acc)
    lse = hidden.new_empty((k, n), dtype=acc)
    if _forward_grads(OP.routed("run", backend, hidden.dtype), reduction, compute_grad):
        gb = torch.empty_like(bias) if bias is not None else hidden.new_empty((0,))
        return loss, lse, torch.empty_like(hidden), torch.empty_like(weight), gb
    return loss, lse, hidden.new_empty((0,)), hidden.new_empty((0,)), hidden.new_empty((0,))


@torch.library.custom_op("fqgan::linear_cross_entropy_backward", mutates_args=())
def _lce_backward_op(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, lse: Tensor,
                     row_grad: Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
                     backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for per-row upstream gradients ``row_grad`` [k, N] (float32; float64 for float64
    inputs), logits recomputed."""
    _, _, gh, gw, gb = OP.run("run", backend, hidden, weight, targets, bias, row_grad.to(_acc_dtype(hidden)), lse,
                              ignore_index, float(label_smoothing), float(z_loss))
    return gh, gw, gb if gb is not None else hidden.new_empty((0,))


@_lce_backward_op.register_fake
def _(hidden, weight, targets, bias, lse, row_grad, ignore_index, label_smoothing, z_loss, backend):
    gb = torch.empty_like(bias) if bias is not None else hidden.new_empty((0,))
    return torch.empty_like(hidden), torch.empty_like(weight), gb


def _is_eager(t: Tensor) -> bool:
    # Plain tensors: eager autograd. Under torch.compile / AOT tracing / opcheck the outputs are
    # fake or functional tensor subclasses.
    return type(t) is Tensor and not torch.compiler.is_compiling()


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, targets, bias, ignore_index, label_smoothing, reduction, z_loss, compute_grad, backend = inputs
    _, lse, gh, gw, gb = output
    # lse and the forward's gradients are never differentiated: without this, autograd would hand the
    # backward a zeros tensor for each of them (k (N + V) H elements, as much as the gradients).
    ctx.set_materialize_grads(False)
    ctx.precomputed = _forward_grads(OP.routed("run", backend, hidden.dtype), reduction, compute_grad)
    ctx.has_bias = bias is not None
    ctx.args = (ignore_index, label_smoothing, reduction, z_loss, backend)
    ctx.eager_grads = None
    if ctx.precomputed and _is_eager(gh):
        # Eager: the first backward scales the stored gradients in place (no second k(N + V)H
        # buffer). Kept as detached aliases, not saved tensors: no version check, no reference
        # cycle through this node. A second backward through the graph recomputes instead.
        ctx.eager_grads = (gh.detach(), gw.detach(), gb.detach())
        ctx.save_for_backward(hidden, weight, targets, bias, lse)
    elif ctx.precomputed:
        ctx.save_for_backward(hidden, weight, targets, bias, lse, gh, gw, gb)
    else:
        ctx.save_for_backward(hidden, weight, targets, bias, lse)


def _scale(grad: Tensor, per_head: Tensor, inplace: bool) -> Tensor:
    """``grad[h] * per_head[h]`` computed in float32 (float64 for float64), in ``grad``'s dtype."""
    factor = per_head.reshape((-1,) + (1,) * (grad.dim() - 1)).to(_acc_dtype(grad))
    if inplace:
        return grad.mul_(factor)
    return (grad * factor).to(grad.dtype)


def _backward(ctx, grad_loss: Tensor, grad_lse, grad_gh, grad_gw, grad_gb):
    # lse and the returned gradients are not differentiable outputs (lse is returned detached).
    ignore_index, label_smoothing, reduction, z_loss, backend = ctx.args
    need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
    nones = (None,) * 6
    if grad_loss is None:  # only lse or the returned gradients were used downstream: nothing flows back
        return (None, None, None, None, *nones)
    if ctx.precomputed and ctx.eager_grads is not None:
        gh, gw, gb = ctx.eager_grads
        ctx.eager_grads = None  # a second backward recomputes (below)
        return (_scale(gh, grad_loss, True) if need_h else None, _scale(gw, grad_loss, True) if need_w else None,
                None, _scale(gb, grad_loss, True) if need_b and ctx.has_bias else None, *nones)
    saved = ctx.saved_tensors
    hidden, weight, targets, bias, lse = saved[:5]
    if ctx.precomputed and len(saved) == 8:
        gh, gw, gb = saved[5:]
        return (_scale(gh, grad_loss, False) if need_h else None, _scale(gw, grad_loss, False) if need_w else None,
                None, _scale(gb, grad_loss, False) if need_b and ctx.has_bias else None, *nones)
    if reduction == "none":
        row_grad = grad_loss
    else:
        valid, count = _row_scale(targets, ignore_index, grad_loss.dtype)
        per_head = grad_loss / count.clamp_min(1) if reduction == "mean" else grad_loss
        row_grad = valid * per_head[:, None]
    gh, gw, gb = _lce_backward_op(hidden, weight, targets, bias, lse, row_grad.to(_acc_dtype(hidden)),
                                  ignore_index, label_smoothing, z_loss, backend)
    return (gh if need_h else None, gw if need_w else None, None,
            gb if need_b and ctx.has_bias else None, *nones)


torch.library.register_autograd("fqgan::linear_cross_entropy", _backward, setup_context=_setup_context)


def validate(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, ignore_index: int,
             label_smoothing: float, reduction: str, z_loss: float) -> None:
    """The checks of :func:`linear_cross_entropy` (``hidden`` already stacked to [k, N, H])."""
    _validate.tensor(weight, "weight")
    _validate.tensor(targets, "targets")
    _validate.rank(hidden, "hidden", 3, "[k, N, H]")
    _validate.rank(weight, "weight", 3, "[k, V, H]")
    _validate.rank(targets, "targets", 2, "[k, N]")
    _validate.float_dtype(hidden, "hidden")
    _validate.float_dtype(weight, "weight")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if targets.dtype != torch.int64:
        raise TypeError(f"targets must be int64 (torch.long), got {targets.dtype}")
    named = [("hidden", hidden), ("weight", weight), ("targets", targets)]
    if bias is not None:
        _validate.tensor(bias, "bias")
        _validate.rank(bias, "bias", 2, "[k, V]")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias ({bias.dtype}) and weight ({weight.dtype}) must have the same dtype")
        named.append(("bias", bias))
    _validate.same_device(*named)
    k, n, h = hidden.shape
    kw, v, hw = weight.shape
    if k == 0 or n == 0 or h == 0 or v == 0:
        raise ValueError(f"hidden {tuple(hidden.shape)} = [k, N, H] and weight {tuple(weight.shape)} = [k, V, H] "
                         "need k, N, H, V >= 1")
    if kw != k or hw != h:
        raise ValueError(f"hidden has shape {tuple(hidden.shape)} = [k, N, H] but weight has shape "
                         f"{tuple(weight.shape)} = [k, V, H]: k and H must match")
    if tuple(targets.shape) != (k, n):
        raise ValueError(f"targets has shape {tuple(targets.shape)}, expected [k, N] = {(k, n)}")
    if bias is not None and tuple(bias.shape) != (k, v):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected [k, V] = {(k, v)}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    for name, value in (("label_smoothing", label_smoothing), ("z_loss", z_loss)):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not (math.isfinite(float(z_loss)) and float(z_loss) >= 0.0):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
    # No NaN/Inf scan of hidden/weight (unlike nearest_code, whose argmin has no answer for NaN):
    # as in F.cross_entropy they propagate into the loss, and the scan's temporaries (torch.isfinite
    # allocates a float copy: 64 MiB for one 16384 x 1024 weight) would exceed this op's own memory.
    # The targets' range is always checked: the kernels index the logits with them.
    _validate.index_range(targets, "targets", v, ignore=ignore_index)


def _stack_hidden(hidden: Tensor | Sequence[Tensor]) -> Tensor:
    if isinstance(hidden, Tensor):
        return hidden
    if not isinstance(hidden, (list, tuple)) or not hidden:
        raise TypeError(f"hidden must be a Tensor [k, N, H] or a non-empty list of k [N, H] tensors, "
                        f"got {type(hidden).__name__}")
    for i, x in enumerate(hidden):
        _validate.tensor(x, f"hidden[{i}]")
        _validate.rank(x, f"hidden[{i}]", 2, "[N, H]")
        if x.shape != hidden[0].shape or x.dtype != hidden[0].dtype or x.device != hidden[0].device:
            raise ValueError(f"hidden[{i}] is {tuple(x.shape)} {x.dtype} on {x.device} but hidden[0] is "
                             f"{tuple(hidden[0].shape)} {hidden[0].dtype} on {hidden[0].device}: heads must match")
    return torch.stack(list(hidden))


def linear_cross_entropy(hidden: Tensor | Sequence[Tensor], weight: Tensor, targets: Tensor,
                         bias: Tensor | None = None, *, ignore_index: int = -100, label_smoothing: float = 0.0,
                         reduction: str = "mean", z_loss: float = 0.0, return_lse: bool = False,
                         backend: str | None = None) -> LinearCrossEntropyOutput:
    """Equals, per head h, ``F.cross_entropy((hidden[h] @ weight[h].T + bias[h]).float(), targets[h],
    ignore_index=..., label_smoothing=..., reduction=...)`` plus ``z_loss * logsumexp(logits)^2`` on the
    non-ignored rows (same reduction), with ``loss`` the mean over heads -- i.e.
    :func:`fqgan_kernels.reference.linear_cross_entropy` -- without allocating the N x V logits.

    Extra memory (beyond inputs and the returned gradients), per call: one chunk of logits of
    ``C x V`` elements -- ``cpu``: float32, ``C = 32 MiB / (4 V)`` rows (512 at V = 16384), 32 MiB,
    plus a float32 copy of the chunk's C x H rows;
    ``cuda``: input dtype, 64 MiB; ``torch``: two float32 16 MiB chunks -- plus O(k N) for the lse
    and per-row losses. For bf16/fp16 inputs add one head's weight in float32 and a float32
    grad-weight accumulator (2 x V x H x 4 bytes; ``cuda``: the accumulator and one V x H temporary).
    Never O(N x V). The ``triton`` backend holds no logits at all (tiles in registers; online log-sum-exp in
    the forward, logits recomputed in the backward) and accumulates the gradients in float32
    (k (N + V) H x 4 bytes for bf16/fp16 inputs). With gradients enabled and ``mean``/``sum``, the
    chunked backends compute grad_hidden/grad_weight in the forward and keep them until the backward.

    What runs where: ``cpu`` -- MKL GEMMs via ATen in row chunks, the chunk held code-major ([V, C], so
    that every GEMM is NN or TN) plus a fused OpenMP epilogue (lse, loss, dlogits in place);
    ``cuda`` -- cuBLAS GEMMs via ATen in row chunks plus a fused CUDA epilogue kernel (one block per
    row: online max/sum-exp, loss, dlogits in place), bf16/fp16 logits chunks read with float32
    arithmetic; ``triton`` -- the whole op (blockwise GEMM with online
    log-sum-exp; backward recomputes tiles and accumulates grad_hidden / grad_weight with atomics).

    :param hidden: (k, N, H) float32, bfloat16 or float16 (float64 for gradcheck), or a list of k (N, H)
        tensors (stacked: one copy)
    :param weight: (k, V, H), same dtype and device
    :param targets: (k, N) int64, each in [0, V) or ``ignore_index``
    :param bias: (k, V) or None
    :param ignore_index: target value whose rows contribute nothing (loss 0, no gradient)
    :param label_smoothing: eps in [0, 1], as ``F.cross_entropy``: target mass 1 - eps + eps/V
    :param reduction: ``mean`` (over non-ignored rows; NaN if all rows of a head are ignored, as
        PyTorch), ``sum`` or ``none``
    :param z_loss: weight of ``lse^2`` (PaLM z-loss) added on non-ignored rows
    :param return_lse: also return the (k, N) log-sum-exp of the logits (float32, not differentiable)
    :param backend: ``auto`` (default, or ``$FQGAN_KERNELS_BACKEND``), ``reference``, ``torch``,
        ``cpu``, ``triton`` or ``cuda``
    :returns: ``LinearCrossEntropyOutput(loss, per_head, lse)``: for mean/sum ``loss`` () = mean of ``per_head``
        (k,); for none both are (k, N). Float32 (float64 for float64 inputs). Differentiable w.r.t.
        hidden, weight and bias.
    Source: FAR's factorized heads (FQGAN, arXiv 2411.16681): cross-entropy per sub-token head,
    averaged over the k heads; cut-cross-entropy / Liger-Kernel for the fused formulation.
    """
    hidden = _stack_hidden(hidden)
    _validate.tensor(hidden, "hidden")
    validate(hidden, weight, targets, bias, ignore_index, label_smoothing, reduction, z_loss)
    name = OP.resolve(backend, hidden.device)
    if name == "reference":
        out = reference.linear_cross_entropy(hidden, weight, targets, bias, ignore_index, label_smoothing,
                                             reduction, z_loss, return_lse)
        return out._replace(lse=out.lse.detach()) if return_lse else out
    compute_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    loss, lse, _, _, _ = _lce_op(hidden, weight, targets, bias, int(ignore_index), float(label_smoothing),
                                 reduction, float(z_loss), bool(compute_grad), name)
    per_head = loss
    if reduction != "none":
        loss = per_head.mean()
    return LinearCrossEntropyOutput(loss, per_head, lse.detach() if return_lse else None)
