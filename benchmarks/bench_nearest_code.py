"""nearest_code: reference eager, torch.compile(reference), the fused CPU kernel, faiss-cpu
(IndexFlatL2 / IndexFlatIP, k=1 search, as a peer) and on GPU the Triton and CUDA kernels.

Inputs: "flat" is z drawn independently of the codes (random directions), "peaked" is z near its
codes (a normalised code plus noise of std 0.05 per dimension), as training produces it; the same
shape in the same run, paired in the peaked/flat table at the end of the session. The search takes
no exponentials, so the pair checks that nothing else in it depends on the data.

Before timing, each provider's first result is checked (benchmarks/checks.py): the chosen code's
exact float64 distance is the minimum within the dtype's tolerance, indices equal the exact argmin
wherever there is no tie, codes are the chosen rows; the exact minimum is computed once per case.

GFLOP/s counts 2*N*K*D per sub-codebook. ``peak_extra_MiB`` is the largest extra memory one call
needs (the reference materialises the N x K distance matrix per sub-codebook). A 4096^3
``torch.mm`` in the same run gives the machine's matmul rate to compare against.
"""

from __future__ import annotations

import pytest
import torch
from checks import Memo, check_nearest, exact_nearest
from conftest import is_smoke, label, peak_extra_bytes, record, sync

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
NOTE = {"peaked": "z near its codes (noise std 0.05)", "flat": "z random, independent of the codes"}
NEAR_CODE_NOISE = 0.05

_exact = Memo(size=2)  # (shape, inputs, dtype) -> checks.ExactNearest


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        gpu = metafunc.definition.get_closest_marker("cuda") is not None
        shapes = SMOKE_SHAPES if is_smoke(metafunc.config) else (GPU_SHAPES if gpu else FULL_SHAPES)
        metafunc.parametrize("shape", shapes, ids=[f"N{n}-K{K}-D{d}-k{k}" for n, K, d, k in shapes])
    if "inputs" in metafunc.fixturenames:
        metafunc.parametrize("inputs", ["flat", "peaked"])


def make_inputs(shape, inputs="flat", device="cpu", dtype=torch.float32):
    N, K, D, k = shape
    g = torch.Generator().manual_seed(0)
    codebooks = torch.randn(k, K, D, generator=g)
    if inputs == "peaked":
        picks = torch.randint(0, K, (N, k), generator=g)
        near = torch.stack([ref.l2_normalize(codebooks[i])[picks[:, i]] for i in range(k)], 1)
        z = near + NEAR_CODE_NOISE * torch.randn(N, k, D, generator=g)
    else:
        z = torch.randn(N, k, D, generator=g)
    return z.to(device, dtype), codebooks.to(device, dtype)


def check(result, z, cb, shape, inputs, what, codes=True):
    """``result`` (codes, indices) -- or indices alone -- choose nearest codes; outside the timing."""
    exact = _exact.get((shape, inputs, z.dtype), lambda: exact_nearest(z, cb, True))
    if codes:
        check_nearest(exact, result[1], result[0], f"nearest_code {what} {inputs} {shape}")
    else:
        check_nearest(exact, result, None, f"nearest_code {what} {inputs} {shape}")


def run(benchmark, fn, shape, provider, inputs, device="cpu", rounds=None, dtype=torch.float32):
    N, K, D, k = shape
    flops = 2.0 * N * K * D * k
    peak = peak_extra_bytes(fn, device)
    if rounds is None:
        rounds = 1 if benchmark.disabled else max(2, min(20, int(2e10 / flops)))
    dt = "" if dtype == torch.float32 else f" {str(dtype).replace('torch.', '')}"
    label(benchmark, f"nearest_code N={N} K={K} D={D} k={k} {device}{dt}", provider, inputs, NOTE[inputs])
    result = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0 if benchmark.disabled else 1)
    record(benchmark, flops=flops, peak_bytes=peak, threads=torch.get_num_threads())
    return result


def test_reference_eager(benchmark, shape, inputs):
    z, cb = make_inputs(shape, inputs)
    check(ref.nearest_code(z, cb, True), z, cb, shape, inputs, "reference eager")
    run(benchmark, lambda: ref.nearest_code(z, cb, True), shape, "reference eager", inputs,
        rounds=1 if shape[0] * shape[3] > 20000 else None)


def test_reference_compiled(benchmark, shape, inputs):
    z, cb = make_inputs(shape, inputs)
    compiled = torch.compile(ref.nearest_code)
    check(compiled(z, cb, True), z, cb, shape, inputs, "torch.compile(reference)")  # compiles, outside the timing
    run(benchmark, lambda: compiled(z, cb, True), shape, "torch.compile(reference)", inputs,
        rounds=1 if shape[0] * shape[3] > 20000 else None)


def test_fused_cpu(benchmark, shape, inputs):
    z, cb = make_inputs(shape, inputs)
    check(fk.nearest_code(z, cb, True, backend="cpu"), z, cb, shape, inputs, "fused cpu")
    run(benchmark, lambda: fk.nearest_code(z, cb, True, backend="cpu"), shape, "fused cpu", inputs)
    benchmark.extra_info["isa"] = fk._ext.cpu().isa()


@pytest.mark.skipif(faiss is None, reason="faiss-cpu not installed (pip install faiss-cpu)")
@pytest.mark.parametrize("index_type", ["IndexFlatL2", "IndexFlatIP"])
def test_faiss(benchmark, shape, inputs, index_type):
    """faiss in its best configuration: the BLAS/fused top-1 path (threshold 20) at every N."""
    z, cb = make_inputs(shape, inputs)
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
        found = [ix.search(q, 1) for ix, q in zip(indexes, queries)]
        check(torch.stack([torch.from_numpy(i[:, 0]) for _, i in found], 1), z, cb, shape, inputs,
              f"faiss {index_type}", codes=False)
        run(benchmark, lambda: [ix.search(q, 1) for ix, q in zip(indexes, queries)], shape, f"faiss {index_type}",
            inputs)
    finally:
        faiss.cvar.distance_compute_blas_threshold = old
    benchmark.extra_info["config"] = "distance_compute_blas_threshold=20, index built outside timing"


def test_torch_mm_4096(benchmark, smoke):
    """The machine's fp32 matmul rate in this run (4096^3, or 512^3 in smoke mode)."""
    n = 512 if smoke else 4096
    a, b = torch.randn(n, n), torch.randn(n, n)
    rows = (a[:64] @ b).double()  # checked on 64 rows against float64, outside the timing
    torch.testing.assert_close(rows, a[:64].double() @ b.double(), rtol=1e-4, atol=1e-3)
    benchmark.group = "roofline torch.mm"
    benchmark.pedantic(lambda: a @ b, rounds=1 if benchmark.disabled else 5, iterations=1)
    record(benchmark, flops=2.0 * n**3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("provider", ["reference", "compiled", "triton", "cuda"])
def test_gpu(benchmark, shape, inputs, dtype, provider):
    z, cb = make_inputs(shape, inputs, "cuda", dtype)
    if provider == "reference":
        fn = lambda: ref.nearest_code(z, cb, True)
    elif provider == "compiled":
        compiled = torch.compile(ref.nearest_code)
        fn = lambda: compiled(z, cb, True)
    else:
        fn = lambda: fk.nearest_code(z, cb, True, backend=provider)
    check(fn(), z, cb, shape, inputs, provider)

    def timed():
        fn()
        sync("cuda")

    run(benchmark, timed, shape, provider, inputs, device="cuda", rounds=10, dtype=dtype)
