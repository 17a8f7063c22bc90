"""Accuracy of the compiled kernels against float64 (docs/numerics.md).

Each op runs on float32 (or bf16) inputs and is compared with fqgan_kernels.reference evaluated in
float64 on the same values. Two places:

* here, on CPU: the Triton kernels under ``TRITON_INTERPRET=1``. numpy executes the kernel body in
  float32 with correctly rounded exp/log/div, so this measures the error of the kernels' algorithm
  (summation order, online log-sum-exp, renormalisation) and nothing of the GPU's approximate
  instructions (ex2.approx, rcp.approx, flush-to-zero).
* on a GPU (``cuda`` marker; skipped here): the Triton and CUDA kernels as compiled, so the
  figures include the approximate instructions of docs/numerics.md.

The assertions are the accuracy contract (they fail if a kernel gets worse); the measured figures
are printed and, with ``FQGAN_NUMERICS_OUT=path`` (scripts/gpu_check.sh sets it), appended to that
file as JSON lines.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import fqgan_kernels as fk
from fqgan_kernels import _common
from fqgan_kernels import reference as ref

HAS_CUDA = torch.cuda.is_available()
try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

F32_EPS = torch.finfo(torch.float32).eps


def record(op: str, backend: str, device: str, dtype: torch.dtype, shape: tuple, **metrics: float) -> None:
    row = {"op": op, "backend": backend, "device": device, "dtype": str(dtype).replace("torch.", ""),
           "shape": list(shape), **{k: float(v) for k, v in metrics.items()}}
    print("numerics", json.dumps(row))
    path = os.environ.get("FQGAN_NUMERICS_OUT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def gen(device: str, seed: int = 0) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


# -- measurements (device-agnostic) ---------------------------------------------------------------
def nearest_code_errors(backend, device, N, K, D, k, dtype=torch.float32):
    g = gen(device)
    z = torch.randn(N, k, D, generator=g).to(device, dtype)
    cb = torch.randn(k, K, D, generator=g).to(device, dtype)
    _, idx = fk.nearest_code(z, cb, True, backend=backend)
    zn, en = _common.l2_normalize(z.double()), _common.l2_normalize(cb.double())
    mism, regret = 0, 0.0
    for i in range(k):
        d = ref.squared_distances(zn[:, i], en[i])  # float64 truth
        best = d.min(-1).values
        got = d.gather(1, idx[:, i:i + 1].long()).squeeze(1)
        mism += int((idx[:, i] != d.argmin(-1)).sum())
        regret = max(regret, float((got - best).max()))
    return mism / (N * k), regret


def entropy_errors(backend, device, N, K, D, k, T=0.01):
    g = gen(device)
    z = torch.randn(N, k, D, generator=g).to(device)
    cb = torch.randn(k, K, D, generator=g).to(device)
    z32, cb32 = z.clone().requires_grad_(), cb.clone().requires_grad_()
    loss = fk.entropy_loss(z32, cb32, T, backend=backend)
    w = torch.linspace(0.5, 1.5, k, device=device)
    (loss * w).sum().backward()
    z64, cb64 = z.double().requires_grad_(), cb.double().requires_grad_()
    loss64 = ref.entropy_loss(z64, cb64, T)
    (loss64 * w.double()).sum().backward()
    return (float(((loss.detach().double() - loss64.detach()).abs() / loss64.detach().abs().clamp_min(1e-12)).max()),
            rel(z32.grad, z64.grad), rel(cb32.grad, cb64.grad))


def lce_errors(backend, device, k, N, H, V, dtype):
    g = gen(device)
    x = torch.randn(k, N, H, generator=g).to(device, dtype)
    w = (torch.randn(k, V, H, generator=g) * (2.0 / H**0.5)).to(device, dtype)
    t = torch.randint(0, V, (k, N), generator=g).to(device)
    t[:, ::7] = -100
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fk.linear_cross_entropy(xa, wa, t, backend=backend).loss
    loss.backward()
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()  # the same (rounded) values
    loss64 = ref.linear_cross_entropy(x64, w64, t).loss
    loss64.backward()
    loss, loss64 = float(loss.detach()), float(loss64.detach())
    return abs(loss - loss64) / abs(loss64), rel(xa.grad, x64.grad), rel(wa.grad, w64.grad)


def vq_errors(backend, device, N, k, D):
    g = gen(device)
    z = torch.randn(N, k, D, generator=g).to(device)
    c = (z + 0.1 * torch.randn(N, k, D, generator=g).to(device))
    za, ca = z.clone().requires_grad_(), c.clone().requires_grad_()
    out = fk.vq_losses(za, ca, disentangle_weight=0.1, backend=backend)
    (out.codebook.sum() + out.commitment.sum() + out.disentangle).backward()
    z64, c64 = z.double().requires_grad_(), c.double().requires_grad_()
    out64 = fk.vq_losses(z64, c64, disentangle_weight=0.1, backend="reference")
    (out64.codebook.sum() + out64.commitment.sum() + out64.disentangle).backward()
    vals = torch.cat([out.codebook, out.commitment, out.disentangle.reshape(1)]).detach().double()
    vals64 = torch.cat([out64.codebook, out64.commitment, out64.disentangle.reshape(1)]).detach()
    return float(((vals - vals64).abs() / vals64.abs()).max()), rel(za.grad, z64.grad), rel(ca.grad, c64.grad)


def sample_mismatch(backend, device, B, V, dtype):
    """Fraction of rows whose token differs from the float64 draw with the same uniform."""
    g = gen(device)
    worst = 0.0
    for cfg, temp, top_k, top_p in [(4.0, 1.0, 0, 1.0), (3.0, 0.9, 600, 0.9), (2.0, 0.8, 0, 0.8)]:
        c = (torch.randn(B, V, generator=g) * 3).to(device, dtype)
        un = (torch.randn(B, V, generator=g) * 3).to(device, dtype)
        u = torch.rand(B, generator=g, dtype=torch.float64).to(device)
        tok = fk.sample(c, un, cfg_scale=cfg, temperature=temp, top_k=top_k, top_p=top_p, uniform=u,
                        backend=backend)
        c64, un64 = c.double(), un.double()
        logits = (un64 + cfg * (c64 - un64)) / temp
        logits = ref.top_k_top_p_filter(logits, top_k, top_p)
        cdf = logits.softmax(-1).cumsum(-1)
        tok64 = torch.searchsorted(cdf, (u * cdf[:, -1]).reshape(-1, 1), right=True).squeeze(-1).clamp_max(V - 1)
        worst = max(worst, float((tok != tok64).double().mean()))
    return worst


# -- bounds (the contract) ------------------------------------------------------------------------
# nearest_code: a mismatch with the float64 argmin is allowed only on a near-tie: the chosen code's
# float64 distance exceeds the best by at most a few float32 roundings of a D = 8 dot product.
NEAREST_REGRET = 64 * F32_EPS
# entropy at T = 0.01: logits are ~200 x the distances, so float32 rounding of the logits is
# amplified; relative errors of 1e-4 (loss) and 1e-3 (gradients) leave a 10x margin over the measured.
ENTROPY_LOSS, ENTROPY_GRAD = 1e-4, 1e-3
LCE = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-3, 2e-2)}
VQ = (1e-5, 1e-5)
SAMPLE_MISMATCH = 1 / 32


def check_nearest(backend, device, shape, dtype=torch.float32):
    mism, regret = nearest_code_errors(backend, device, *shape, dtype=dtype)
    record("nearest_code", backend, device, dtype, shape, index_mismatch_rate=mism, max_regret=regret)
    assert regret <= NEAREST_REGRET, regret


def check_entropy(backend, device, shape):
    loss, gz, ge = entropy_errors(backend, device, *shape)
    record("entropy_loss", backend, device, torch.float32, shape, loss_rel=loss, grad_z_rel=gz, grad_e_rel=ge)
    assert loss <= ENTROPY_LOSS and gz <= ENTROPY_GRAD and ge <= ENTROPY_GRAD, (loss, gz, ge)


def check_lce(backend, device, shape, dtype):
    loss, gx, gw = lce_errors(backend, device, *shape, dtype)
    record("linear_cross_entropy", backend, device, dtype, shape, loss_rel=loss, grad_hidden_rel=gx, grad_weight_rel=gw)
    lo, gr = LCE[dtype]
    assert loss <= lo and gx <= gr and gw <= gr, (loss, gx, gw)


def check_vq(backend, device, shape):
    val, gz, gc = vq_errors(backend, device, *shape)
    record("vq_losses", backend, device, torch.float32, shape, value_rel=val, grad_z_rel=gz, grad_codes_rel=gc)
    assert val <= VQ[0] and max(gz, gc) <= VQ[1], (val, gz, gc)


def check_sample(backend, device, shape, dtype):
    mism = sample_mismatch(backend, device, *shape, dtype)
    record("sample", backend, device, dtype, shape, token_mismatch_rate=mism)
    assert mism <= SAMPLE_MISMATCH, mism


# -- CPU: the Triton kernels' algorithm under the interpreter ---------------------------------------
needs_interpreter = pytest.mark.skipif(not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="needs triton under TRITON_INTERPRET=1")


@needs_interpreter
def test_interpreter_nearest_code():
    check_nearest("triton", "cpu", (256, 600, 8, 2))


@needs_interpreter
def test_interpreter_entropy_loss():
    check_entropy("triton", "cpu", (40, 200, 8, 2))


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_interpreter_linear_cross_entropy(dtype):
    check_lce("triton", "cpu", (2, 32, 32, 200), dtype)


@needs_interpreter
def test_interpreter_vq_losses():
    check_vq("triton", "cpu", (300, 3, 8))


@needs_interpreter
def test_interpreter_sample():
    check_sample("triton", "cpu", (4, 500), torch.float32)


# -- GPU: the kernels as compiled (approximate instructions included) --------------------------------
GPU_BACKENDS = ["triton", "cuda"]


def _skip_unavailable(backend):
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(16384, 16384, 8, 3), (4096, 4096, 16, 2)], ids=["D8", "D16"])
def test_gpu_nearest_code(backend, dtype, shape):
    _skip_unavailable(backend)
    check_nearest(backend, "cuda", shape, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", [(4096, 16384, 8, 3), (1000, 2000, 16, 2), (700, 1500, 40, 2), (700, 1500, 64, 2)],
                         ids=["D8", "D16", "D40", "D64"])
def test_gpu_entropy_loss(backend, shape):
    """D = 16 and 64 also cover the CUDA rows-backward kernel's register fixes (entropy_loss.cu)."""
    _skip_unavailable(backend)
    check_entropy(backend, "cuda", shape)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_linear_cross_entropy(backend, dtype):
    _skip_unavailable(backend)
    check_lce(backend, "cuda", (2, 4096, 1024, 16384), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_vq_losses(backend):
    _skip_unavailable(backend)
    check_vq(backend, "cuda", (65536, 3, 8))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_sample(backend, dtype):
    _skip_unavailable(backend)
    check_sample(backend, "cuda", (64, 16384), dtype)
