"""entropy_loss (streaming) against reference.entropy_loss: values and gradients to z and the
codebooks, on the reference (chunked torch), cpu and -- on tiny shapes, under the interpreter --
triton backends; float64 gradcheck, opcheck, torch.compile, all-equal-distance rows, peak memory,
bad input. The 2-rank DDP test is tests/test_entropy_loss_ddp.py.

Accuracy rule (as apple/ml-cross-entropy): against the float64 reference on the same inputs, the
kernel's error must be no worse than twice eager PyTorch's error in the same dtype, plus the dtype's
tolerance from conftest.TOLERANCES relative to the largest magnitude, the relative part scaled by
the logits' conditioning max|a_nj| / 40 (>= 1; ~7.5 for normalised inputs at T = 0.01) and so is
the absolute part.
"""

import importlib.util
import subprocess
import sys
import textwrap

import pytest
import torch
from tolerances import TOLERANCES

import fqgan_kernels as fk
from fqgan_kernels import _common
from fqgan_kernels import reference as ref

# (N, K, D, k): 1, odd sizes, CPU chunk edges (K = 512, 513 codes; 32/33 rows per row task) and every k
SHAPES = [(1, 1, 8, 1), (17, 7, 3, 2), (33, 513, 5, 3), (32, 512, 8, 4), (65, 31, 9, 4), (300, 1000, 8, 3)]
REAL = (257, 16384, 8, 3)  # FQGAN: K = 16384, D = 8, k = 3 (N kept small: the float64 truth is N x K)
TRITON_SHAPES = [(1, 1, 8, 1), (17, 7, 3, 2), (20, 40, 8, 3), (33, 45, 5, 4), (9, 21, 20, 2)]  # interpreter: tiny


def make(N, K, D, k, dtype=torch.float32, scale=1.0):
    z = (torch.randn(N, k, D) * scale).to(dtype)
    e = torch.randn(k, K, D).to(dtype)
    return z, e


def loss_and_grads(fn, z, e, weights, device="cpu"):
    z = z.detach().to(device, copy=True).requires_grad_()
    e = e.detach().to(device, copy=True).requires_grad_()
    loss = fn(z, e)
    (loss.double() * weights.to(device)).sum().backward()
    return loss.detach().cpu(), z.grad.cpu(), e.grad.cpu()


def check(backend, z, e, temperature, l2, skip=(), device="cpu"):
    """Value and both gradients vs the float64 reference (on the CPU), no worse than eager in z's
    dtype on ``device``."""
    w = torch.rand(e.shape[0], dtype=torch.float64) + 0.5  # a different weight per sub-codebook
    truth = loss_and_grads(lambda a, b: ref.entropy_loss(a.double(), b.double(), temperature, l2), z, e, w)
    eager = loss_and_grads(lambda a, b: ref.entropy_loss(a, b, temperature, l2), z, e, w, device)
    mine = loss_and_grads(lambda a, b: fk.entropy_loss(a, b, temperature, l2, backend=backend), z, e, w, device)
    rtol, atol = TOLERANCES[z.dtype]
    # Conditioning: rounding moves each logit by ~eps * max|a_nj|, and max|a_nj| reaches hundreds
    # (normalised, T = 0.01) or thousands (raw inputs): the relative tolerance scales with it.
    zn, en = _common.maybe_normalize(z.double(), e.double(), l2)
    amax = (2 * zn.norm(dim=-1).max() * en.norm(dim=-1).max() + en.norm(dim=-1).max() ** 2).item() / temperature
    cond = max(1.0, amax / 40.0)
    rtol, atol = rtol * cond, atol * cond
    for name, t, x, m in zip(("loss", "grad_z", "grad_codebooks"), truth, eager, mine):
        assert m.shape == t.shape and m.dtype == x.dtype, (name, m.shape, m.dtype, x.dtype)
        assert torch.isfinite(m).all(), f"{name} has NaN/Inf"
        if name in skip:
            continue
        err = (m.double() - t).abs().max().item()
        err_eager = (x.double() - t).abs().max().item()
        bound = 2 * err_eager + atol + rtol * t.abs().max().item()
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (eager's error {err_eager:.3g})"


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("N,K,D,k", SHAPES)
@pytest.mark.parametrize("l2", [True, False], ids=["l2", "raw"])
@pytest.mark.parametrize("temperature", [0.01, 1.0])
def test_matches_reference_fp32(backend, N, K, D, k, l2, temperature):
    check(backend, *make(N, K, D, k), temperature, l2)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_real_config_fp32(backend):
    check(backend, *make(*REAL), 0.01, True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(300, 1000, 8, 3), REAL], ids=["N300-K1000", "real"])
