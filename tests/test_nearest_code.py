"""nearest_code on the reference and CPU backends against reference.nearest_code (the Triton and
CUDA kernels have their own file, test_nearest_code_triton.py)."""

import subprocess
import sys
import textwrap

import pytest
import torch
from tolerances import TOLERANCES

import fqgan_kernels as fk
from fqgan_kernels import _common
from fqgan_kernels import reference as ref

BACKENDS = ["reference", "torch", "cpu"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (N, K, D, k): every N in {1, 17, 1000, 4099}, K in {1, 7, 1000, 16384}, D in {3, 8, 16, 32} and
# k in {1, 2, 3, 4} appears, with the real config (K=16384, D=8, k=3) and SIMD tile edges (K=7, 1000).
SHAPES = [
    (1, 1, 8, 1), (17, 7, 3, 2), (17, 1000, 8, 3), (1000, 7, 16, 4), (1000, 1000, 32, 1),
    (4099, 1000, 8, 2), (17, 16384, 8, 3), (1000, 16384, 4, 1), (4099, 16384, 8, 3), (1, 16384, 32, 4),
    (33, 129, 5, 2), (65, 31, 9, 1),
]


def check_against_reference(z, codebooks, l2, codes, idx, chunk=1024):
    """The chosen code's distance is the exact (float64) minimum within 1e-5 relative; indices equal
    the exact argmin wherever the runner-up is clearly farther; codes are the chosen rows."""
    zn, en = _common.maybe_normalize(z.double(), codebooks.double(), l2)
    for start in range(0, z.shape[0], chunk):  # chunks keep the float64 N x K check small
        zc, ic = zn[start:start + chunk], idx[start:start + chunk]
        d = torch.stack([torch.cdist(zc[:, i], en[i]) ** 2 for i in range(en.shape[0])], 1)  # (n, k, K)
        best, exact_idx = d.min(-1)
        chosen = d.gather(-1, ic.unsqueeze(-1)).squeeze(-1)
        scale = (zc * zc).sum(-1) + (en * en).sum(-1).max(-1).values
        assert torch.all(chosen - best <= 1e-5 * scale + 1e-7), (chosen - best).max()
        top2 = d.topk(min(2, d.shape[-1]), dim=-1, largest=False).values
        separated = (top2[..., -1] - top2[..., 0] > 1e-4 * scale) | (d.shape[-1] == 1)
        assert torch.equal(ic[separated], exact_idx[separated])
    table = _common.l2_normalize(codebooks.float()) if l2 else codebooks.float()
    expect = torch.stack([table[i][idx[:, i]] for i in range(codebooks.shape[0])], 1).to(z.dtype)
    rtol, atol = TOLERANCES[z.dtype]
    torch.testing.assert_close(codes, expect, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,K,D,k", SHAPES)
@pytest.mark.parametrize("l2", [True, False])
def test_matches_reference_fp32(backend, N, K, D, k, l2):
    z = torch.randn(N, k, D)
    codebooks = torch.randn(k, K, D)
    codes, idx = fk.nearest_code(z, codebooks, l2, backend=backend)
    assert codes.shape == (N, k, D) and idx.shape == (N, k) and idx.dtype == torch.long
    check_against_reference(z, codebooks, l2, codes, idx)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K,D,k", [(17, 7, 3, 2), (1000, 1000, 8, 3), (65, 16384, 8, 1)])
def test_low_precision(backend, dtype, N, K, D, k):
    z = torch.randn(N, k, D).to(dtype)
    codebooks = torch.randn(k, K, D).to(dtype)
    codes, idx = fk.nearest_code(z, codebooks, True, backend=backend)
    assert codes.dtype == dtype
    check_against_reference(z, codebooks, True, codes, idx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_lowest_index(backend):
    base = torch.randn(5, 8)
    codebooks = torch.cat([base] * 40).unsqueeze(0)  # every code 40 times, across SIMD tiles
    z = base[[4, 0, 2]].unsqueeze(1) * 3.0
    _, idx = fk.nearest_code(z, codebooks, True, backend=backend)
    assert (idx[:, 0] % 5).tolist() == [4, 0, 2]
    if backend == "cpu":  # the GEMM of reference and torch may round equal columns differently
        assert idx[:, 0].tolist() == [4, 0, 2]
        zero = torch.zeros(2, 1, 8)  # all scores equal: index 0
        assert fk.nearest_code(zero, codebooks, True, backend=backend).indices.tolist() == [[0], [0]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("l2", [True, False])
def test_all_zero_codebook_rows(backend, l2):
    """All-zero codebook rows (e.g. codes zeroed by hand) stay zero when normalised, at distance
    ||z_hat||^2 = 1 from every z_hat: they win for the rows that no code comes within 60 degrees of
    (raw: where every z.e_j < ||e_j||^2 / 2). Of two zero rows the lower index wins."""
    N, K, D, k = 2000, 9, 8, 2
    codebooks = torch.randn(k, K, D)
    codebooks[0, 2] = 0.0
    codebooks[0, 6] = 0.0
    codebooks[1, K - 1] = 0.0
    z = torch.randn(N, k, D)
    codes, idx = fk.nearest_code(z, codebooks, l2, backend=backend)
    check_against_reference(z, codebooks, l2, codes, idx)
    want = ref.nearest_code(z, codebooks, l2).indices
    for i, j in ((0, 2), (1, K - 1)):
        assert (want[:, i] == j).sum() > N // 10  # the inputs exercise the case
        assert (idx[:, i] == j).sum() >= (want[:, i] == j).sum() - N // 1000
    assert not (idx[:, 0] == 6).any()
    assert (codes[idx[:, 0] == 2, 0] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_near_ties(backend):
    codebooks = torch.randn(2, 4096, 8)
    # z midway between two codes: a tie up to rounding, the distance check decides
    z = (0.5 * (codebooks[:, :300] + codebooks[:, 300:600])).transpose(0, 1).contiguous()
    codes, idx = fk.nearest_code(z, codebooks, False, backend=backend)
    check_against_reference(z, codebooks, False, codes, idx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    z = torch.randn(8, 77, 3).permute(1, 2, 0)  # (77, 3, 8), strided
    codebooks = torch.randn(8, 501, 3).permute(2, 1, 0)  # (3, 501, 8), strided
    assert not z.is_contiguous() and not codebooks.is_contiguous()
    codes, idx = fk.nearest_code(z, codebooks, True, backend=backend)
    check_against_reference(z, codebooks, True, codes, idx)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("l2", [True, False])
def test_codebook_gradient_matches_reference(backend, l2):
    codebooks = torch.randn(3, 50, 8, requires_grad=True)
    idx = torch.randint(0, 50, (300, 3))
    z = (codebooks.detach()[torch.arange(3), idx] + 0.01 * torch.randn(300, 3, 8))  # well separated
    g = torch.randn(300, 3, 8)
    codes, _ = fk.nearest_code(z, codebooks, l2, backend=backend)
    (codes * g).sum().backward()
    mine = codebooks.grad.clone()
    codebooks.grad = None
    ref_codes, _ = ref.nearest_code(z, codebooks, l2)
    (ref_codes * g).sum().backward()
    torch.testing.assert_close(mine, codebooks.grad, rtol=1e-5, atol=1e-6)


def test_backward_is_deterministic():
    codebooks = torch.randn(2, 7, 4, requires_grad=True)
    z = torch.randn(5000, 2, 4)
    g = torch.randn(5000, 2, 4)
    grads = []
    for _ in range(2):
        codebooks.grad = None
        (fk.nearest_code(z, codebooks).codes * g).sum().backward()
        grads.append(codebooks.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_gradcheck_float64():
    codebooks = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    z = torch.randn(7, 2, 3, dtype=torch.float64)
    for l2 in (True, False):
        assert torch.autograd.gradcheck(lambda e, l2=l2: fk.nearest_code(z, e, l2).codes, (codebooks,))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_opcheck(backend):
    z = torch.randn(33, 2, 8)
    codebooks = torch.randn(2, 70, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.fqgan.nearest_code.default, (z, codebooks, True, backend))
    idx = torch.randint(0, 70, (33, 2))
    torch.library.opcheck(torch.ops.fqgan.nearest_code_backward.default,
                          (torch.randn(33, 2, 8), idx, codebooks.detach(), True))


def test_torch_compile_fullgraph():
    @torch.compile(fullgraph=True, backend="eager")
    def f(z, e):
        codes, idx = fk.nearest_code(z, e)
        return (codes * 2).sum(), idx

    z, e = torch.randn(40, 2, 8), torch.randn(2, 64, 8, requires_grad=True)
    loss, idx = f(z, e)
    assert torch.equal(idx, fk.nearest_code(z, e).indices)
    loss.backward()
    assert e.grad is not None and e.grad.abs().sum() > 0


def test_cpu_kernel_memory_is_not_n_by_k():
    """N=4096, K=16384, k=3: the reference's distance matrix alone is 256 MiB per sub-codebook;
    the fused kernel's peak extra resident memory (outputs included) must stay under 8 MiB."""
    code = textwrap.dedent("""
        import resource, torch, fqgan_kernels as fk
        z = torch.randn(4096, 3, 8); e = torch.randn(3, 16384, 8)
        fk.nearest_code(z[:8], e[:, :64], backend="cpu")  # load the extension, start threads
        fk.nearest_code(z[:64], e, backend="cpu")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fk.nearest_code(z, e, backend="cpu")
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    extra = int(out.stdout.strip().splitlines()[-1])
    assert extra < 8 * 2**20, f"peak RSS grew by {extra / 2**20:.1f} MiB"


# -- bad input -----------------------------------------------------------------------------------
def test_bad_shapes_and_types():
    e = torch.randn(2, 16, 8)
    with pytest.raises(ValueError, match=r"z must be 3-D \[N, k, D\], got shape \(4, 16\)"):
        fk.nearest_code(torch.randn(4, 16), e)
    with pytest.raises(ValueError, match=r"codebooks must be 3-D"):
        fk.nearest_code(torch.randn(4, 2, 8), torch.randn(16, 8))
    with pytest.raises(ValueError, match="k and D must match"):
        fk.nearest_code(torch.randn(4, 3, 8), e)
    with pytest.raises(ValueError, match="k and D must match"):
        fk.nearest_code(torch.randn(4, 2, 7), e)
    with pytest.raises(TypeError, match="same dtype"):
        fk.nearest_code(torch.randn(4, 2, 8).half(), e)
    with pytest.raises(TypeError, match="dtype"):
        fk.nearest_code(torch.ones(4, 2, 8, dtype=torch.long), e.long())
    with pytest.raises(TypeError, match="torch.Tensor"):
        fk.nearest_code(None, e)
    with pytest.raises(ValueError, match="meta"):
        fk.nearest_code(torch.randn(4, 2, 8, device="meta"), e)
    with pytest.raises(ValueError, match="K = 0"):
        fk.nearest_code(torch.randn(4, 2, 8), torch.randn(2, 0, 8))


def test_non_finite_inputs_name_row_count():
    z = torch.randn(10, 2, 8)
    z[3, 1, 0] = float("nan")
    z[7, 0, 5] = float("-inf")
    with pytest.raises(ValueError, match=r"z has non-finite values \(NaN or Inf\) in 2 of 20 rows"):
        fk.nearest_code(z, torch.randn(2, 16, 8))
    e = torch.randn(2, 16, 8)
    e[1, 4, 2] = float("inf")
    with pytest.raises(ValueError, match="codebooks has non-finite values.*in 1 of 32 rows"):
        fk.nearest_code(torch.randn(10, 2, 8), e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_gives_empty_outputs(backend):
    codes, idx = fk.nearest_code(torch.randn(0, 2, 8), torch.randn(2, 16, 8), backend=backend)
    assert codes.shape == (0, 2, 8) and idx.shape == (0, 2) and idx.dtype == torch.long
