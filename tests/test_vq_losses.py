"""Fused codebook / commitment / disentanglement losses (fqgan_kernels.vq_losses): values and
gradients against the composition of reference.vq_losses, _common.straight_through and
reference.disentangle_loss, on every backend; opcheck, gradcheck, torch.compile, bad input."""

import pytest
import torch
from tolerances import HAS_CUDA, TOLERANCES
from torch.utils._python_dispatch import TorchDispatchMode

import fqgan_kernels as fk
from fqgan_kernels import _common, reference
from fqgan_kernels.vq_losses import _vq_losses_backward_op, _vq_losses_op

# (N, k, D): 1 row, odd sizes, the Triton forward tile edge (256) +- 1, the real config (k=3, D=8).
SHAPES = [(1, 1, 8), (1, 3, 8), (7, 2, 5), (255, 3, 8), (257, 4, 3), (513, 3, 8)]
REAL = (8192, 3, 8)
WEIGHTS = dict(codebook_weight=1.0, commitment_weight=0.25, disentangle_weight=0.1)


def cpu_backends():
    names = ["torch", "cpu"]
    if fk.backends()["triton"].available:
        names.append("triton")
    return names


def reference_terms(z, codes, codebook_weight, commitment_weight, disentangle_weight):
    vq = reference.vq_losses(z, codes)
    dis = reference.disentangle_loss(_common.straight_through(z, codes))
    return codebook_weight * vq.codebook, commitment_weight * vq.commitment, disentangle_weight * dis


def make_inputs(shape, dtype=torch.float32, device="cpu", normalized=True):
    z = torch.randn(shape, dtype=torch.float32, device=device)
    codes = torch.randn(shape, dtype=torch.float32, device=device)
    if normalized:  # the quantizer's inputs: unit z and unit codes
        z, codes = _common.l2_normalize(z), _common.l2_normalize(codes)
    return z.to(dtype).requires_grad_(), codes.to(dtype).requires_grad_()