def test_low_precision_cpu(dtype, shape):
    check("cpu", *make(*shape, dtype=dtype), 0.01, True)


@pytest.mark.parametrize("N,K,D,k", TRITON_SHAPES)
@pytest.mark.parametrize("l2,temperature", [(True, 0.01), (False, 1.0)], ids=["l2-T0.01", "raw-T1"])
def test_triton_interpreter(triton_available, N, K, D, k, l2, temperature):
    check("triton", *make(N, K, D, k), temperature, l2)


def equal_distance_inputs(N, K, on_code=True):
    """Normalised inputs where rows 0-2 have all distances equal (z = 0: d_nj = |e_j|^2 = 1), the
    second sub-codebook holds one code K times, and rows 3-5 sit exactly on a code (at T = 0.01 the
    logits then spread over ~400)."""
    z, e = make(N, K, 8, 2)
    z, e = _common.l2_normalize(z), _common.l2_normalize(e)
    z[:3] = 0.0
    e[1] = e[1, :1].expand(K, 8)
    if on_code:
        z[3:6] = e[:, 3].unsqueeze(0)
    return z, e


def check_equal_distance_rows(backend, N, K):
    # already normalised, l2 off: compares dL/dzn (through F.normalize, z = 0 has a 1/eps = 1e12 gradient).
    # On these degenerate rows (uniform p, or p one-hot on a code) dL/dz = (2/T)(A + beta B) / W cancels;
    # the backward's renormalisation by W (entropy_loss.py, "Rounding") keeps it within the rule.
    for on_code in (False, True):
        check(backend, *equal_distance_inputs(N, K, on_code=on_code), 0.01, False)
    z, e = equal_distance_inputs(N, K)
    out = loss_and_grads(lambda a, b: fk.entropy_loss(a, b, 0.01, True, backend=backend), z, e, torch.ones(2))
    for x in out:
        assert torch.isfinite(x).all()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_all_equal_distance_rows(backend):
    check_equal_distance_rows(backend, 40, 600)


def test_triton_all_equal_rows(triton_available):
    check_equal_distance_rows("triton", 9, 40)


