"""fqgan_kernels.linear_cross_entropy: every backend against the float32 ground truth
(``F.cross_entropy((hidden @ weight.T).float())``, i.e. reference.linear_cross_entropy on float32
inputs) with the rule "error no worse than eager PyTorch in the same dtype plus a tolerance";
all reductions, ignore_index rows (incl. all ignored), label smoothing, z-loss, bias; gradcheck,
opcheck, torch.compile; a peak-memory check; bad input."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fqgan_kernels as fk
from fqgan_kernels import reference

lce_mod = sys.modules["fqgan_kernels.linear_cross_entropy"]

HAS_CUDA = torch.cuda.is_available()
IGNORE = -100

# Shapes (k, N, V, H): 1s, odd sizes (cut-cross-entropy's (252, 507, 123)), tile edges of the
# Triton interpreter config (BLOCK_N=16, BLOCK_V=32, BLOCK_H=16), the real vocabulary V = 16384.
SHAPES_CPU = [(1, 1, 1, 1), (2, 252, 507, 123), (3, 32, 64, 16), (2, 64, 16384, 32)]
SHAPES_TRITON = [(1, 1, 1, 1), (2, 17, 33, 17), (3, 32, 64, 16)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Extra error allowed beyond eager PyTorch's own error in the same dtype, relative to max |truth|.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 4e-3, torch.float16: 1e-3}


def _backends() -> list:
    no_triton = importlib.util.find_spec("triton") is None
    return ["torch", "cpu", pytest.param("triton", marks=pytest.mark.skipif(no_triton, reason="no triton"))]


def make_inputs(k, n, v, h, dtype=torch.float32, bias=False, ignore_frac=0.2, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(k, n, h, generator=g)
    weight = torch.randn(k, v, h, generator=g) * (2.0 / h**0.5)  # logits with std ~ 2
    b = torch.randn(k, v, generator=g) * 0.5 if bias else None
    targets = torch.randint(0, v, (k, n), generator=g)
    targets[torch.rand(k, n, generator=g) < ignore_frac] = IGNORE
    cast = lambda t: t.to(device=device, dtype=dtype).requires_grad_() if t is not None else None
    return cast(hidden), cast(weight), targets.to(device), cast(b)


def eager(hidden, weight, targets, bias=None, **kw):
    """Eager PyTorch in the inputs' dtype: the matmul (and its backward) in that dtype, CE in float32."""
    kw.setdefault("ignore_index", IGNORE)
    red = kw.get("reduction", "mean")
    per_head = []
    for i in range(hidden.shape[0]):
        logits = hidden[i] @ weight[i].t()
        if bias is not None:
            logits = logits + bias[i]
        logits = logits.float()
        ce = F.cross_entropy(logits, targets[i], ignore_index=kw["ignore_index"],
                             label_smoothing=kw.get("label_smoothing", 0.0), reduction="none")
        valid = targets[i] != kw["ignore_index"]
        zl = kw.get("z_loss", 0.0)
        if zl:
            lse = torch.logsumexp(logits, -1)
            ce = ce + zl * torch.where(valid, lse * lse, torch.zeros_like(lse))
        per_head.append(ce if red == "none" else ce.sum() if red == "sum" else ce.sum() / valid.sum())
    stacked = torch.stack(per_head)
    return stacked if red == "none" else stacked.mean()


def loss_and_grads(fn, hidden, weight, targets, bias, grad_out=None, **kw):
    params = [hidden, weight] + ([bias] if bias is not None else [])
    loss = fn(hidden, weight, targets, bias, **kw)
    loss = loss.loss if isinstance(loss, tuple) else loss
    if grad_out is None:
        grad_out = torch.ones_like(loss)
    grads = torch.autograd.grad(loss, params, grad_out)
    return loss.detach(), [g.detach() for g in grads]


def truth_of(hidden, weight, targets, bias, grad_out=None, **kw):
    up = lambda t: t.detach().float().requires_grad_() if t is not None else None
    return loss_and_grads(reference.linear_cross_entropy, up(hidden), up(weight), targets, up(bias), grad_out, **kw)


