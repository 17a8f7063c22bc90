"""Floating-point state and subnormal handling of the CPU kernels (csrc/cpu/fpstate.h).

The kernels run with flush-to-zero and denormals-are-zero set in every thread that runs kernel
code (Intel cores take a microcode assist per subnormal otherwise) and put each thread's control
state back afterwards. Checked here:

* every op, forward and backward, leaves the control bits of the calling thread and of every
  OpenMP worker exactly as it found them, with flushing off (the default), on in the caller only
  (``torch.set_flush_denormal(True)``) and on in every thread;
* the kernels do flush (a result made only of subnormal terms comes out 0, in every thread);
* on peaked inputs, where the kernels used to make subnormals in bulk, results still match the
  references within the accuracy rules of the op's own test file;
* every instruction-set path (``FQGAN_CPU_ISA=portable|avx2|avx512``, read once per process, so
  each forced path runs in a subprocess) gives the results of the native one, for every op.

The sticky exception flags (MXCSR bits 0-5) are status, not control: any float operation may set
them, so the comparison masks them out.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
from test_entropy_loss import check as check_entropy
from test_linear_cross_entropy import (
    check_no_worse_than_eager,
    eager,
    loss_and_grads,
    make_inputs,
    truth_of,
)
from test_nearest_code import check_against_reference as check_nearest
from test_sample import assert_same_draws, make_logits

import fqgan_kernels as fk
from fqgan_kernels import _common, _ext
from fqgan_kernels import reference as ref

C = _ext.cpu()
pytestmark = pytest.mark.skipif(C is None or C.fpstate_flush_bits() == 0,
                                reason="no CPU extension, or no flush-to-zero control on this CPU")
STATUS_BITS = 0x3F if platform.machine().lower() in ("x86_64", "amd64", "i686") else 0


def control(x: int) -> int:
    return x & ~STATUS_BITS


def state() -> tuple[int, list[int]]:
    """(calling thread's control bits, each thread's control bits in one parallel region)."""
    return control(C.fpstate()), [control(x) for x in C.fpstate_all_threads()]


# -- ops, each run forward and backward on small peaked inputs (subnormal territory) -----------
def run_nearest_code():
    z = torch.randn(300, 3, 8) * 1e-20  # tiny products z . e
    fk.nearest_code(z, torch.randn(3, 1000, 8), backend="cpu")


def run_entropy():
    z = torch.randn(130, 2, 8, requires_grad=True)
    e = torch.randn(2, 700, 8, requires_grad=True)
    fk.entropy_loss(z, e, 0.01, backend="cpu").sum().backward()


def run_vq_losses():
    z = torch.randn(600, 3, 8)
    codes = (z + 1e-20 * torch.randn_like(z)).requires_grad_()  # diff^2 ~ 1e-40: subnormal
    z.requires_grad_()
    out = fk.vq_losses(z, codes, disentangle_weight=0.1, backend="cpu")
    sum(t.sum() for t in out).backward()


def run_lce(reduction):
    def run():
        hidden, weight, targets, _ = make_inputs(2, 70, 3000, 16)
        with torch.no_grad():
            weight.mul_(30.0)  # logits spread over hundreds
        out = fk.linear_cross_entropy(hidden, weight, targets, reduction=reduction, backend="cpu")
        out.loss.sum().backward()
    return run


def run_sample():
    cond, uncond = make_logits(16, 3000, torch.float32, cfg=True, scale=300.0)
    fk.sample(cond, uncond, cfg_scale=1.75, top_p=0.9, backend="cpu")


OPS = {
    "nearest_code": run_nearest_code,
    "entropy_loss": run_entropy,
    "vq_losses": run_vq_losses,
    "linear_cross_entropy-mean": run_lce("mean"),  # gradients in the forward
    "linear_cross_entropy-none": run_lce("none"),  # gradients in the backward
    "sample": run_sample,
}


@pytest.fixture(params=["off", "caller", "all"], ids=["ftz-off", "ftz-caller", "ftz-all-threads"])
def fp_mode(request):
    """Flush-to-zero off everywhere, on in the calling thread only, or on in every thread."""
    C.set_flush_denormal_all_threads(False)
    torch.set_flush_denormal(False)
    if request.param == "caller":
        assert torch.set_flush_denormal(True)
    elif request.param == "all":
        C.set_flush_denormal_all_threads(True)
    yield request.param
    C.set_flush_denormal_all_threads(False)
    torch.set_flush_denormal(False)


@pytest.mark.parametrize("op", OPS)
def test_op_restores_fp_state(op, fp_mode):
    flush = C.fpstate_flush_bits()
    caller, threads = state()
    assert (caller & flush == flush) == (fp_mode != "off")
    if fp_mode == "all":
        assert all(t & flush == flush for t in threads)
    OPS[op]()
    after_caller, after_threads = state()
    assert after_caller == caller, f"{op}: caller {caller:#x} -> {after_caller:#x}"
    assert after_threads == threads, f"{op}: threads {[hex(t) for t in threads]} -> {[hex(t) for t in after_threads]}"


def test_state_helpers_see_every_thread():
    """The bindings the test relies on: one entry per thread, and setting reaches every thread."""
    n = torch.get_num_threads()
    flush = C.fpstate_flush_bits()
    try:
        C.set_flush_denormal_all_threads(True)
        assert len(C.fpstate_all_threads()) == n
        assert all(x & flush == flush for x in C.fpstate_all_threads())
        assert C.fpstate() & flush == flush
        C.set_flush_denormal_all_threads(False)
        assert all(x & flush == 0 for x in C.fpstate_all_threads())
    finally:
        C.set_flush_denormal_all_threads(False)


def test_kernels_flush_subnormals_in_every_thread():
    """|z| in [1e-18, 2e-18] and codes = z (1 + 2^-10): every squared difference is ~1e-42, a subnormal
    float32. The kernel's threads flush them to 0 (the loss is exactly 0); plain PyTorch (flushing
    off) keeps them. Rows enough for several 512-row blocks, so every worker thread sums some."""
    z = (1 + torch.rand(4096, 3, 8)) * torch.randn(4096, 3, 8).sign() * 1e-18
    codes = z * (1 + 2**-10)
    sq = (codes - z) ** 2
    assert (sq > 0).all() and (sq < torch.finfo(torch.float32).tiny).all()
    out = fk.vq_losses(z, codes, disentangle_weight=0.0, backend="cpu")
    assert (out.codebook == 0).all() and (out.commitment == 0).all()
    want = ref.vq_losses(z, codes)
    assert (want.codebook > 0).all()  # the reference (no flushing) keeps them


# -- peaked inputs: same results as the references ---------------------------------------------
def test_entropy_peaked_rows_match_reference():
    """T = 0.01 on rows that sit near one code: p is nearly one-hot, the other exps underflow."""
    N, K, D, k = 200, 2048, 8, 2
    e = _common.l2_normalize(torch.randn(k, K, D))
    pick = torch.randint(0, K, (N, k))
    z = torch.stack([e[i, pick[:, i]] for i in range(k)], 1) + 0.02 * torch.randn(N, k, D)
    p = torch.softmax(-torch.cdist(_common.l2_normalize(z[:, 0]), e[0]) ** 2 / 0.01, -1)
    assert (p.max(-1).values > 0.9).float().mean() > 0.5  # the inputs are peaked
    check_entropy("cpu", z, e, 0.01, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_lce_spread_logits_match_reference(dtype):
    """weight x 30: logits with std ~60, most exps below 1e-38 (float32)."""
    k, n, v, h = 2, 96, 4096, 32
    hidden, weight, targets, bias = make_inputs(k, n, v, h, dtype, bias=True)
    with torch.no_grad():
        weight.mul_(30.0)
    if dtype == torch.float64:
        got_loss, got_grads = loss_and_grads(
            lambda *a, **kw: fk.linear_cross_entropy(*a, backend="cpu", **kw), hidden, weight, targets, bias)
        want_loss, want_grads = loss_and_grads(ref.linear_cross_entropy, hidden, weight, targets, bias)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-10, atol=1e-12)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
        return
    truth_loss, truth_grads = truth_of(hidden, weight, targets, bias)
    eager_loss, eager_grads = loss_and_grads(eager, hidden, weight, targets, bias)
    loss, grads = loss_and_grads(lambda *a, **kw: fk.linear_cross_entropy(*a, backend="cpu", **kw),
                                 hidden, weight, targets, bias)
    check_no_worse_than_eager(loss, eager_loss, truth_loss, dtype, "loss")
    for name, g, ge, gt in zip(("hidden", "weight", "bias"), grads, eager_grads, truth_grads):
        check_no_worse_than_eager(g, ge, gt, dtype, f"grad {name}")


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (0, 0.9), (50, 1.0)])
def test_sample_large_logits_match_reference(top_k, top_p):
    """Logits x 100 (std 300): nearly every exp underflows."""
    cond, uncond = make_logits(64, 4096, torch.float32, cfg=True, scale=300.0)
    u = torch.rand(64, dtype=torch.float64)
    want = ref.sample(cond, uncond, 1.75, 1.0, top_k, top_p, uniform=u)
    got = fk.sample(cond, uncond, cfg_scale=1.75, temperature=1.0, top_k=top_k, top_p=top_p, uniform=u,
                    backend="cpu")
    assert_same_draws(got, want, (cond, uncond, 1.75, 1.0, top_k, top_p, u), "sample x100")


# -- every ISA path, forced with FQGAN_CPU_ISA in a subprocess ------------------------------------
# The child process runs this source alone (importing only torch and fqgan_kernels: a light
# start); the parent execs the same source for the native path.
_RUN_OPS_SRC = textwrap.dedent("""
    import torch
    import fqgan_kernels as fk
    from fqgan_kernels import _ext


    def isa_inputs():
        # Small inputs for every op: tile edges (K = 1000 codes, odd D, N not a multiple of a row
        # block) and the real D = 8 fast paths; nearest_code gets an all-zero codebook row.
        g = torch.Generator().manual_seed(1)
        x = {}
        for D in (8, 5):
            cb = torch.randn(3, 1000, D, generator=g)
            cb[0, 7] = 0.0
            x[f"nc{D}"] = (torch.randn(301, 3, D, generator=g), cb)
            x[f"ent{D}"] = (torch.randn(70, 2, D, generator=g), torch.randn(2, 600, D, generator=g))
        z = torch.randn(600, 3, 8, generator=g)
        x["vq"] = (z, z + 0.1 * torch.randn(600, 3, 8, generator=g))
        x["lce"] = (torch.randn(2, 50, 24, generator=g), torch.randn(2, 700, 24, generator=g) * 0.4,
                    torch.randint(0, 700, (2, 50), generator=g), torch.randn(2, 700, generator=g))
        x["sample"] = (torch.randn(32, 3000, generator=g) * 3, torch.randn(32, 3000, generator=g) * 3,
                       torch.rand(32, generator=g, dtype=torch.float64))
        return x


    def run_ops(x):
        # Every CPU op (forward and backward) on isa_inputs(), in whichever ISA the process runs.
        out = {}
        for D in (8, 5):
            for l2 in (True, False):
                out[f"nc{D}-{l2}"] = tuple(fk.nearest_code(*x[f"nc{D}"], l2, backend="cpu"))
            z, e = (t.clone().requires_grad_() for t in x[f"ent{D}"])
            loss = fk.entropy_loss(z, e, 0.01, backend="cpu")
            (loss * torch.tensor([1.0, 0.5])).sum().backward()
            out[f"ent{D}"] = (loss.detach(), z.grad, e.grad)
        z, codes = (t.clone().requires_grad_() for t in x["vq"])
        parts = fk.vq_losses(z, codes, disentangle_weight=0.1, backend="cpu")
        sum(p.sum() for p in parts).backward()
        out["vq"] = (*(p.detach() for p in parts), z.grad, codes.grad)
        hidden, weight, targets, bias = x["lce"]
        hidden, weight, bias = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        lce = fk.linear_cross_entropy(hidden, weight, targets, bias, label_smoothing=0.1, backend="cpu")
        lce.loss.backward()
        out["lce"] = (lce.loss.detach(), hidden.grad, weight.grad, bias.grad)
        cond, uncond, u = x["sample"]
        for top_k, top_p in ((0, 1.0), (20, 0.9)):
            out[f"sample-{top_k}-{top_p}"] = fk.sample(cond, uncond, cfg_scale=1.5, top_k=top_k, top_p=top_p,
                                                       uniform=u, backend="cpu")
        out["isa"] = _ext.cpu().isa()
        return out


    if __name__ == "__main__":
        import sys

        torch.save(run_ops(isa_inputs()), sys.argv[1])
