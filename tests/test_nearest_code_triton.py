"""The Triton kernel (fqgan_kernels/triton/nearest_code.py) and the CUDA kernel (csrc/cuda/nearest_code.cu)
of nearest_code, called directly, against reference.nearest_code.

Without a GPU the Triton kernel runs under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors, with
the fixed interpreter config: small shapes that still cross row and code tile edges. The `cuda` tests
run the autotuned Triton kernel and the CUDA kernel at the real sizes (K=16384, D=8) on a GPU.
"""

import pytest
import torch
from tolerances import TOLERANCES

from fqgan_kernels import _common

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (N, K, D, k) under the interpreter (BLOCK_N=64, BLOCK_K=32): N in {1, 17, 65} (one row, a partial
# row block, a full block + 1), K in {1, 7, 33, 100} (one code, one partial tile, a tile + 1, 4 tiles),
# D in {3, 8, 16} (small-D path at an odd D and at the real D, the tl.dot path), k in {1, 2, 3}.
INTERP_SHAPES = [
    (1, 1, 8, 1), (17, 7, 3, 2), (65, 33, 8, 3), (17, 100, 16, 1), (65, 100, 8, 2), (1, 33, 16, 3),
    (17, 100, 3, 3), (65, 7, 16, 2),
]
# bfloat16 / float16 (the search is float32 either way): a subset, the interpreter is slow.
INTERP_SHAPES_LOW = [(17, 7, 3, 2), (65, 100, 8, 2), (17, 33, 16, 1)]
# The same checks on a GPU, at the sizes that matter (real config K=16384, D=8, k=2/3) and odd edges.
# D covers every CUDA path (padded 4, 8, 16, 32, 64, generic > 64) and both Triton paths.
GPU_SHAPES = [
    (1, 16384, 8, 3), (4099, 16384, 8, 3), (65536, 16384, 8, 2), (1000, 1000, 3, 4), (1000, 7, 16, 1),
    (4099, 1000, 32, 2), (257, 333, 5, 3), (1000, 129, 64, 2), (100, 77, 100, 2), (17, 1, 8, 3),
]

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def triton_nearest_code(z, codebooks, l2):
    from fqgan_kernels.triton.nearest_code import nearest_code

    return nearest_code(z.contiguous(), codebooks.contiguous(), l2)


def cuda_nearest_code(z, codebooks, l2):
    from fqgan_kernels import _ext

    module = _ext.cuda()
    if module is None:
        pytest.fail(f"the CUDA extension is not available: {_ext.cuda_status()}")
    return module.nearest_code(z.contiguous(), codebooks.contiguous(), l2)


def check_against_reference(z, codebooks, l2, codes, idx, chunk=1024):
    """The chosen code's (float64) distance is the minimum within 1e-5 relative, whatever the input
    dtype (the kernels search in float32 on inputs that are exact in float32); indices equal the exact
    argmin wherever the runner-up is clearly farther; codes are the chosen (normalised) rows."""
    N, k, D = z.shape
    assert codes.shape == (N, k, D) and codes.dtype == z.dtype and codes.device == z.device
    assert idx.shape == (N, k) and idx.dtype == torch.int64
    assert bool(((idx >= 0) & (idx < codebooks.shape[1])).all())
    if z.is_cuda:
        chunk = max(chunk, 2**26 // (k * codebooks.shape[1]))  # float64 (chunk, k, K) blocks of 512 MiB
    zn, en = _common.maybe_normalize(z.double(), codebooks.double(), l2)
    e2 = (en * en).sum(-1)  # (k, K)
    for start in range(0, N, chunk):  # chunks keep the float64 N x K check small
        zc, ic = zn[start:start + chunk], idx[start:start + chunk]
        d = torch.stack([(zc[:, i] * zc[:, i]).sum(-1, keepdim=True) + e2[i] - 2 * zc[:, i] @ en[i].T
                         for i in range(k)], 1)  # (n, k, K)
        best, exact_idx = d.min(-1)
        chosen = d.gather(-1, ic.unsqueeze(-1)).squeeze(-1)
        scale = (zc * zc).sum(-1) + e2.max(-1).values
        assert torch.all(chosen - best <= 1e-5 * scale + 1e-7), (chosen - best).max()
        top2 = d.topk(min(2, d.shape[-1]), dim=-1, largest=False).values
        separated = (top2[..., -1] - top2[..., 0] > 1e-4 * scale) | (d.shape[-1] == 1)
        assert torch.equal(ic[separated], exact_idx[separated])
    table = _common.l2_normalize(codebooks.float()) if l2 else codebooks.float()
    expect = torch.stack([table[i][idx[:, i]] for i in range(k)], 1).to(z.dtype)
    rtol, atol = TOLERANCES[z.dtype]
    torch.testing.assert_close(codes, expect, rtol=rtol, atol=atol)


def inputs(N, K, D, k, dtype, device="cpu"):
    z = torch.randn(N, k, D, device=device).to(dtype)
    codebooks = torch.randn(k, K, D, device=device).to(dtype)
    return z, codebooks


def tied_inputs(dtype, l2, device="cpu", K=100, D=8, k=2):
    """Codebooks with exact duplicates across code tiles (j = 5, 37, 70, 99) and 9 rows of z right at
    them (scaled by 3 with l2): the lowest j must win. A zero row (j = 1) checks the bias with l2 (its
    distance is ||zh||^2 = 1, not 2)."""
    codebooks = torch.randn(k, K, D, device=device).to(dtype)
    for j in (37, 70, 99):
        codebooks[:, j] = codebooks[:, 5]
    codebooks[:, 1] = 0
    z = torch.cat([codebooks[:, 5].unsqueeze(0).expand(9, k, D) * (3 if l2 else 1),
                   torch.randn(8, k, D, device=device).to(dtype)]).contiguous()
    return z, codebooks


# --- the Triton kernel under the interpreter (or on the GPU when there is one) -----------------------

@needs_triton
@pytest.mark.parametrize("N,K,D,k", INTERP_SHAPES)
@pytest.mark.parametrize("l2", [True, False])
def test_triton_matches_reference(N, K, D, k, l2):
    z, codebooks = inputs(N, K, D, k, torch.float32)
    codes, idx = triton_nearest_code(z, codebooks, l2)
    check_against_reference(z, codebooks, l2, codes, idx)


@needs_triton
@pytest.mark.parametrize("N,K,D,k", INTERP_SHAPES_LOW)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("l2", [True, False])
def test_triton_low_precision(N, K, D, k, dtype, l2):
    z, codebooks = inputs(N, K, D, k, dtype)
    codes, idx = triton_nearest_code(z, codebooks, l2)
    check_against_reference(z, codebooks, l2, codes, idx)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("l2", [True, False])
def test_triton_ties_go_to_lowest_index(dtype, l2):
    z, codebooks = tied_inputs(dtype, l2)
    codes, idx = triton_nearest_code(z, codebooks, l2)
    assert torch.all(idx[:9] == 5), idx[:9]
    check_against_reference(z, codebooks, l2, codes, idx)


@needs_triton
@pytest.mark.parametrize("D", [5, 32])
def test_triton_other_dims(D):
    z, codebooks = inputs(17, 40, D, 2, torch.float32)
    for l2 in (True, False):
        codes, idx = triton_nearest_code(z, codebooks, l2)
        check_against_reference(z, codebooks, l2, codes, idx)


@needs_triton
def test_triton_is_deterministic():
    z, codebooks = inputs(17, 100, 8, 2, torch.float32)
    first = triton_nearest_code(z, codebooks, True)
    second = triton_nearest_code(z, codebooks, True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


# --- on a GPU: the autotuned Triton kernel and the CUDA kernel at real sizes --------------------------

GPU_IMPLS = {"triton": triton_nearest_code, "cuda": cuda_nearest_code}


@pytest.fixture
def no_autotune(monkeypatch):
    """One fixed Triton config: the correctness tests would otherwise sweep every config for every
    (dtype, D, l2) they compile. test_gpu_autotuned_real_config runs the tuned path."""
    monkeypatch.setenv("FQGAN_TRITON_AUTOTUNE", "0")


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("impl", list(GPU_IMPLS))
@pytest.mark.parametrize("N,K,D,k", GPU_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("l2", [True, False])
def test_gpu_matches_reference(impl, N, K, D, k, dtype, l2, no_autotune):
    if impl == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    z, codebooks = inputs(N, K, D, k, dtype, device="cuda")
    codes, idx = GPU_IMPLS[impl](z, codebooks, l2)
    torch.cuda.synchronize()
    check_against_reference(z, codebooks, l2, codes, idx)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("impl", list(GPU_IMPLS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("l2", [True, False])
@pytest.mark.parametrize("K", [100, 16384])
def test_gpu_ties_go_to_lowest_index(impl, dtype, l2, K, no_autotune):
    if impl == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    z, codebooks = tied_inputs(dtype, l2, device="cuda", K=K, k=3)
    if K > 100:  # one more duplicate far away, in the last code tile
        codebooks[:, K - 1] = codebooks[:, 5]
    codes, idx = GPU_IMPLS[impl](z, codebooks, l2)
    assert torch.all(idx[:9] == 5), idx[:9]
    check_against_reference(z, codebooks, l2, codes, idx)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("impl", list(GPU_IMPLS))
def test_gpu_deterministic_and_stream_ordered(impl, no_autotune):
    z, codebooks = inputs(16384, 16384, 8, 3, torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        first = GPU_IMPLS[impl](z, codebooks, True)
        second = GPU_IMPLS[impl](z, codebooks, True)
    stream.synchronize()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    check_against_reference(z[:2048], codebooks, True, first[0][:2048], first[1][:2048])


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_autotuned_real_config(dtype):
    """The real config through triton.autotune (both kernels): K=16384, D=8, k=3."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    z, codebooks = inputs(65536, 16384, 8, 3, dtype, device="cuda")
    for impl in GPU_IMPLS.values():
        codes, idx = impl(z, codebooks, True)
        check_against_reference(z, codebooks, True, codes, idx)


@pytest.mark.cuda
@needs_gpu
def test_triton_and_cuda_agree():
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    z, codebooks = inputs(65536, 16384, 8, 3, torch.float32, device="cuda")
    codes_t, idx_t = triton_nearest_code(z, codebooks, True)
    codes_c, idx_c = cuda_nearest_code(z, codebooks, True)
    # Both search in float32 with different summation orders: they may differ only on near-ties.
    assert (idx_t != idx_c).float().mean().item() < 1e-3
    check_against_reference(z[:4096], codebooks, True, codes_t[:4096], idx_t[:4096])
    check_against_reference(z[:4096], codebooks, True, codes_c[:4096], idx_c[:4096])
