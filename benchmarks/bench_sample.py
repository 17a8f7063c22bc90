"""sample (fused CFG + temperature + top-k/top-p + draw): reference eager, torch.compile(reference), the
fused CPU kernel and on GPU the Triton and CUDA kernels.

One timed call is one image position of FAR generation: k = 3 factor steps, each sampling B rows from
cond and uncond logits [B, V] (B = 64 images, so 2B = 128 logit rows for CFG), with that step's own
parameters. ``per_step_ms`` is the mean divided by k; GB/s counts the logits read once per step
(2 * B * V * element size). ``peak_extra_MiB`` is the extra memory one timed call needs.

Inputs: "flat" logits are unit-scale (std 1), "peaked" logits x100 (std 100, near one-hot after CFG:
most exp(x - max) underflow, many to subnormals), as a trained generator's are; same shapes and
settings in the same run, paired in the summary at the end of the session. The default run times
B = 64, fp32, the top-k + top-p setting (``HEADLINE_*``); ``--bench-full`` every shape and setting.

Before timing, each provider's first draws are checked against reference.sample given the same
uniform numbers, by the rule of tests/test_sample.py (equal draws except on rows whose decision
sits within rounding of its threshold, and those rare) (benchmarks/checks.py).
"""

from __future__ import annotations

import pytest
import selection
import torch
from checks import check_draws
from conftest import label, record, sync, timed

import fqgan_kernels as fk
from fqgan_kernels import reference as ref

K_STEPS = 3
# (B, V, dtype)
FULL_SHAPES = [(64, 16384, torch.float32), (64, 16384, torch.bfloat16)]
SMOKE_SHAPES = [(4, 1000, torch.float32)]
# per-factor parameters (cfg, temperature, top_k, top_p), one tuple per factor step
SETTINGS = {
    "plain": [(4.0, 1.0, 0, 1.0)] * K_STEPS,
    "topk": [(4.0, 1.0, 1000, 1.0), (4.0, 1.0, 600, 1.0), (4.0, 1.0, 300, 1.0)],
    "topp": [(4.0, 1.0, 0, 0.95), (4.0, 1.0, 0, 0.9), (4.0, 1.0, 0, 0.8)],
    "topk+topp": [(4.0, 1.0, 1000, 0.95), (3.0, 0.9, 600, 0.9), (2.0, 0.8, 300, 0.8)],
}
SMOKE_SETTINGS = ["topk+topp"]
HEADLINE_SHAPES, HEADLINE_SETTINGS = [(64, 16384, torch.float32)], ["topk+topp"]  # the default run
LOGIT_STD = {"flat": 1.0, "peaked": 100.0}
NOTE = {"flat": "logits std 1", "peaked": "logits std 100 (x100)"}


def pytest_generate_tests(metafunc):
    mode = selection.mode(metafunc.config)
    if mode != "smoke" and metafunc.definition.get_closest_marker("cuda") is not None:
        mode = "full"  # the GPU matrix runs whole (benchmarks/selection.py)
    if "shape" in metafunc.fixturenames:
        shapes = {"smoke": SMOKE_SHAPES, "default": HEADLINE_SHAPES, "full": FULL_SHAPES}[mode]
        metafunc.parametrize("shape", shapes, ids=[f"B{b}-V{v}-{str(d).split('.')[-1]}" for b, v, d in shapes])
    if "setting" in metafunc.fixturenames:
        settings = {"smoke": SMOKE_SETTINGS, "default": HEADLINE_SETTINGS, "full": list(SETTINGS)}[mode]
        metafunc.parametrize("setting", settings)
    if "inputs" in metafunc.fixturenames:
        metafunc.parametrize("inputs", ["flat", "peaked"])


def make_inputs(shape, inputs="flat", device="cpu"):
    B, V, dtype = shape
    g = torch.Generator().manual_seed(0)
    std = LOGIT_STD[inputs]
    logits = [(torch.randn(B, V, generator=g) * std).to(device, dtype) for _ in range(2 * K_STEPS)]
    u = torch.rand(K_STEPS, B, generator=g, dtype=torch.float64).to(device)
    return [(logits[2 * i], logits[2 * i + 1], u[i]) for i in range(K_STEPS)]


def check(got, steps, params, what):
    """Each factor step's draws against reference.sample on the same logits and uniforms."""
    for i, (tokens, (c, un, u), p) in enumerate(zip(got, steps, params)):
        want = ref.sample(c, un, *p, uniform=u)
        check_draws(f"{what} step {i}", tokens, want, (c, un, *p, u))


def run(benchmark, make_fn, shape, setting, inputs, provider, device="cpu", compiles=False):
    B, V, dtype = shape
    dt = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype).split(".")[-1])
    label(benchmark, f"B={B}x2 V={V} {dt} k={K_STEPS} {setting}", NOTE[inputs])
    steps = make_inputs(shape, inputs, device)
    params = SETTINGS[setting]

    def fn():
        out = [make_fn(c, un, u, *p) for (c, un, u), p in zip(steps, params)]
        sync(device)
        return out

    what = f"sample {provider} {inputs} {setting} B={B} V={V} {dtype}"
    result = timed(benchmark, fn, check=lambda got: check(got, steps, params, what), device=device,
                   compiles=compiles)
    elem = torch.tensor([], dtype=dtype).element_size()
    record(benchmark, bytes_moved=2.0 * B * V * elem * K_STEPS, threads=torch.get_num_threads())
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None):
        benchmark.extra_info["per_step_ms"] = round(stats.stats.mean / K_STEPS * 1e3, 3)
    return result


def _reference(c, un, u, cfg, t, k, p):
    return ref.sample(c, un, cfg, t, k, p, uniform=u)


def test_reference_eager(benchmark, shape, setting, inputs):
    run(benchmark, _reference, shape, setting, inputs, "reference eager")


def test_reference_compiled(benchmark, shape, setting, inputs):
    compiled = torch.compile(ref.sample)
    run(benchmark, lambda c, un, u, cfg, t, k, p: compiled(c, un, cfg, t, k, p, uniform=u), shape, setting,
        inputs, "torch.compile(reference)", compiles=True)


def _fused(backend):
    def fn(c, un, u, cfg, t, k, p):
        return fk.sample(c, un, cfg_scale=cfg, temperature=t, top_k=k, top_p=p, uniform=u, backend=backend)
    return fn


def test_fused_cpu(benchmark, shape, setting, inputs):
    run(benchmark, _fused("cpu"), shape, setting, inputs, "fused cpu")


@pytest.mark.cuda
def test_reference_eager_cuda(benchmark, shape, setting, inputs):
    run(benchmark, _reference, shape, setting, inputs, "reference eager", device="cuda")


@pytest.mark.cuda
def test_reference_compiled_cuda(benchmark, shape, setting, inputs):
    compiled = torch.compile(ref.sample)
    run(benchmark, lambda c, un, u, cfg, t, k, p: compiled(c, un, cfg, t, k, p, uniform=u), shape, setting,
        inputs, "torch.compile(reference)", device="cuda", compiles=True)


@pytest.mark.cuda
def test_fused_triton(benchmark, shape, setting, inputs):
    run(benchmark, _fused("triton"), shape, setting, inputs, "fused triton", device="cuda")


@pytest.mark.cuda
def test_fused_cuda(benchmark, shape, setting, inputs):
    run(benchmark, _fused("cuda"), shape, setting, inputs, "fused cuda", device="cuda")
