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
The default run times the training step at ``B-width`` (``HEADLINE_TRAIN``); ``--bench-full`` both shapes and the
generation (marked ``bench_full``). Smoke mode (``--benchmark-disable`` or ``FQGAN_BENCH_SMOKE=1``) runs a tiny
model at V = 512 on 4x4 grids once.
"""

from __future__ import annotations

import inspect
import time

import pytest
import selection
import torch
from conftest import label, peak_extra_bytes, record, sync, timed

import fqgan_kernels as fk
from fqgan.generator import FAR, FARConfig, generate

# name -> (preset, overrides, B, T) for the training step
TRAIN_SHAPES = {
    "tiny": ("FAR-tiny", dict(vocab_size=16384, block_size=64), 8, 64),
    "B-width": ("FAR-B", dict(vocab_size=16384, n_layer=2, ar_n_layer=1), 4, 256),
}
HEADLINE_TRAIN = ["B-width"]  # the default run (benchmarks/selection.py); generation runs with --bench-full
GEN_SHAPES = {
    "tiny": ("FAR-tiny", dict(vocab_size=16384, block_size=256)),
    "B-width": ("FAR-B", dict(vocab_size=16384, n_layer=2, ar_n_layer=1)),
}
SMOKE = ("FAR-tiny", dict(vocab_size=512, block_size=16))
CFG_SCALE = [2.0, 2.0]


def pytest_generate_tests(metafunc):
    mode = selection.mode(metafunc.config)
    smoke = mode == "smoke"
    if "train_shape" in metafunc.fixturenames:
        names = list(TRAIN_SHAPES) if mode == "full" else HEADLINE_TRAIN
        shapes = {"smoke": (*SMOKE, 2, 16)} if smoke else {n: TRAIN_SHAPES[n] for n in names}
        metafunc.parametrize("train_shape", list(shapes.values()), ids=list(shapes))
    if "gen_shape" in metafunc.fixturenames:
        shapes = {"smoke": SMOKE} if smoke else GEN_SHAPES
        metafunc.parametrize("gen_shape", list(shapes.values()), ids=list(shapes))
        metafunc.parametrize("batch", [2] if smoke else [8, 32])


def peak(fn, device) -> int:
    return peak_extra_bytes(fn, device)


def choice(fn, reference: bool) -> dict:
    """The keyword that picks the reference (or the fused) path of ``fn``: ``backend=`` in the current
    fqgan API, ``reference=`` before it."""
    if "backend" in inspect.signature(fn).parameters:
        return {"backend": "reference" if reference else None}
    return {"reference": reference}


def shape_text(preset: str, overrides: dict, **sizes) -> str:
    """e.g. 'FAR-B n_layer=2 ar_n_layer=1 V=16384 B=4 T=256'."""
    over = " ".join(f"{'V' if k == 'vocab_size' else k}={v}" for k, v in overrides.items())
    return " ".join([preset, over, *(f"{k}={v}" for k, v in sizes.items())])


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
        loss = model(indices, labels, **choice(model.forward, reference)).loss
        loss.backward()
        sync(device)
        return loss

    label(benchmark, shape_text(preset, overrides, B=B, T=T, k=c.num_factors))
    timed(benchmark, step, device=device)  # the warm-up: extension load, thread pools
    hidden = model.hidden(indices, labels).detach().requires_grad_()

    def head_step():
        loss = model.head_loss(hidden, indices, **choice(model.head_loss, reference)).loss
        return torch.autograd.grad(loss, [hidden, model.head])

    head_step()
    head_peak = peak(head_step, device)
    grads = (hidden.numel() + model.head.numel()) * 4  # the returned float32 gradients
    record(benchmark, head_peak_extra_MiB=round(head_peak / 2**20, 2),
           head_peak_minus_grads_MiB=round((head_peak - grads) / 2**20, 2), tokens=B * T,
           threads=torch.get_num_threads())


@pytest.mark.bench_full
@pytest.mark.parametrize("sampler", ["fused", "reference"])
def test_generate(benchmark, monkeypatch, gen_shape, batch, sampler, device="cpu"):
    preset, overrides = gen_shape
    model = make_model(preset, overrides, device).eval()
    c = model.config
    labels = torch.arange(batch, device=device) % c.num_classes
    spent = [0.0]
    name = "sample"
    # generate() calls fk.sample(backend=...) in the current fqgan API, reference.sample itself before it
    new_api = "backend" in inspect.signature(generate).parameters
    owner = fk if sampler == "fused" or new_api else fk.reference
    inner = getattr(owner, name)
    kw = {"backend": "reference"} if new_api and sampler == "reference" else {}

    def timed_sample(*args, **kwargs):
        sync(device)
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        sync(device)
        spent[0] += time.perf_counter() - t0
        return out

    def warm():  # the sampler and the model's kernels on one step's shapes: a whole generation takes minutes
        logits = torch.randn(batch, c.vocab_size, device=device)
        inner(logits, logits, cfg_scale=2.0, uniform=torch.rand(batch, dtype=torch.float64, device=device), **kw)
        model.logits(torch.zeros(1, c.num_factors, 1, dtype=torch.long, device=device), labels[:1])

    monkeypatch.setattr(owner, name, timed_sample)

    def run():
        spent[0] = 0.0
        start = time.perf_counter()
        out = generate(model, labels, cfg_scale=CFG_SCALE, seed=0, **choice(generate, sampler == "reference"))
        sync(device)
        return out, spent[0] / (time.perf_counter() - start)

    label(benchmark, shape_text(preset, overrides, B=batch, k=c.num_factors) + " cfg")
    out, share = timed(benchmark, run, device=device, cold=True, warm=warm)  # one call, after warm()
    assert out.shape == (batch, c.num_factors, c.block_size)
    tokens = batch * c.block_size * c.num_factors
    stats = getattr(benchmark, "stats", None)
    mean = stats.stats.mean if stats is not None and getattr(stats, "stats", None) else None
    record(benchmark, tokens=tokens, tokens_per_s=round(tokens / mean, 1) if mean else None,
           sampler_share=round(share, 4), threads=torch.get_num_threads())
