"""linear_cross_entropy, forward + backward (grads for hidden and weight) over k heads: reference
eager, torch.compile(reference), the fused CPU kernel, cut-cross-entropy's ``torch_compile``
implementation (a peer, one call per head) and on GPU the Triton and CUDA kernels, with
Liger-Kernel's fused linear cross-entropy and cut-cross-entropy's Triton ``cce`` as GPU peers
where they import.

Inputs: "flat" logits have std 1 (weight rows of norm ~1 against unit-variance hidden states),
"peaked" logits std 20 (weight scaled x20), the spread a trained head's logits reach; most
softmax terms exp(x - lse) are then tiny and many subnormal. The default run times FAR's k = 3,
N = 4096, H = 1024 in fp32 and bf16 (``HEADLINE_SHAPES``), peaked and flat, every provider except
torch.compile on peaked inputs and the reference on peaked bf16 (``FULL_ONLY``: minutes a call
each). ``--bench-full`` runs the whole matrix: peaked and flat on ``PAIRED_SHAPES`` (the issue's
N = 1024, H = 256 and the headline shapes), flat on the rest of ``FULL_SHAPES``.

Subnormal floats: on Intel CPUs, PyTorch's fp32 GEMMs in the backward of a peaked cross-entropy read
a gradient full of subnormal values and take a microcode assist per operation: one call of the
reference at the headline shape takes minutes (docs/design.md section 6; the default run of 2026-12-04:
26.9x its flat time, benchmarks/RESULTS.md "Default benchmark run"). Those
cases (``COLD`` providers on peaked CPU inputs) are timed on their first call on the peaked inputs,
one round, after a warm-up on flat inputs of the same shape, and checked after the timing
(benchmarks/conftest.py::timed); the summary's peaked/flat column shows the slowdown.

Each provider's first result (loss, grads of hidden and weight) is checked by the rule of
tests/test_linear_cross_entropy.py (error no worse than eager PyTorch's in the inputs' dtype plus
TOL), against reference.py in float64 (see :func:`references`); truth and eager are computed once per
case.

GFLOP/s counts the three GEMMs, ``6 k N V H``. ``peak_extra_MiB`` is the peak memory one
forward + backward needs beyond its inputs (it includes the returned gradients, k (N + V) H
elements); ``peak_extra_minus_grads_MiB`` subtracts them. Full shapes take seconds per call on a
2-core CPU, so they run one round; smoke mode (``--benchmark-disable`` or ``FQGAN_BENCH_SMOKE=1``)
runs tiny shapes once.
"""

from __future__ import annotations

import importlib.util

import pytest
import selection
import torch
from checks import Memo, check_no_worse_than_eager, suite_module
from conftest import is_smoke, label, peak_mib, record, sync, timed

import fqgan_kernels as fk
from fqgan_kernels import reference as ref

HAS_CCE = importlib.util.find_spec("cut_cross_entropy") is not None
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None

# (k, N, H, V, dtype)
FULL_SHAPES = [(1, 4096, 1024, 16384, torch.float32)] + [
    (k, 4096, h, 16384, dt) for dt in (torch.float32, torch.bfloat16) for h in (1024, 1280) for k in (2, 3)
]
SMOKE_SHAPES = [(2, 64, 32, 512, torch.float32), (2, 64, 32, 512, torch.bfloat16)]
GPU_SHAPES = [(k, 32768, h, 16384, torch.bfloat16) for h in (1024, 1280) for k in (2, 3)]
ISSUE_SHAPE = (1, 1024, 256, 16384, torch.float32)  # issue 10's report: 1663 ms peaked vs 340 ms
PAIRED_SHAPES = [ISSUE_SHAPE, (3, 4096, 1024, 16384, torch.float32), (3, 4096, 1024, 16384, torch.bfloat16)]
GPU_PAIRED_SHAPES = [(3, 32768, 1024, 16384, torch.bfloat16)]
HEADLINE_SHAPES = [(3, 4096, 1024, 16384, torch.float32), (3, 4096, 1024, 16384, torch.bfloat16)]  # the default run
# (function, dtype, inputs) that the default run leaves to --bench-full: PyTorch's fp32 GEMMs over the
# subnormal gradients of peaked logits take minutes a call on Intel CPUs; the default run keeps one of
# them, the reference on fp32 (one round), as the line that shows it
FULL_ONLY = {("test_reference_compiled", torch.float32, "peaked"), ("test_reference_eager", torch.bfloat16, "peaked"),
             ("test_reference_compiled", torch.bfloat16, "peaked")}
