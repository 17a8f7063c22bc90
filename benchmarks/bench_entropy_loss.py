"""entropy_loss forward + backward: reference eager, torch.compile(reference), the streaming CPU
kernel and, on GPU, the Triton and CUDA kernels; each on peaked and flat inputs of the same shape.

Inputs: z sits near its codes (each row a normalised code plus noise of std 0.05 per dimension), as
the commitment loss keeps it in training. "peaked" is FQGAN's T = 0.01: the softmax over codes is
near one-hot and many exp(a_nj - lse_n) are subnormal floats; "flat" is T = 1 on the same z and
codes. The session ends with the summary table (benchmarks/conftest.py). The default run times
N = 4096 (``HEADLINE_SHAPES``); ``--bench-full`` every shape of ``FULL_SHAPES``.

GFLOP/s counts, per sub-codebook, the four N x K sweeps of the streaming kernels with 2*D + 8
flops per element each (logit, exp and the per-sweep arithmetic): a common yardstick, so the
reference's rate is what it would need to match, not what it executes. ``peak_extra_MiB`` is the
largest extra memory one call needs (the reference holds several N x K buffers per sub-codebook).

Before timing, each provider's first result (loss and both gradients) is checked against a float64
truth by the rule of tests/test_entropy_loss.py (benchmarks/checks.py); the truth and eager fp32's
result are computed once per case.
"""

from __future__ import annotations

import pytest
import selection
import torch
from checks import Memo, check_entropy, entropy_conditioning
from conftest import label, record, sync, timed

import fqgan_kernels as fk
from fqgan_kernels import reference as ref

FULL_SHAPES = [(4096, 16384, 8, 3), (8192, 16384, 8, 3)]
HEADLINE_SHAPES = [(4096, 16384, 8, 3)]  # the default run (benchmarks/selection.py)
SMOKE_SHAPES = [(64, 512, 8, 2)]
GPU_SHAPES = [(8192, 16384, 8, 3), (65536, 16384, 8, 3)]
TEMPERATURE = {"peaked": 0.01, "flat": 1.0}
NOTE = {"peaked": "T=0.01, z near its codes (noise std 0.05)", "flat": "T=1.0, same z and codes"}
NEAR_CODE_NOISE = 0.05

EAGER = ("reference eager", "reference")  # the providers that are reference.py itself
_references = Memo(size=2)  # (shape, inputs, device) -> (eager fp32, float64 truth)


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        gpu = metafunc.definition.get_closest_marker("cuda") is not None
        mode = selection.mode(metafunc.config)
        shapes = SMOKE_SHAPES if mode == "smoke" else (
            GPU_SHAPES if gpu else (FULL_SHAPES if mode == "full" else HEADLINE_SHAPES))
        metafunc.parametrize("shape", shapes, ids=[f"N{n}-K{K}-D{d}-k{k}" for n, K, d, k in shapes])
    if "inputs" in metafunc.fixturenames:
        metafunc.parametrize("inputs", ["flat", "peaked"])


def make_inputs(shape, device="cpu", dtype=torch.float32):
    """z (N, k, D) near its codes, codebooks (k, K, D) random; both with requires_grad."""
    N, K, D, k = shape
    g = torch.Generator().manual_seed(0)
    codebooks = torch.randn(k, K, D, generator=g)
    picks = torch.randint(0, K, (N, k), generator=g)
    near = torch.stack([ref.l2_normalize(codebooks[i])[picks[:, i]] for i in range(k)], 1)
    z = near + NEAR_CODE_NOISE * torch.randn(N, k, D, generator=g)
    return z.to(device, dtype).requires_grad_(), codebooks.to(device, dtype).requires_grad_()


def step_fn(loss_fn, z, codebooks, device="cpu"):
    """One forward + backward, grads reset, synchronised; returns the loss (k,)."""

    def step():
        z.grad = None
        codebooks.grad = None
        loss = loss_fn(z, codebooks)
        loss.sum().backward()
        sync(device)
        return loss.detach()

    return step


def _loss_and_grads(loss_fn, shape, inputs, device, dtype=torch.float32):
    z, cb = make_inputs(shape, device, dtype)
    loss = step_fn(lambda a, b: loss_fn(a, b, TEMPERATURE[inputs]), z, cb, device)()
    return loss, z.grad, cb.grad


def references(shape, inputs, device, eager_result=None):
    """(eager fp32, float64 truth) for one case, each (loss, grad_z, grad_codebooks), on ``device``.
    The truth runs the chunked plain-PyTorch path in float64 (tested against reference.py to 1e-10),
    since reference.py's own N x K buffers in float64 do not fit at the full shapes."""

    def compute():
        eager = eager_result or _loss_and_grads(ref.entropy_loss, shape, inputs, device)
        truth = _loss_and_grads(lambda a, b, t: fk.entropy_loss(a, b, t, backend="reference"), shape, inputs,
                                device, torch.float64)
        return tuple(x.detach().clone() for x in eager), truth

    return _references.get((shape, inputs, device), compute)


def checker(provider, shape, inputs, z, cb, device="cpu"):
    """``check(loss)``: the provider's first result (loss and the gradients left in z and cb) against
    the truth; outside the timing."""

    def check(loss):
        got = (loss, z.grad, cb.grad)
        eager, truth = references(shape, inputs, device, got if provider in EAGER else None)
        cond = entropy_conditioning(z, cb, TEMPERATURE[inputs])
        check_entropy(f"entropy_loss {provider} {inputs} {shape}", got, eager, truth, z.dtype, cond)

    return check


def _bench(benchmark, shape, inputs, provider, loss_fn, device="cpu", compiles=False):
    N, K, D, k = shape
    label(benchmark, f"N={N} K={K} D={D} k={k}", NOTE[inputs])
    z, cb = make_inputs(shape, device)
    fn = step_fn(lambda a, b: loss_fn(a, b, TEMPERATURE[inputs]), z, cb, device)
    timed(benchmark, fn, check=checker(provider, shape, inputs, z, cb, device), device=device, compiles=compiles)
    record(benchmark, flops=4.0 * N * K * k * (2 * D + 8), threads=torch.get_num_threads(),
           temperature=TEMPERATURE[inputs])


def test_reference_eager(benchmark, shape, inputs):
    _bench(benchmark, shape, inputs, "reference eager", ref.entropy_loss)


def test_reference_compiled(benchmark, shape, inputs):
    compiled = torch.compile(ref.entropy_loss)
    _bench(benchmark, shape, inputs, "torch.compile(reference)", compiled, compiles=True)


def test_fused_cpu(benchmark, shape, inputs):
    _bench(benchmark, shape, inputs, "fused cpu", lambda a, b, t: fk.entropy_loss(a, b, t, backend="cpu"))


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["reference", "compiled", "triton", "cuda"])
def test_gpu(benchmark, shape, inputs, provider):
    if provider == "reference":
        loss_fn = ref.entropy_loss
    elif provider == "compiled":
        loss_fn = torch.compile(ref.entropy_loss)
    else:
        loss_fn = lambda a, b, t: fk.entropy_loss(a, b, t, backend=provider)
    _bench(benchmark, shape, inputs, provider, loss_fn, "cuda", compiles=provider == "compiled")