def check_against_reference(shape, backend, dtype=torch.float32, weights=WEIGHTS, device="cpu"):
    z, codes = make_inputs(shape, dtype, device)
    out = fk.vq_losses(z, codes, backend=backend, **weights)
    # Ground truth in float32 (float64 for float64) from the same rounded inputs.
    dt = torch.float64 if dtype == torch.float64 else torch.float32
    zr = z.detach().to(dt).requires_grad_()
    cr = codes.detach().to(dt).requires_grad_()
    ref = reference_terms(zr, cr, **weights)
    grads = [torch.randn_like(t) for t in ref]
    sum((o * g.to(o.dtype)).sum() for o, g in zip(out, grads)).backward()
    total = sum((r * g).sum() for r, g in zip(ref, grads))
    total.backward()
    rtol, atol = TOLERANCES[dtype]
    for name, o, r in zip(("codebook", "commitment", "disentangle"), out, ref):
        assert o.dtype == dt and o.shape == r.shape, name
        assert torch.isfinite(o).all(), name
        torch.testing.assert_close(o, r, rtol=max(rtol, 1e-5), atol=atol, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(z.grad.to(dt), zr.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(codes.grad.to(dt), cr.grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", cpu_backends())
def test_values_and_gradients(shape, backend):
    check_against_reference(shape, backend)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_float64_matches_reference(k, backend):
    check_against_reference((33, k, 8), backend, torch.float64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", cpu_backends())
def test_low_precision(dtype, backend):
    check_against_reference((129, 3, 8), backend, dtype)


def test_real_config_cpu():
    check_against_reference(REAL, "cpu")


@pytest.mark.parametrize("weights", [dict(codebook_weight=0.0, commitment_weight=0.0, disentangle_weight=0.0),
                                     dict(codebook_weight=2.0, commitment_weight=0.0, disentangle_weight=1.0)])
def test_weights(weights):
    check_against_reference((50, 3, 8), "cpu", weights=weights)


def test_unnormalised_and_zero_codes():
    """Codes that are not unit, and an all-zero code row (F.normalize's eps branch)."""
    z = torch.randn(20, 3, 4, requires_grad=True)
    codes = torch.randn(20, 3, 4) * 3
    codes[5, 1] = 0.0
    codes.requires_grad_()
    for backend in cpu_backends():
        out = fk.vq_losses(z, codes, backend=backend, **WEIGHTS)
        zr, cr = z.detach().clone().requires_grad_(), codes.detach().clone().requires_grad_()
        ref = reference_terms(zr, cr, **WEIGHTS)
        (sum(o.sum() for o in out)).backward()
        sum(r.sum() for r in ref).backward()
        for o, r in zip(out, ref):
            torch.testing.assert_close(o, r)
        torch.testing.assert_close(z.grad, zr.grad)
        torch.testing.assert_close(codes.grad, cr.grad)
        z.grad = codes.grad = None


def test_gradient_paths_follow_fqgan():
    """The codebook loss trains codes only, commitment and disentanglement train z only."""
    z, codes = make_inputs((16, 3, 8))
    out = fk.vq_losses(z, codes, backend="cpu", **WEIGHTS)
    gz, gc = torch.autograd.grad(out.codebook.sum(), (z, codes), retain_graph=True, materialize_grads=True)
    assert gz.abs().max() == 0 and gc.abs().max() > 0
    gz, gc = torch.autograd.grad(out.commitment.sum(), (z, codes), retain_graph=True, materialize_grads=True)
    assert gz.abs().max() > 0 and gc.abs().max() == 0
    gz, gc = torch.autograd.grad(out.disentangle, (z, codes), materialize_grads=True)
    assert gz.abs().max() > 0 and gc.abs().max() == 0


def test_deterministic_over_thread_counts():
    z, codes = make_inputs((3000, 3, 8))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fk.vq_losses(z, codes, backend="cpu", **WEIGHTS)
        torch.set_num_threads(max(2, threads))
        many = fk.vq_losses(z, codes, backend="cpu", **WEIGHTS)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_gradcheck_float64(k, backend):
    """Each term against finite differences along the path it trains (a stop-gradient has no
    finite-difference counterpart, so the frozen input is a constant, as sg makes it)."""
    z = torch.randn(5, k, 3, dtype=torch.float64, requires_grad=True)
    codes = torch.randn(5, k, 3, dtype=torch.float64, requires_grad=True)
    w = dict(codebook_weight=0.7, commitment_weight=0.25, disentangle_weight=0.3, backend=backend)
    zc, cc = z.detach().clone(), codes.detach().clone()
    assert torch.autograd.gradcheck(lambda c: fk.vq_losses(zc, c, **w).codebook, (codes,))
    assert torch.autograd.gradcheck(lambda x: fk.vq_losses(x, cc, **w).commitment, (z,))
    # Straight-through: the disentanglement value is that of the codes, its gradient goes to z.
    # With codes = z (same storage, no grad path) finite differences of z see the codes move.
    assert torch.autograd.gradcheck(lambda x: fk.vq_losses(x, x.detach(), **w).disentangle, (codes,))


@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck(backend):
    z, codes = make_inputs((9, 3, 8))
    torch.library.opcheck(_vq_losses_op, (z, codes, 1.0, 0.25, 0.1, backend))
    coef = torch.rand(7)
    torch.library.opcheck(_vq_losses_backward_op, (z.detach(), codes.detach(), coef, True, backend))


def test_compile_fullgraph():
    z, codes = make_inputs((40, 3, 8))

    def step(z, codes):
        out = fk.vq_losses(z, codes, backend="cpu", **WEIGHTS)
        return out.codebook.sum() + out.commitment.sum() + out.disentangle

    eager = step(z, codes)
    gz, gc = torch.autograd.grad(eager, (z, codes))
    compiled = torch.compile(step, fullgraph=True, backend="eager")(z, codes)
    cgz, cgc = torch.autograd.grad(compiled, (z, codes))
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(cgz, gz)
    torch.testing.assert_close(cgc, gc)


def test_bad_input():
    z, codes = make_inputs((4, 2, 3))
    with pytest.raises(TypeError, match="z must be a torch.Tensor"):
        fk.vq_losses([1.0], codes)
    with pytest.raises(ValueError, match=r"shape \(4, 2, 3\).*\(4, 3, 3\)"):
        fk.vq_losses(z, torch.randn(4, 3, 3))
    with pytest.raises(ValueError, match="3-D"):
        fk.vq_losses(z[0], codes[0])
    with pytest.raises(TypeError, match="same dtype"):
        fk.vq_losses(z, codes.double())
    with pytest.raises(TypeError, match="dtype"):
        fk.vq_losses(z.int(), codes.int())
    with pytest.raises(TypeError, match="commitment_weight must be a real number"):
        fk.vq_losses(z, codes, commitment_weight="0.25")
    with pytest.raises(TypeError, match="disentangle_weight"):
        fk.vq_losses(z, codes, disentangle_weight=True)
    with pytest.raises(ValueError, match="codebook_weight must be a finite number >= 0"):
        fk.vq_losses(z, codes, codebook_weight=-1.0)
    with pytest.raises(ValueError, match="N >= 1"):
        fk.vq_losses(z[:0], codes[:0])
    bad = codes.detach().clone()
    bad[2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="codes has non-finite"):
        fk.vq_losses(z, bad)
    with pytest.raises(ValueError, match="unknown backend"):
        fk.vq_losses(z, codes, backend="nope")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", [*SHAPES, REAL, (65536, 3, 8)])
def test_gpu_backends(backend, shape):
    check_against_reference(shape, backend, device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_low_precision(backend, dtype):
    check_against_reference((1000, 3, 8), backend, dtype, device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_opcheck():
    z, codes = make_inputs((300, 3, 8), device="cuda")
    for backend in ("cuda", "triton"):
        torch.library.opcheck(_vq_losses_op, (z, codes, 1.0, 0.25, 0.1, backend))


class _LargestTensor(TorchDispatchMode):
    """Largest tensor any torch op (the custom ops included) returns while active, in elements."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_quantizer_training_step_builds_no_n_by_k_tensor():
    """A full training step (entropy and disentanglement on) on backend auto: no N x K buffer; the
    largest tensor is O(N*k*D + k*K*D). (The C++ kernels allocate O(N + K) per sub-codebook.)"""
    N, kk, K, D = 1024, 3, 2048, 8
    q = fk.FactorizedQuantizer(num_codebooks=kk, codebook_size=K, codebook_dim=D, entropy_weight=0.03,
                               disentangle_weight=0.1)
    z = torch.randn(4, kk * D, 16, 16, requires_grad=True)
    with _LargestTensor() as mode:
        out = q(z, return_loss_breakdown=True)
        out.loss.backward()
    assert mode.largest <= max(N * kk * D, kk * K * D), mode.largest
    assert mode.largest < N * K
