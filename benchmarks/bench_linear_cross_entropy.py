"""linear_cross_entropy, forward + backward (grads for hidden and weight) over k heads: reference
eager, torch.compile(reference), the fused CPU kernel, cut-cross-entropy's ``torch_compile``
implementation (a peer, one call per head) and on GPU the Triton and CUDA kernels, with
Liger-Kernel's fused linear cross-entropy and cut-cross-entropy's Triton ``cce`` as GPU peers
where they import.

GFLOP/s counts the three GEMMs, ``6 k N V H``. ``peak_extra_MiB`` is the peak memory one
forward + backward needs beyond its inputs (it includes the returned gradients, k (N + V) H
elements); ``peak_extra_minus_grads_MiB`` subtracts them. Full shapes take seconds per call on a
2-core CPU, so they run one round; smoke mode (``--benchmark-disable`` or ``FQGAN_BENCH_SMOKE=1``)
runs tiny shapes once.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import is_smoke, peak_extra_bytes, record, sync

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


def _id(shape) -> str:
    k, n, h, v, dt = shape
    return f"k{k}-N{n}-H{h}-V{v}-{str(dt).replace('torch.', '')}"


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        gpu = metafunc.definition.get_closest_marker("cuda") is not None
        shapes = SMOKE_SHAPES if is_smoke(metafunc.config) else (GPU_SHAPES if gpu else FULL_SHAPES)
        metafunc.parametrize("shape", shapes, ids=[_id(s) for s in shapes])


def make_inputs(shape, device="cpu"):
    k, n, h, v, dt = shape
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(k, n, h, generator=g).to(device, dt).requires_grad_()
    weight = (torch.randn(k, v, h, generator=g) * (2.0 / h**0.5)).to(device, dt).requires_grad_()
    targets = torch.randint(0, v, (k, n), generator=g).to(device)
    targets[:, ::17] = -100  # some ignored rows, as in padded batches
    return hidden, weight, targets


def run(benchmark, loss_fn, shape, device="cpu"):
    k, n, h, v, _ = shape
    hidden, weight, targets = make_inputs(shape, device)

    def step():
        loss = loss_fn(hidden, weight, targets)
        grads = torch.autograd.grad(loss, [hidden, weight])
        sync(device)
        return grads

    step()  # warm-up: compiles, loads extensions, creates thread pools
    peak = peak_extra_bytes(step, device)
    benchmark.group = f"linear_cross_entropy fwd+bwd {_id(shape)} {device}"
    # seconds per call on the CPU: one round; tens of milliseconds on a GPU: several
    rounds = 5 if device == "cuda" and not benchmark.disabled else 1
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)
    grads_bytes = k * (n + v) * h * hidden.element_size()
    record(benchmark, flops=6.0 * k * n * v * h, peak_bytes=peak, threads=torch.get_num_threads(),
           peak_extra_minus_grads_MiB=round((peak - grads_bytes) / 2**20, 2))


def _per_head(fn):
    """A single-head loss applied to each head, averaged over heads as the others."""
    return lambda x, w, t: torch.stack([fn(x[i], w[i], t[i]) for i in range(x.shape[0])]).mean()


def test_reference_eager(benchmark, shape):
    run(benchmark, lambda x, w, t: ref.linear_cross_entropy(x, w, t).loss, shape)


def test_reference_compiled(benchmark, shape):
    torch._dynamo.reset()
    compiled = torch.compile(ref.linear_cross_entropy)
    run(benchmark, lambda x, w, t: compiled(x, w, t).loss, shape)


def test_fused_cpu(benchmark, shape):
    run(benchmark, lambda x, w, t: fk.linear_cross_entropy(x, w, t, backend="cpu").loss, shape)


@pytest.mark.skipif(not HAS_CCE, reason="cut-cross-entropy not installed (pip install cut-cross-entropy)")
def test_cce_torch_compile(benchmark, shape):
    """cut-cross-entropy's ``impl='torch_compile'`` (the one that runs on CPU), one call per head,
    averaged over heads as the others."""
    from cut_cross_entropy import linear_cross_entropy as cce

    torch._dynamo.reset()

    run(benchmark, _per_head(lambda x, w, t: cce(x, w, t, impl="torch_compile")), shape)


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["reference", "cuda", "triton", "liger", "cce"])
def test_gpu(benchmark, shape, provider):
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
    run(benchmark, fn, shape, device="cuda")