# providers timed cold on peaked CPU inputs (conftest.timed): one round on the first call, after a
# warm-up on flat inputs of the same shape
COLD = ("reference eager", "torch.compile(reference)", "cut-cross-entropy torch_compile")
LOGIT_STD = {"flat": 1.0, "peaked": 20.0}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
NOTE = {"flat": "logits std 1 (weight scale 1/sqrt(H))", "peaked": "logits std 20 (weight scale 20/sqrt(H))"}


def _id(shape) -> str:
    k, n, h, v, dt = shape
    return f"k{k}-N{n}-H{h}-V{v}-{str(dt).replace('torch.', '')}"


def cases(shapes, paired):
    """(shape, inputs): flat on every shape, peaked on the paired ones (each next to its flat)."""
    out = []
    for shape in [*paired, *(s for s in shapes if s not in paired)]:
        out.append((shape, "flat"))
        if shape in paired:
            out.append((shape, "peaked"))
    return out


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        gpu = metafunc.definition.get_closest_marker("cuda") is not None
        mode = selection.mode(metafunc.config)
        if mode == "smoke":
            todo = cases(SMOKE_SHAPES, SMOKE_SHAPES)
        elif gpu:
            todo = cases(GPU_SHAPES, GPU_PAIRED_SHAPES)
        elif mode == "full":
            todo = cases(FULL_SHAPES, PAIRED_SHAPES)
        else:
            todo = [(s, i) for s, i in cases(HEADLINE_SHAPES, HEADLINE_SHAPES)
                    if (metafunc.function.__name__, s[-1], i) not in FULL_ONLY]
        metafunc.parametrize("shape,inputs", todo, ids=[f"{_id(s)}-{i}" for s, i in todo])


def make_inputs(shape, inputs="flat", device="cpu", upcast=None):
    """hidden (k, N, H) and weight (k, V, H) in the shape's dtype (``upcast``: those same values in
    that dtype), targets (k, N)."""
    k, n, h, v, dt = shape
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(k, n, h, generator=g).to(device, dt)
    weight = (torch.randn(k, v, h, generator=g) * (LOGIT_STD[inputs] / h**0.5)).to(device, dt)
    if upcast is not None:
        hidden, weight = hidden.to(upcast), weight.to(upcast)
    hidden.requires_grad_()
    weight.requires_grad_()
    targets = torch.randint(0, v, (k, n), generator=g).to(device)
    targets[:, ::17] = -100  # some ignored rows, as in padded batches
    return hidden, weight, targets


def make_step(loss_fn, hidden, weight, targets, device="cpu"):
    """Forward + backward; returns (loss, (grad_hidden, grad_weight))."""

    def step():
        loss = loss_fn(hidden, weight, targets)
        grads = torch.autograd.grad(loss, [hidden, weight])
        sync(device)
        return loss.detach(), grads

    return step


_references = Memo(size=2)  # (shape, inputs, device) -> (truth, eager), each (loss, grad_hidden, grad_weight)
EAGER = ("reference eager", "reference")  # reference.py itself: on float32 inputs, eager PyTorch


def references(shape, inputs, device, reference_result=None):
    """The truth, reference.py in float64 on the same values, and eager PyTorch in the inputs' dtype
    (tests/test_linear_cross_entropy.py::eager; reference.py itself for float32, the reference
    provider's own result when it is the one checked).

    The tests' truth is reference.py in float32; float64 is at least as exact, and its softmax has no
    subnormal values at these logits (float64's normal range reaches exp(-708)), so on peaked inputs
    it takes seconds where float32 takes minutes a head on Intel CPUs."""

    def compute():
        fp32 = shape[-1] == torch.float32
        truth = run_once(lambda x, w, t: ref.linear_cross_entropy(x, w, t).loss, shape, inputs, device,
                         upcast=torch.float64)
        if fp32:
            eager = reference_result if reference_result is not None else run_once(
                lambda x, w, t: ref.linear_cross_entropy(x, w, t).loss, shape, inputs, device)
        else:
            eager_fn = suite_module("test_linear_cross_entropy").eager
            eager = run_once(lambda x, w, t: eager_fn(x, w, t), shape, inputs, device)
        return truth, eager

    return _references.get((shape, inputs, device), compute)