# -- GPU: the CUDA and the compiled Triton kernels at real sizes ---------------------------------
GPU_SHAPES = [(1, 1, 8, 1), (17, 7, 3, 2), (33, 513, 5, 3), (300, 1000, 8, 4), (1000, 4099, 8, 2), REAL]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("N,K,D,k", GPU_SHAPES)
@pytest.mark.parametrize("l2,temperature", [(True, 0.01), (False, 1.0)], ids=["l2-T0.01", "raw-T1"])
def test_gpu_matches_reference(backend, N, K, D, k, l2, temperature):
    check(backend, *make(N, K, D, k), temperature, l2, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_low_precision(backend, dtype):
    check(backend, *make(*REAL, dtype=dtype), 0.01, True, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_all_equal_distance_rows(backend):
    for on_code in (False, True):
        check(backend, *equal_distance_inputs(40, 600, on_code=on_code), 0.01, False, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_opcheck_and_determinism(backend):
    N, K, D, k = (300, 1000, 8, 2)
    zn = _common.l2_normalize(torch.randn(N, k, D, device="cuda")).requires_grad_()
    en = _common.l2_normalize(torch.randn(k, K, D, device="cuda")).requires_grad_()
    torch.library.opcheck(torch.ops.fqgan.entropy_stats.default, (zn, en, 0.05, backend))
    z, e = make(N, K, D, k)
    grads = [loss_and_grads(lambda a, b: fk.entropy_loss(a, b, backend=backend), z, e, torch.ones(k), "cuda")
             for _ in range(2)]
    for x, y in zip(*grads):
        assert torch.equal(x, y), "the backward is not deterministic"


@pytest.mark.cuda
def test_gpu_memory_is_not_n_by_k():
    """N = 65536, K = 16384, k = 3, forward + backward on the GPU: one N x K float32 buffer is 4 GiB;
    the streaming kernels need O((N + K) k) beyond the inputs and gradients."""
    z = torch.randn(65536, 3, 8, device="cuda", requires_grad=True)
    e = torch.randn(3, 16384, 8, device="cuda", requires_grad=True)
    for backend in ("cuda", "triton"):
        # Compile and autotune at these very shapes first: the autotuner's timing (triton.testing.do_bench)
        # allocates a 256 MiB buffer to flush the L2 cache, which a first call at a new N bucket would count
        # (seen on the H200, 2026-12-04: 283 MiB peak after a warm-up at N = 64).
        fk.entropy_loss(z, e, backend=backend).sum().backward()
        z.grad = e.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fk.entropy_loss(z, e, backend=backend).sum().backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
        z.grad = e.grad = None
        assert extra < 64 * 2**20, f"{backend}: peak extra {extra / 2**20:.1f} MiB"


@pytest.mark.parametrize("l2", [True, False])
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_gradcheck_float64(l2, temperature):
    """The hand-derived backward (entropy_loss.py docstring) against finite differences, float64."""
    z = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    e = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b: fk.entropy_loss(a, b, temperature, l2, backend="torch")
    assert torch.autograd.gradcheck(fn, (z, e))


def test_backward_is_deterministic():
    z, e = make(300, 1000, 8, 2)
    grads = [loss_and_grads(lambda a, b: fk.entropy_loss(a, b, backend="cpu"), z, e, torch.ones(2)) for _ in range(2)]
    for x, y in zip(*grads):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_opcheck(backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_available")
    N, K, D, k = (20, 40, 8, 2)
    zn = _common.l2_normalize(torch.randn(N, k, D)).requires_grad_()
    en = _common.l2_normalize(torch.randn(k, K, D)).requires_grad_()
    torch.library.opcheck(torch.ops.fqgan.entropy_stats.default, (zn, en, 0.05, backend))
    lse, _, _ = torch.ops.fqgan.entropy_stats(zn.detach(), en.detach(), 0.05, backend)
    args = (zn.detach(), en.detach(), lse, torch.randn(k, N), torch.randn(k, N), torch.randn(k, K), 0.05, backend)
    torch.library.opcheck(torch.ops.fqgan.entropy_backward.default, args)


def test_torch_compile_fullgraph():
    @torch.compile(fullgraph=True, backend="eager")
    def f(z, e):
        return fk.entropy_loss(z, e, 0.01).sum() * 0.03

    z, e = make(40, 64, 8, 2)
    z.requires_grad_()
    e.requires_grad_()
    loss = f(z, e)
    torch.testing.assert_close(loss, fk.entropy_loss(z, e, 0.01).sum() * 0.03)
    loss.backward()
    assert z.grad is not None and e.grad is not None and e.grad.abs().sum() > 0


def test_cpu_memory_is_not_n_by_k():
    """N=4096, K=16384, k=3, forward + backward: the reference needs 256 MiB per N x K buffer and
    several of them; the streaming op's peak extra resident memory must stay under 16 MiB."""
    code = textwrap.dedent("""
        import resource, torch, fqgan_kernels as fk
        z = torch.randn(4096, 3, 8, requires_grad=True); e = torch.randn(3, 16384, 8, requires_grad=True)
        fk.entropy_loss(z[:64], e, backend="cpu").sum().backward()  # load the extension, start threads
        z.grad = e.grad = None
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fk.entropy_loss(z, e, backend="cpu").sum().backward()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    extra = int(out.stdout.strip().splitlines()[-1])
    assert extra < 16 * 2**20, f"peak RSS grew by {extra / 2**20:.1f} MiB"


# -- bad input -----------------------------------------------------------------------------------
def test_bad_temperature():
    z, e = make(4, 16, 8, 2)
    for t in (0, 0.0, -0.01, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            fk.entropy_loss(z, e, t)
    for t in ("0.01", None, True, torch.tensor(0.01)):
        with pytest.raises(TypeError, match="temperature must be a real number"):
            fk.entropy_loss(z, e, t)


def test_wide_codes_on_gpu_kernels(triton_available):
    """D > 64: the triton (and cuda) kernels refuse before any launch, naming the torch path; that
    path takes any D. float64 runs on the torch path, so it is not refused."""
    z, e = make(5, 12, 65, 2)
    with pytest.raises(ValueError, match=r"triton kernels take D <= 64, got D = 65.*backend='torch'"):
        fk.entropy_loss(z, e, backend="triton")
    assert torch.isfinite(fk.entropy_loss(z, e, backend="torch")).all()
    assert torch.isfinite(fk.entropy_loss(z.double(), e.double(), backend="triton")).all()
    check("triton", *make(5, 12, 64, 2), 0.01, True)  # the widest accepted


def test_gpu_width_limit_is_one_number():
    """The front door's limit is the CUDA kernels' kEntropyMaxD and the widest Triton BLOCK_D list."""
    import pathlib
    import re

    from fqgan_kernels._common import ENTROPY_GPU_MAX_D

    header = pathlib.Path(__file__).parents[1] / "csrc" / "cuda" / "entropy_loss.cuh"
    assert int(re.search(r"kEntropyMaxD = (\d+);", header.read_text()).group(1)) == ENTROPY_GPU_MAX_D
    if importlib.util.find_spec("triton") is not None:
        from fqgan_kernels.triton import entropy_loss as tri

        assert max(bd for _, bd in tri.TUNING) == ENTROPY_GPU_MAX_D == tri.MAX_D


def test_bad_shapes_types_devices():
    e = torch.randn(2, 16, 8)
    with pytest.raises(ValueError, match="k and D must match"):
        fk.entropy_loss(torch.randn(4, 3, 8), e)
    with pytest.raises(ValueError, match=r"z must be 3-D"):
        fk.entropy_loss(torch.randn(4, 16), e)
    with pytest.raises(TypeError, match="same dtype"):
        fk.entropy_loss(torch.randn(4, 2, 8).half(), e)
    with pytest.raises(TypeError, match="dtype"):
        fk.entropy_loss(torch.ones(4, 2, 8, dtype=torch.long), e.long())
    with pytest.raises(ValueError, match="meta"):
        fk.entropy_loss(torch.randn(4, 2, 8, device="meta"), e)
    with pytest.raises(ValueError, match="N = 0 rows"):
        fk.entropy_loss(torch.randn(0, 2, 8), e)
    with pytest.raises(TypeError, match="distributed must be"):
        fk.entropy_loss(torch.randn(4, 2, 8), e, distributed="yes")
    with pytest.raises(ValueError, match="initialised torch.distributed"):
        fk.entropy_loss(torch.randn(4, 2, 8), e, distributed=True)
    with pytest.raises(ValueError, match="unknown backend"):
        fk.entropy_loss(torch.randn(4, 2, 8), e, backend="fast")