def err(x, truth):
    return (x.double() - truth.double()).abs().max().item()


def check_no_worse_than_eager(out, eager_out, truth, dtype, what):
    scale = max(truth.double().abs().max().item(), 1.0)
    e_k, e_e = err(out, truth), err(eager_out, truth)
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    assert e_k <= e_e + TOL[dtype] * scale, \
        f"{what}: error {e_k:.3e} > eager {e_e:.3e} + {TOL[dtype]:.0e} x {scale:.3g}"


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape_idx", range(4))
def test_matches_ground_truth(backend, dtype, shape_idx):
    shapes = SHAPES_TRITON if backend == "triton" else SHAPES_CPU
    if shape_idx >= len(shapes):
        pytest.skip("no such shape for this backend")
    if backend == "torch" and shape_idx == 3 and dtype != torch.float32:
        pytest.skip("covered by float32")
    k, n, v, h = shapes[shape_idx]
    hidden, weight, targets, bias = make_inputs(k, n, v, h, dtype, bias=shape_idx == 1)
    truth_loss, truth_grads = truth_of(hidden, weight, targets, bias)
    eager_loss, eager_grads = loss_and_grads(eager, hidden, weight, targets, bias)
    loss, grads = loss_and_grads(lambda *a, **kw: fk.linear_cross_entropy(*a, backend=backend, **kw),
                                 hidden, weight, targets, bias)
    assert loss.dtype == torch.float32
    check_no_worse_than_eager(loss, eager_loss, truth_loss, dtype, "loss")
    for name, g, ge, gt in zip(("hidden", "weight", "bias"), grads, eager_grads, truth_grads):
        assert g.dtype == dtype
        check_no_worse_than_eager(g, ge, gt, dtype, f"grad {name}")