""")
_run_ops = {"__name__": "run_ops"}
exec(compile(_RUN_OPS_SRC, "<test_cpu_numerics run_ops>", "exec"), _run_ops)


@pytest.fixture(scope="module")
def native_ops():
    x = _run_ops["isa_inputs"]()
    return x, _run_ops["run_ops"](x)


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_every_isa_path_matches_native(isa, native_ops, tmp_path):
    x, native = native_ops
    if isa == native["isa"]:
        pytest.skip(f"{isa} is the native path (the other tests run it)")
    env = {**os.environ, "FQGAN_CPU_ISA": isa}
    proc = subprocess.run([sys.executable, "-c", _RUN_OPS_SRC, str(tmp_path / "out.pt")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    if got["isa"] != isa:
        pytest.skip(f"this CPU has no {isa} (forcing it runs {got['isa']})")
    for D in (8, 5):
        for l2 in (True, False):
            codes, idx = got[f"nc{D}-{l2}"]
            check_nearest(*x[f"nc{D}"], l2, codes, idx)
            assert (idx == native[f"nc{D}-{l2}"][1]).float().mean() > 0.99
    # Sums run in other orders (other vector widths, FMA or not): equal up to float32 rounding,
    # relative to each output's largest magnitude.
    for name in ("ent8", "ent5", "vq", "lce"):
        for i, (a, b) in enumerate(zip(got[name], native[name])):
            scale = b.abs().max().item()
            what = f"{isa} {name}[{i}]"
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * scale + 1e-7, msg=lambda m, what=what: f"{what}: {m}")
    cond, uncond, u = x["sample"]
    for top_k, top_p in ((0, 1.0), (20, 0.9)):
        want = ref.sample(cond, uncond, 1.5, 1.0, top_k, top_p, uniform=u)
        assert_same_draws(got[f"sample-{top_k}-{top_p}"], want, (cond, uncond, 1.5, 1.0, top_k, top_p, u),
                          f"sample {isa}")
