"""entropy_loss forward + backward: reference eager, torch.compile(reference), the streaming CPU
kernel and, on GPU, the Triton and CUDA kernels.

GFLOP/s counts, per sub-codebook, the four N x K sweeps of the streaming kernels with 2*D + 8
flops per element each (logit, exp and the per-sweep arithmetic): a common yardstick, so the
reference's rate is what it would need to match, not what it executes. ``peak_extra_MiB`` is the
largest extra memory one call needs (the reference holds several N x K buffers per sub-codebook).
"""

from __future__ import annotations

import pytest
import torch
from conftest import is_smoke, peak_extra_bytes, record, sync

import fqgan_kernels as fk
from fqgan_kernels import reference as ref

FULL_SHAPES = [(4096, 16384, 8, 3), (8192, 16384, 8, 3)]
SMOKE_SHAPES = [(64, 512, 8, 2)]
GPU_SHAPES = [(8192, 16384, 8, 3), (65536, 16384, 8, 3)]
TEMPERATURE = 0.01


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        gpu = metafunc.definition.get_closest_marker("cuda") is not None
        shapes = SMOKE_SHAPES if is_smoke(metafunc.config) else (GPU_SHAPES if gpu else FULL_SHAPES)
        metafunc.parametrize("shape", shapes, ids=[f"N{n}-K{K}-D{d}-k{k}" for n, K, d, k in shapes])


def make_inputs(shape, device="cpu", dtype=torch.float32):
    N, K, D, k = shape
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, k, D, generator=g).to(device, dtype).requires_grad_()
    codebooks = torch.randn(k, K, D, generator=g).to(device, dtype).requires_grad_()
    return z, codebooks


def step_fn(loss_fn, z, codebooks, device="cpu"):
    """One forward + backward, grads reset, synchronised."""

    def step():
        z.grad = None
        codebooks.grad = None
        loss_fn(z, codebooks).sum().backward()
        sync(device)

    return step


def run(benchmark, fn, shape, device="cpu", rounds=None):
    N, K, D, k = shape
    flops = 4.0 * N * K * k * (2 * D + 8)
    peak = peak_extra_bytes(fn, device)
    if rounds is None:
        rounds = 1 if benchmark.disabled else 3
    benchmark.group = f"entropy_loss fwd+bwd N={N} K={K} D={D} k={k} {device}"
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0 if benchmark.disabled else 1)
    record(benchmark, flops=flops, peak_bytes=peak, threads=torch.get_num_threads())


def test_reference_eager(benchmark, shape):
    z, cb = make_inputs(shape)
    run(benchmark, step_fn(lambda a, b: ref.entropy_loss(a, b, TEMPERATURE), z, cb), shape,
        rounds=1 if shape[0] > 4096 else None)


def test_reference_compiled(benchmark, shape):
    z, cb = make_inputs(shape)
    compiled = torch.compile(ref.entropy_loss)
    fn = step_fn(lambda a, b: compiled(a, b, TEMPERATURE), z, cb)
    fn()  # compile outside the timing
    run(benchmark, fn, shape, rounds=1 if shape[0] > 4096 else None)


def test_fused_cpu(benchmark, shape):
    z, cb = make_inputs(shape)
    fn = step_fn(lambda a, b: fk.entropy_loss(a, b, TEMPERATURE, backend="cpu"), z, cb)
    fn()
    run(benchmark, fn, shape)


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["reference", "compiled", "triton", "cuda"])
def test_gpu(benchmark, shape, provider):
    z, cb = make_inputs(shape, "cuda")
    if provider == "reference":
        loss_fn = lambda a, b: ref.entropy_loss(a, b, TEMPERATURE)
    elif provider == "compiled":
        compiled = torch.compile(ref.entropy_loss)
        loss_fn = lambda a, b: compiled(a, b, TEMPERATURE)
    else:
        loss_fn = lambda a, b: fk.entropy_loss(a, b, TEMPERATURE, backend=provider)
    fn = step_fn(loss_fn, z, cb, "cuda")
    fn()
    run(benchmark, fn, shape, device="cuda", rounds=5)