OPTIONS = [
    dict(reduction="mean"),
    dict(reduction="sum", label_smoothing=0.1),
    dict(reduction="none", z_loss=1e-3),
    dict(reduction="mean", label_smoothing=0.2, z_loss=1e-2, ignore_index=3),
    dict(reduction="none", label_smoothing=1.0),
]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_options_and_chunk_edges(backend, opts, with_bias, monkeypatch):
    monkeypatch.setattr(lce_mod, "chunk_rows", 7)  # several chunks, the last one partial
    k, n, v, h = (2, 23, 37, 19)
    hidden, weight, targets, bias = make_inputs(k, n, v, h, bias=with_bias)
    if opts.get("ignore_index") == 3:
        targets[targets == IGNORE] = 3
    kw = {"ignore_index": IGNORE, **opts}
    grad_out = torch.randn(k, n) if opts["reduction"] == "none" else None
    truth_loss, truth_grads = truth_of(hidden, weight, targets, bias, grad_out, **kw)
    out = fk.linear_cross_entropy(hidden, weight, targets, bias, backend=backend, return_lse=True, **kw)
    loss, grads = loss_and_grads(lambda *a, **k2: fk.linear_cross_entropy(*a, backend=backend, **k2),
                                 hidden, weight, targets, bias, grad_out, **kw)
    ref = reference.linear_cross_entropy(hidden.float(), weight.float(), targets, bias, return_lse=True, **kw)
    torch.testing.assert_close(out.per_head, ref.per_head, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.lse, ref.lse, rtol=1e-5, atol=1e-5)
    assert not out.lse.requires_grad
    torch.testing.assert_close(loss, truth_loss, rtol=1e-5, atol=1e-5)
    for g, gt in zip(grads, truth_grads):
        torch.testing.assert_close(g, gt, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(backend, reduction):
    hidden, weight, targets, bias = make_inputs(2, 9, 21, 16, bias=True)
    targets[1] = IGNORE  # head 1: every row ignored
    out = fk.linear_cross_entropy(hidden, weight, targets, bias, reduction=reduction, backend=backend)
    torch_ce = F.cross_entropy(hidden[1] @ weight[1].t() + bias[1], targets[1], reduction=reduction)
    if reduction == "mean":
        assert torch.isnan(out.per_head[1]) and torch.isnan(torch_ce)  # 0/0, as PyTorch
        assert torch.isnan(out.loss)
        assert torch.isfinite(out.per_head[0])
    elif reduction == "sum":
        assert out.per_head[1].item() == 0.0 == torch_ce.item()
    else:
        assert (out.per_head[1] == 0).all() and (torch_ce == 0).all()
    grad_out = torch.ones_like(out.loss)
    gh, gw, gb = torch.autograd.grad(out.loss, [hidden, weight, bias], grad_out)
    for g in (gh[1], gw[1], gb[1]):
        assert (g == 0).all()
    for g in (gh[0], gw[0], gb[0]):
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    ref = reference.linear_cross_entropy(hidden, weight, targets, bias, reduction=reduction)
    torch.testing.assert_close(out.per_head, ref.per_head, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_list_input_equals_stacked():
    hidden, weight, targets, _ = make_inputs(3, 11, 29, 8)
    a = fk.linear_cross_entropy(hidden, weight, targets, backend="cpu")
    b = fk.linear_cross_entropy(list(hidden.unbind(0)), weight, targets, backend="cpu")
    torch.testing.assert_close(a.per_head, b.per_head, rtol=0, atol=0)


@pytest.mark.parametrize("backend", _backends())
def test_under_bf16_autocast(backend):
    """Inside a model's bf16 autocast region (FAR's training step) every backend computes as outside it:
    the op takes the tensors' own dtypes, the torch backend's fp32 matmuls stay fp32 (they once went bf16
    and its backward's scatter failed on the dtype: seen on the H200, 2026-12-04)."""
    hidden, weight, targets, _ = make_inputs(2, 37, 50, 16)
    plain = fk.linear_cross_entropy(hidden, weight, targets, backend=backend)
    plain.loss.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fk.linear_cross_entropy(hidden, weight, targets, backend=backend)
    out.loss.backward()
    assert out.loss.dtype == plain.loss.dtype
    torch.testing.assert_close(out.loss, plain.loss, rtol=0, atol=0)
    torch.testing.assert_close((hidden.grad, weight.grad), grads, rtol=0, atol=0)


def test_no_grad_forward_and_auto_backend():
    hidden, weight, targets, _ = make_inputs(2, 13, 40, 8)
    with torch.no_grad():
        out = fk.linear_cross_entropy(hidden, weight, targets, return_lse=True)
    ref = reference.linear_cross_entropy(hidden.detach(), weight.detach(), targets, return_lse=True)
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.lse, ref.lse)
    assert fk.resolve_backend("linear_cross_entropy", None, torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_float64(backend, reduction, monkeypatch):
    monkeypatch.setattr(lce_mod, "chunk_rows", 3)
    hidden, weight, targets, bias = make_inputs(2, 5, 7, 3, dtype=torch.float64, bias=True)

    def fn(x, w, b):
        return fk.linear_cross_entropy(x, w, targets, b, reduction=reduction, label_smoothing=0.1, z_loss=0.01,
                                       backend=backend).loss

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias), eps=1e-6, atol=1e-7)


def _op_samples(backend):
    hidden, weight, targets, bias = make_inputs(2, 9, 19, 16, bias=True)
    for b, reduction, compute_grad in ((None, "mean", True), (bias, "none", True), (bias, "sum", False)):
        yield (hidden, weight, targets, b, IGNORE, 0.1, reduction, 1e-3, compute_grad, backend)


@pytest.mark.parametrize("backend", _backends())
def test_opcheck(backend):
    for args in _op_samples(backend):
        torch.library.opcheck(torch.ops.fqgan.linear_cross_entropy.default, args)
        hidden, weight, targets, b = args[:4]
        with torch.no_grad():
            _, lse, *_ = torch.ops.fqgan.linear_cross_entropy(*args[:8], False, backend)
        row_grad = torch.randn(targets.shape)
        torch.library.opcheck(torch.ops.fqgan.linear_cross_entropy_backward.default,
                              (hidden.detach(), weight.detach(), targets, b.detach() if b is not None else None,
                               lse, row_grad, IGNORE, 0.1, 1e-3, backend))