def run_once(loss_fn, shape, inputs, device, upcast=None):
    loss, (gh, gw) = make_step(loss_fn, *make_inputs(shape, inputs, device, upcast), device)()
    return loss, gh, gw


def check(provider, shape, inputs, result, device):
    loss, (gh, gw) = result
    got = (loss, gh, gw)
    truth, eager = references(shape, inputs, device, got if provider in EAGER else None)
    for name, g, e, t in zip(("loss", "grad hidden", "grad weight"), got, eager, truth):
        check_no_worse_than_eager(f"linear_cross_entropy {provider} {inputs} {_id(shape)} {name}", g, e, t,
                                  shape[-1])


def run(benchmark, loss_fn, shape, inputs, provider, device="cpu", compiles=False):
    k, n, h, v, dt = shape
    label(benchmark, f"k={k} N={n} H={h} V={v} {DTYPE_NAMES.get(dt, str(dt))}", NOTE[inputs])
    hidden, weight, targets = make_inputs(shape, inputs, device)
    step = make_step(loss_fn, hidden, weight, targets, device)
    cold = inputs == "peaked" and device == "cpu" and provider in COLD and not benchmark.disabled
    warm = make_step(loss_fn, *make_inputs(shape, "flat", device), device) if cold and compiles else None
    timed(benchmark, step, check=lambda result: check(provider, shape, inputs, result, device), device=device,
          compiles=compiles, cold=cold, warm=warm)
    peak = peak_mib(benchmark)
    grads_mib = k * (n + v) * h * hidden.element_size() / 2**20
    record(benchmark, flops=6.0 * k * n * v * h, threads=torch.get_num_threads(),
           **({"peak_extra_minus_grads_MiB": round(peak - grads_mib, 2)} if peak is not None else {}),
           **({"timing": "cold: the first call on these inputs, after a warm-up on flat ones"} if cold else {}))


def _per_head(fn):
    """A single-head loss applied to each head, averaged over heads as the others."""
    return lambda x, w, t: torch.stack([fn(x[i], w[i], t[i]) for i in range(x.shape[0])]).mean()


def test_reference_eager(benchmark, shape, inputs):
    run(benchmark, lambda x, w, t: ref.linear_cross_entropy(x, w, t).loss, shape, inputs, "reference eager")


def test_reference_compiled(benchmark, shape, inputs):
    compiled = torch.compile(ref.linear_cross_entropy)
    run(benchmark, lambda x, w, t: compiled(x, w, t).loss, shape, inputs, "torch.compile(reference)",
        compiles=True)


def test_fused_cpu(benchmark, shape, inputs):
    run(benchmark, lambda x, w, t: fk.linear_cross_entropy(x, w, t, backend="cpu").loss, shape, inputs,
        "fused cpu")


@pytest.mark.skipif(not HAS_CCE, reason="cut-cross-entropy not installed (pip install cut-cross-entropy)")
def test_cce_torch_compile(benchmark, shape, inputs, request):
    """cut-cross-entropy's ``impl='torch_compile'`` (the one that runs on CPU), one call per head,
    averaged over heads as the others."""
    from cut_cross_entropy import linear_cross_entropy as cce

    if shape[-1] != torch.float32 and not is_smoke(request.config):
        pytest.skip("cut-cross-entropy's torch_compile in bf16 did not finish one full shape in 14 min on a "
                    "2-core CPU (benchmarks/RESULTS.md)")
    torch._dynamo.reset()

    run(benchmark, _per_head(lambda x, w, t: cce(x, w, t, impl="torch_compile")), shape, inputs,
        "cut-cross-entropy torch_compile", compiles=True)


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["reference", "cuda", "triton", "liger", "cce"])
def test_gpu(benchmark, shape, inputs, provider):
    if provider == "reference":
        fn = lambda x, w, t: ref.linear_cross_entropy(x, w, t).loss
    elif provider == "liger":
        if not HAS_LIGER:
            pytest.skip("liger-kernel not installed")
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        fn = _per_head(liger_fused_linear_cross_entropy)
    elif provider == "cce":
        if not HAS_CCE:
            pytest.skip("cut-cross-entropy not installed")
        from cut_cross_entropy import linear_cross_entropy as cce

        fn = _per_head(lambda x, w, t: cce(x, w, t, impl="cce"))
    else:
        fn = lambda x, w, t: fk.linear_cross_entropy(x, w, t, backend=provider).loss
    run(benchmark, fn, shape, inputs, provider, device="cuda")
