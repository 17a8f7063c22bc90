"""nearest_code: reference eager, torch.compile(reference), the fused CPU kernel, faiss-cpu
(IndexFlatL2 / IndexFlatIP, k=1 search, as a peer) and on GPU the Triton and CUDA kernels.

Inputs: "flat" is z drawn independently of the codes (random directions), "peaked" is z near its
codes (a normalised code plus noise of std 0.05 per dimension), as training produces it; the same
shape in the same run, paired in the summary at the end of the session. The search takes no
exponentials, so the pair checks that nothing else in it depends on the data. The default run times
N = 4096, k = 3 (``HEADLINE_SHAPES``); ``--bench-full`` every shape of ``FULL_SHAPES``.

Before timing, each provider's first result (its warm-up call, benchmarks/conftest.py::timed) is
checked (benchmarks/checks.py): the chosen code's exact float64 distance is the minimum within the
dtype's tolerance, indices equal the exact argmin wherever there is no tie, codes are the chosen
rows; the exact minimum is computed once per case.

GFLOP/s counts 2*N*K*D per sub-codebook. ``peak_extra_MiB`` is the largest extra memory one call
needs (the reference materialises the N x K distance matrix per sub-codebook). A 4096^3
``torch.mm`` in the same run gives the machine's matmul rate to compare against.
"""

from __future__ import annotations

import pytest
import selection
import torch
from checks import Memo, check_nearest, exact_nearest
from conftest import label, record, sync, timed

import fqgan_kernels as fk
from fqgan_kernels import reference as ref

try:
    import faiss
except ImportError:  # optional peer: pip install faiss-cpu (the `bench` extra)
    faiss = None

FULL_SHAPES = [(256, 16384, 8, 3), (4096, 16384, 8, 2), (4096, 16384, 8, 3),
               (16384, 16384, 8, 2), (16384, 16384, 8, 3)]
HEADLINE_SHAPES = [(4096, 16384, 8, 3)]  # the default run (benchmarks/selection.py)
SMOKE_SHAPES = [(64, 512, 8, 2)]
GPU_SHAPES = [(65536, 16384, 8, 3)]
NOTE = {"peaked": "z near its codes (noise std 0.05)", "flat": "z random, independent of the codes"}
NEAR_CODE_NOISE = 0.05

_exact = Memo(size=2)  # (shape, inputs, dtype) -> checks.ExactNearest


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        gpu = metafunc.definition.get_closest_marker("cuda") is not None
        mode = selection.mode(metafunc.config)
        shapes = SMOKE_SHAPES if mode == "smoke" else (
            GPU_SHAPES if gpu else (FULL_SHAPES if mode == "full" else HEADLINE_SHAPES))
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


def checker(z, cb, shape, inputs, what, codes=True):
    """``check(result)``: ``result`` (codes, indices) -- or indices alone -- choose nearest codes."""

    def check(result):
        exact = _exact.get((shape, inputs, z.dtype), lambda: exact_nearest(z, cb, True))
        if codes:
            check_nearest(exact, result[1], result[0], f"nearest_code {what} {inputs} {shape}")
        else:
            check_nearest(exact, result, None, f"nearest_code {what} {inputs} {shape}")

    return check


def run(benchmark, fn, shape, inputs, what, device="cpu", dtype=torch.float32, codes=True, compiles=False):
    """Checks ``fn()``'s first result, then times it (conftest.timed)."""
    N, K, D, k = shape
    dt = "" if dtype == torch.float32 else f" {str(dtype).replace('torch.', '')}"
    label(benchmark, f"N={N} K={K} D={D} k={k}{dt}", NOTE[inputs])
    z, cb = make_inputs(shape, inputs, device, dtype)
    result = timed(benchmark, lambda: fn(z, cb), check=checker(z, cb, shape, inputs, what, codes), device=device,
                   compiles=compiles)
    record(benchmark, flops=2.0 * N * K * D * k, threads=torch.get_num_threads())
    return result


def test_reference_eager(benchmark, shape, inputs):
    run(benchmark, lambda z, cb: ref.nearest_code(z, cb, True), shape, inputs, "reference eager")


def test_reference_compiled(benchmark, shape, inputs):
    compiled = torch.compile(ref.nearest_code)
    run(benchmark, lambda z, cb: compiled(z, cb, True), shape, inputs, "torch.compile(reference)", compiles=True)


def test_fused_cpu(benchmark, shape, inputs):
    run(benchmark, lambda z, cb: fk.nearest_code(z, cb, True, backend="cpu"), shape, inputs, "fused cpu")
    benchmark.extra_info["isa"] = fk._ext.cpu().isa()


@pytest.mark.skipif(faiss is None, reason="faiss-cpu not installed (pip install faiss-cpu)")
@pytest.mark.parametrize("index_type", ["IndexFlatL2", "IndexFlatIP"])
def test_faiss(benchmark, shape, inputs, index_type):
    """faiss in its best configuration: the BLAS/fused top-1 path (threshold 20) at every N."""
    faiss.omp_set_num_threads(torch.get_num_threads())
    old = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 20
    indexes = {}

    def search(z, cb):
        if not indexes:  # built once, outside the timing (the checked first call builds it)
            en = ref.l2_normalize(cb)
            for i in range(shape[3]):
                indexes[i] = getattr(faiss, index_type)(shape[2])
                indexes[i].add(en[i].numpy())
            indexes["queries"] = [ref.l2_normalize(z)[:, i].contiguous().numpy() for i in range(shape[3])]
        found = [indexes[i].search(q, 1) for i, q in enumerate(indexes["queries"])]
        return torch.stack([torch.from_numpy(ix[:, 0]) for _, ix in found], 1)

    try:
        run(benchmark, search, shape, inputs, f"faiss {index_type}", codes=False)
    finally:
        faiss.cvar.distance_compute_blas_threshold = old
    benchmark.extra_info["config"] = "distance_compute_blas_threshold=20, index built outside timing"


def test_torch_mm_4096(benchmark, smoke):
    """The machine's fp32 matmul rate in this run (4096^3, or 512^3 in smoke mode)."""
    n = 512 if smoke else 4096
    a, b = torch.randn(n, n), torch.randn(n, n)

    def check(_):  # 64 rows against float64
        torch.testing.assert_close((a[:64] @ b).double(), a[:64].double() @ b.double(), rtol=1e-4, atol=1e-3)

    label(benchmark, f"{n}^3 fp32")
    timed(benchmark, lambda: a @ b, check=check)
    record(benchmark, flops=2.0 * n**3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("provider", ["reference", "compiled", "triton", "cuda"])
def test_gpu(benchmark, shape, inputs, dtype, provider):
    if provider == "reference":
        fn = lambda z, cb: ref.nearest_code(z, cb, True)
    elif provider == "compiled":
        compiled = torch.compile(ref.nearest_code)
        fn = lambda z, cb: compiled(z, cb, True)
    else:
        fn = lambda z, cb: fk.nearest_code(z, cb, True, backend=provider)

    def synced(z, cb):
        out = fn(z, cb)
        sync("cuda")
        return out

    run(benchmark, synced, shape, inputs, provider, device="cuda", dtype=dtype, compiles=provider == "compiled")