def test_compile_fullgraph():
    hidden, weight, targets, bias = make_inputs(2, 21, 45, 16, bias=True)

    def step(x, w, t, b):
        out = fk.linear_cross_entropy(x, w, t, b, label_smoothing=0.1, backend="cpu")
        return out.loss, out.per_head

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c, per_head_c = compiled(hidden, weight, targets, bias)
    grads_c = torch.autograd.grad(loss_c, [hidden, weight, bias])
    loss_e, per_head_e = step(hidden, weight, targets, bias)
    grads_e = torch.autograd.grad(loss_e, [hidden, weight, bias])
    torch.testing.assert_close(per_head_c, per_head_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


_PEAK_SCRIPT = textwrap.dedent("""
    import sys, torch
    import fqgan_kernels as fk
    backend, k, n, v, h = sys.argv[1], *map(int, sys.argv[2:])
    torch.manual_seed(0)
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    def inputs(n_):
        x = torch.randn(k, n_, h, requires_grad=True)
        w = (torch.randn(k, v, h) / h ** 0.5).requires_grad_()
        return x, w, torch.randint(0, v, (k, n_))
    x, w, t = inputs(64)  # warm-up: loads the extension, creates thread pools
    torch.autograd.grad(fk.linear_cross_entropy(x, w, t, backend=backend).loss, [x, w])
    x, w, t = inputs(n)
    open("/proc/self/clear_refs", "w").write("5")
    before = status("VmRSS:")
    out = fk.linear_cross_entropy(x, w, t, backend=backend)
    gx_, gw_ = torch.autograd.grad(out.loss, [x, w])
    print(status("VmHWM:") - before)
""")


def _peak_extra(backend: str, k: int, n: int, v: int, h: int) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, backend, str(k), str(n), str(v), str(h)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return int(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_no_n_by_v_buffer():
    """Peak resident memory of forward + backward at N=4096, V=16384, H=64 beyond the inputs: the
    chunked path must stay far below one N x V float32 buffer (256 MiB), within the issue's 64 MiB per
    head call. It holds one 32 MiB logits chunk (512 rows), a 512 x H copy of the rows, and the
    returned gradients (k (N + V) H x 4 = 5 MiB)."""
    k, n, v, h = 1, 4096, 16384, 64
    grads = k * (n + v) * h * 4
    peak = _peak_extra("cpu", k, n, v, h)
    assert peak < grads + 32 * 2**20 + 8 * 2**20, f"peak extra {peak / 2**20:.1f} MiB"
    assert peak <= 64 * 2**20, f"peak extra {peak / 2**20:.1f} MiB > 64 MiB (N x V = {n * v * 4 / 2**20:.0f} MiB)"


# -- bad input: clear errors before any kernel runs -------------------------------------------------------


def _good():
    hidden, weight, targets, bias = make_inputs(2, 6, 11, 4, bias=True)
    return hidden.detach(), weight.detach(), targets, bias.detach()


@pytest.mark.parametrize("case, exc, match", [
    ("target_too_big", ValueError, r"targets has 1 entries outside \[0, 11\) or -100 \(ignore_index\); "
                                   r"first at index \(1, 2\): value 11"),
    ("target_negative", ValueError, r"outside \[0, 11\) or -100 \(ignore_index\); first at index \(0, 0\): "
                                    r"value -1"),
    ("heads_mismatch", ValueError, "k and H must match"),
    ("hidden_list_mismatch", ValueError, "heads must match"),
    ("H_mismatch", ValueError, "k and H must match"),
    ("targets_shape", ValueError, "targets has shape"),
    ("bias_shape", ValueError, "bias has shape"),
    ("targets_dtype", TypeError, "targets must be int64"),
    ("dtype_mismatch", TypeError, "must have the same dtype"),
    ("int_hidden", TypeError, "hidden must have dtype"),
    ("device", ValueError, "is on meta"),
    ("reduction", ValueError, "reduction must be"),
    ("label_smoothing", ValueError, "label_smoothing must be in"),
    ("z_loss", ValueError, "z_loss must be a finite number >= 0"),
    ("z_loss_inf", ValueError, "z_loss must be a finite number >= 0"),
    ("z_loss_nan", ValueError, "z_loss must be a finite number >= 0"),
    ("label_smoothing_nan", ValueError, "label_smoothing must be in"),
    ("empty", ValueError, "need k, N, H, V >= 1"),
    ("rank", ValueError, "hidden must be 3-D"),
    ("not_tensor", TypeError, "weight must be a torch.Tensor"),
])
def test_bad_input(case, exc, match, no_kernels):
    hidden, weight, targets, bias = _good()
    kw = {}
    if case == "target_too_big":
        targets[1, 2] = 11
    elif case == "target_negative":
        targets[0, 0] = -1
    elif case == "heads_mismatch":
        weight = weight[:1]
    elif case == "hidden_list_mismatch":
        hidden = [hidden[0], hidden[1, :5]]
    elif case == "H_mismatch":
        weight = weight[..., :3]
    elif case == "targets_shape":
        targets = targets[:, :5]
    elif case == "bias_shape":
        bias = bias[:, :10]
    elif case == "targets_dtype":
        targets = targets.int()
    elif case == "dtype_mismatch":
        weight = weight.bfloat16()
    elif case == "int_hidden":
        hidden, weight, bias = hidden.long(), weight.long(), None
    elif case == "device":
        weight = weight.to("meta")
    elif case == "reduction":
        kw["reduction"] = "avg"
    elif case == "label_smoothing":
        kw["label_smoothing"] = 1.5
    elif case == "z_loss":
        kw["z_loss"] = -1.0
    elif case == "z_loss_inf":
        kw["z_loss"] = float("inf")
    elif case == "z_loss_nan":
        kw["z_loss"] = float("nan")
    elif case == "label_smoothing_nan":
        kw["label_smoothing"] = float("nan")
    elif case == "empty":
        hidden, targets = hidden[:, :0], targets[:, :0]
    elif case == "rank":
        hidden = hidden[0]
    elif case == "not_tensor":
        weight = weight.tolist()
    with pytest.raises(exc, match=match):
        fk.linear_cross_entropy(hidden, weight, targets, bias, **kw)


# -- CUDA (run on a GPU machine) ------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", OPTIONS[:4], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_cuda_matches_ground_truth(backend, dtype, opts, monkeypatch):
    monkeypatch.setattr(lce_mod, "chunk_rows", 100)
    hidden, weight, targets, bias = make_inputs(2, 252, 507, 123, dtype, bias=True, device="cuda")
    kw = {"ignore_index": IGNORE, **opts}
    if opts.get("ignore_index") == 3:
        targets[targets == IGNORE] = 3
    grad_out = torch.randn(2, 252, device="cuda") if opts["reduction"] == "none" else None
    truth_loss, truth_grads = truth_of(hidden, weight, targets, bias, grad_out, **kw)
    eager_loss, eager_grads = loss_and_grads(eager, hidden, weight, targets, bias, grad_out, **kw)
    loss, grads = loss_and_grads(lambda *a, **k2: fk.linear_cross_entropy(*a, backend=backend, **k2),
                                 hidden, weight, targets, bias, grad_out, **kw)
    check_no_worse_than_eager(loss, eager_loss, truth_loss, dtype, "loss")
    for name, g, ge, gt in zip(("hidden", "weight", "bias"), grads, eager_grads, truth_grads):
        check_no_worse_than_eager(g, ge, gt, dtype, f"grad {name}")


def test_second_backward_recomputes():
    """mean/sum scale the gradients stored by the forward in place on the first backward; a second
    backward through the same graph (retain_graph) must recompute, not scale twice."""
    hidden, weight, targets, _ = make_inputs(2, 8, 13, 4)
    loss = fk.linear_cross_entropy(hidden, weight, targets, backend="cpu").loss
    g1 = torch.autograd.grad(loss, [hidden, weight], retain_graph=True)
    g2 = torch.autograd.grad(loss, [hidden, weight])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
