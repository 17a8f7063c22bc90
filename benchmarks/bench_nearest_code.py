"""nearest_code: reference eager, torch.compile(reference), the fused CPU kernel, faiss-cpu
(IndexFlatL2 / IndexFlatIP, k=1 search, as a peer) and on GPU the Triton and CUDA kernels.

GFLOP/s counts 2*N*K*D per sub-codebook. ``peak_extra_MiB`` is the largest extra memory one call
needs (the reference materialises the N x K distance matrix per sub-codebook). A 4096^3
``torch.mm`` in the same run gives the machine's matmul rate to compare against.
"""

from __future__ import annotations

import pytest
import torch
from conftest import is_smoke, peak_extra_bytes, record, sync

import fqgan_kernels as fk
from fqgan_kernels import reference as ref

try:
    import faiss
except ImportError:  # optional peer: pip install faiss-cpu (the `bench` extra)
    faiss = None

FULL_SHAPES = [(256, 16384, 8, 3), (4096, 16384, 8, 2), (4096, 16384, 8, 3),
               (16384, 16384, 8, 2), (16384, 16384, 8, 3)]
SMOKE_SHAPES = [(64, 512, 8, 2)]
GPU_SHAPES = [(65536, 16384, 8, 3)]


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        gpu = metafunc.definition.get_closest_marker("cuda") is not None
        shapes = SMOKE_SHAPES if is_smoke(metafunc.config) else (GPU_SHAPES if gpu else FULL_SHAPES)
        metafunc.parametrize("shape", shapes, ids=[f"N{n}-K{K}-D{d}-k{k}" for n, K, d, k in shapes])


def make_inputs(shape, device="cpu", dtype=torch.float32):
    N, K, D, k = shape
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, k, D, generator=g).to(device, dtype)
    codebooks = torch.randn(k, K, D, generator=g).to(device, dtype)
    return z, codebooks


def run(benchmark, fn, shape, device="cpu", rounds=None):
    N, K, D, k = shape
    flops = 2.0 * N * K * D * k
    peak = peak_extra_bytes(fn, device)
    if rounds is None:
        rounds = 1 if benchmark.disabled else max(2, min(20, int(2e10 / flops)))
    benchmark.group = f"nearest_code N={N} K={K} D={D} k={k} {device}"
    result = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0 if benchmark.disabled else 1)
    record(benchmark, flops=flops, peak_bytes=peak, threads=torch.get_num_threads())
    return result


def test_reference_eager(benchmark, shape):
    z, cb = make_inputs(shape)
    run(benchmark, lambda: ref.nearest_code(z, cb, True), shape, rounds=1 if shape[0] * shape[3] > 20000 else None)


def test_reference_compiled(benchmark, shape):
    z, cb = make_inputs(shape)
    compiled = torch.compile(ref.nearest_code)
    compiled(z, cb, True)  # compile outside the timing
    run(benchmark, lambda: compiled(z, cb, True), shape, rounds=1 if shape[0] * shape[3] > 20000 else None)


def test_fused_cpu(benchmark, shape):
    z, cb = make_inputs(shape)
    fk.nearest_code(z, cb, True, backend="cpu")
    run(benchmark, lambda: fk.nearest_code(z, cb, True, backend="cpu"), shape)
    benchmark.extra_info["isa"] = fk._ext.cpu().isa()


@pytest.mark.skipif(faiss is None, reason="faiss-cpu not installed (pip install faiss-cpu)")
@pytest.mark.parametrize("index_type", ["IndexFlatL2", "IndexFlatIP"])
def test_faiss(benchmark, shape, index_type):
    """faiss in its best configuration: the BLAS/fused top-1 path (threshold 20) at every N."""
    z, cb = make_inputs(shape)
    zn, en = ref.l2_normalize(z), ref.l2_normalize(cb)
    faiss.omp_set_num_threads(torch.get_num_threads())
    old = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 20
    indexes = []
    for i in range(shape[3]):
        index = getattr(faiss, index_type)(shape[2])
        index.add(en[i].numpy())
        indexes.append(index)
    queries = [zn[:, i].contiguous().numpy() for i in range(shape[3])]
    try:
        run(benchmark, lambda: [ix.search(q, 1) for ix, q in zip(indexes, queries)], shape)
    finally:
        faiss.cvar.distance_compute_blas_threshold = old
    benchmark.extra_info["config"] = "distance_compute_blas_threshold=20, index built outside timing"


def test_torch_mm_4096(benchmark, smoke):
    """The machine's fp32 matmul rate in this run (4096^3, or 512^3 in smoke mode)."""
    n = 512 if smoke else 4096
    a, b = torch.randn(n, n), torch.randn(n, n)
    benchmark.group = "roofline torch.mm"
    benchmark.pedantic(lambda: a @ b, rounds=1 if benchmark.disabled else 5, iterations=1)
    record(benchmark, flops=2.0 * n**3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("provider", ["reference", "compiled", "triton", "cuda"])
def test_gpu(benchmark, shape, dtype, provider):
    z, cb = make_inputs(shape, "cuda", dtype)
    if provider == "reference":
        fn = lambda: ref.nearest_code(z, cb, True)
    elif provider == "compiled":
        compiled = torch.compile(ref.nearest_code)
        fn = lambda: compiled(z, cb, True)
    else:
        fn = lambda: fk.nearest_code(z, cb, True, backend=provider)
    fn()

    def timed():
        fn()
        sync("cuda")

    run(benchmark, timed, shape, device="cuda", rounds=10)
    benchmark.group += f" {dtype}"
