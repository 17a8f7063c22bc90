"""FAR generator: a training step with the fused vs the reference heads, and generation throughput with the
fused vs the reference sampler.

Training step: ``model(indices, labels).loss.backward()`` (forward + backward of trunk, AR head and the k
output heads; no optimizer step). ``heads=fused`` is :func:`fqgan_kernels.linear_cross_entropy`,
``heads=reference`` is :func:`fqgan_kernels.reference.linear_cross_entropy` (k x N x V float32 logits).
``peak_extra_MiB``: the step's peak memory beyond what is live before it (includes the parameter
gradients); ``head_peak_extra_MiB``: the same for the heads alone (``model.head_loss`` forward + backward on
fixed hidden states, gradients for them and for the [k, V, D] head weight included);
``head_peak_minus_grads_MiB``: that minus the returned float32 gradients (k (N + V) D x 4 bytes).
CPU peaks are RSS high-water marks after ``malloc_trim``: expect +-20 % between runs.

Generation: :func:`fqgan.generator.generate` of 256 positions x k factors with CFG (the batch doubled with
null-class rows) and the KV caches; ``sampler=fused`` is :func:`fqgan_kernels.sample`, ``reference`` is
:func:`fqgan_kernels.reference.sample`. ``tokens_per_s`` counts the B x 256 x k sampled sub-tokens;
``sampler_share`` is the time spent inside the sampler over the whole call.

Shapes: ``tiny`` = FAR-tiny (dim 128, 4 + 2 layers); ``B-width`` = FAR-B's width and heads (dim 1024, 16 heads)
with 2 trunk layers and 1 AR-head layer, so that a CPU run stays in minutes -- with FAR-B's full 24 + 3 layers
the model's share of a generation step, and of a training step, only grows. k = 2, V = 16384 throughout.
Smoke mode (``--benchmark-disable`` or ``FQGAN_BENCH_SMOKE=1``) runs a tiny model at V = 512 on 4x4 grids once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time

import pytest
import torch
from conftest import is_smoke, peak_extra_bytes, record, sync

import fqgan_kernels as fk
from fqgan.generator import FAR, FARConfig, generate

# name -> (preset, overrides, B, T) for the training step
TRAIN_SHAPES = {
    "tiny": ("FAR-tiny", dict(vocab_size=16384, block_size=64), 8, 64),
    "B-width": ("FAR-B", dict(vocab_size=16384, n_layer=2, ar_n_layer=1), 4, 256),
}
GEN_SHAPES = {
    "tiny": ("FAR-tiny", dict(vocab_size=16384, block_size=256)),
    "B-width": ("FAR-B", dict(vocab_size=16384, n_layer=2, ar_n_layer=1)),
}
SMOKE = ("FAR-tiny", dict(vocab_size=512, block_size=16))
CFG_SCALE = [2.0, 2.0]


def pytest_generate_tests(metafunc):
    smoke = is_smoke(metafunc.config)
    if "train_shape" in metafunc.fixturenames:
        shapes = {"smoke": (*SMOKE, 2, 16)} if smoke else TRAIN_SHAPES
        metafunc.parametrize("train_shape", list(shapes.values()), ids=list(shapes))
    if "gen_shape" in metafunc.fixturenames:
        shapes = {"smoke": SMOKE} if smoke else GEN_SHAPES
        metafunc.parametrize("gen_shape", list(shapes.values()), ids=list(shapes))
        metafunc.parametrize("batch", [2] if smoke else [8, 32])


def _trim() -> None:
    """Return freed heap pages to the OS so that the RSS high-water mark sees a step's allocations again
    (glibc keeps freed large blocks mapped: without this, a repeated step can measure 0 extra)."""
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def peak(fn, device) -> int:
    _trim()
    return peak_extra_bytes(fn, device)


def make_model(preset: str, overrides: dict, device: str = "cpu") -> FAR:
    model = FAR(FARConfig.from_preset(preset, num_factors=2, num_classes=1000, **overrides))
    with torch.no_grad():  # the official init zeroes the heads: give them trained-like logits instead
        model.head.normal_(0.0, 2.0 / model.config.dim ** 0.5)
    return model.to(device)


@pytest.mark.parametrize("heads", ["fused", "reference"])
def test_train_step(benchmark, train_shape, heads, device="cpu"):
    preset, overrides, B, T = train_shape
    model = make_model(preset, overrides, device).train()
    c = model.config
    g = torch.Generator().manual_seed(0)
    indices = torch.randint(0, c.vocab_size, (B, c.num_factors, T), generator=g).to(device)
    labels = torch.randint(0, c.num_classes, (B,), generator=g).to(device)
    reference = heads == "reference"

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(indices, labels, reference=reference).loss
        loss.backward()
        sync(device)
        return loss

    step()  # warm-up: extension load, thread pools
    step_peak = peak(step, device)
    hidden = model.hidden(indices, labels).detach().requires_grad_()

    def head_step():
        loss = model.head_loss(hidden, indices, reference=reference).loss
        return torch.autograd.grad(loss, [hidden, model.head])

    head_step()
    head_peak = peak(head_step, device)
    grads = (hidden.numel() + model.head.numel()) * 4  # the returned float32 gradients
    benchmark.group = f"FAR train step {preset} {overrides} B{B} T{T} k{c.num_factors}"
    benchmark.pedantic(step, rounds=1 if benchmark.disabled else 3, iterations=1, warmup_rounds=0)
    record(benchmark, peak_bytes=step_peak, head_peak_extra_MiB=round(head_peak / 2**20, 2),
           head_peak_minus_grads_MiB=round((head_peak - grads) / 2**20, 2), tokens=B * T,
           threads=torch.get_num_threads())


@pytest.mark.parametrize("sampler", ["fused", "reference"])
def test_generate(benchmark, monkeypatch, gen_shape, batch, sampler, device="cpu"):
    preset, overrides = gen_shape
    model = make_model(preset, overrides, device).eval()
    c = model.config
    labels = torch.arange(batch, device=device) % c.num_classes
    spent = [0.0]
    name = "sample"
    owner = fk if sampler == "fused" else fk.reference
    inner = getattr(owner, name)

    def timed(*args, **kwargs):
        sync(device)
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        sync(device)
        spent[0] += time.perf_counter() - t0
        return out

    # warm-up of the sampler and the model's kernels on one step's shapes
    logits = torch.randn(batch, c.vocab_size, device=device)
    inner(logits, logits, cfg_scale=2.0, uniform=torch.rand(batch, dtype=torch.float64, device=device))
    model.logits(torch.zeros(1, c.num_factors, 1, dtype=torch.long, device=device), labels[:1])
    monkeypatch.setattr(owner, name, timed)

    def run():
        spent[0] = 0.0
        start = time.perf_counter()
        out = generate(model, labels, cfg_scale=CFG_SCALE, seed=0, reference=sampler == "reference")
        sync(device)
        return out, spent[0] / (time.perf_counter() - start)

    benchmark.group = f"FAR generate {preset} {overrides} B{batch} k{c.num_factors} cfg"
    out, share = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    assert out.shape == (batch, c.num_factors, c.block_size)
    tokens = batch * c.block_size * c.num_factors
    stats = getattr(benchmark, "stats", None)
    mean = stats.stats.mean if stats is not None and getattr(stats, "stats", None) else None
    record(benchmark, tokens=tokens, tokens_per_s=round(tokens / mean, 1) if mean else None,
           sampler_share=round(share, 4), threads=torch.get_num_threads())
