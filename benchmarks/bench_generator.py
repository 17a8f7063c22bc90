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

Generation against the official sampling loop (``test_generation``): :func:`fqgan.generator.generate` and the
official ``generate_fq`` / ``sample_fq`` with the official ``sample_from_logits`` (softmax + ``torch.multinomial``;
``tests/fqgan/far_official_ref.py``, the test-only port of the official model and loop) on the same weights, at
``B-width``, CFG 2 on both factors, top-k 0, top-p 1, batch 8 and 64, with the weights in bf16 (the official
sampling script's default precision; bf16 matmuls run natively on CPUs with AMX or AVX512-BF16) and in fp32.
Providers: ``fused`` = ``generate(compile=True)`` (one torch.compile graph per position and attention length,
static KV caches); ``fqgan eager`` = ``generate()``; ``official loop``. ``tokens_per_s`` counts B x 256 x k
sub-tokens, ``images_per_s`` B images per call; one timed call each, after a warm-up generation for ``fused``
(``compile_s``: that first call, which compiles the 4 graphs) and a light one (the model's kernels, the draw)
for the others.

Shapes: ``tiny`` = FAR-tiny (dim 128, 4 + 2 layers); ``B-width`` = FAR-B's width and heads (dim 1024, 16 heads)
with 2 trunk layers and 1 AR-head layer, so that a CPU run stays in minutes -- with FAR-B's full 24 + 3 layers
the model's share of a generation step, and of a training step, only grows. k = 2, V = 16384 throughout.
The default run times the training step at ``B-width`` (``HEADLINE_TRAIN``); ``--bench-full`` both shapes and the
generation (marked ``bench_full``). Smoke mode (``--benchmark-disable`` or ``FQGAN_BENCH_SMOKE=1``) runs a tiny
model at V = 512 on 4x4 grids once. Generation on a loaded 2-core machine: ``OMP_NUM_THREADS=1`` (two threads
wait on each other's barriers behind other processes' work).
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import time

import pytest
import selection
import torch
import torch.nn.functional as F
from conftest import label, peak_extra_bytes, record, sync, timed

import fqgan_kernels as fk
from fqgan.generator import FAR, FARConfig, generate

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fqgan"))
import far_official_ref as official  # the official model and loop (a test-only port)

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
VS_OFFICIAL = GEN_SHAPES["B-width"]  # generation against the official loop
VS_OFFICIAL_BATCHES = [8, 64]
PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}


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
    if "setting" in metafunc.fixturenames:  # test_generation: (shape, batch, precision), providers back to back
        shape = SMOKE if smoke else VS_OFFICIAL
        settings = [(shape, b, p) for b in ([2] if smoke else VS_OFFICIAL_BATCHES) for p in PRECISIONS]
        metafunc.parametrize("setting", settings, ids=[f"B{b}-{p}" for _, b, p in settings])


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


@functools.lru_cache(maxsize=1)
def _models(preset: str, overrides: tuple, precision: str) -> tuple[FAR, official.Transformer]:
    """Ours and the official model with the same weights, in ``precision`` (the official script casts its whole
    model: ``.to(dtype=precision)``)."""
    model = make_model(preset, dict(overrides)).eval()
    c = model.config
    args = official.ModelArgs(dim=c.dim, n_layer=c.n_layer, ar_n_layer=c.ar_n_layer, n_head=c.n_head,
                              multiple_of=c.multiple_of, ffn_dim_multiplier=c.ffn_dim_multiplier,
                              vocab_size=c.vocab_size, num_classes=c.num_classes, block_size=c.block_size,
                              num_factors=c.num_factors, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    ref = official.Transformer(args).eval()
    from fqgan.generator import to_official_state_dict

    ref.load_state_dict(to_official_state_dict(model), strict=False)  # freqs_cis and caches are not weights
    dtype = PRECISIONS[precision]
    return model.to(dtype), ref.to(dtype)


def official_sample_from_logits(logits, temperature, top_k, top_p):
    """The official ``sample_from_logits`` at top-k 0, top-p 1 (no filtering): softmax and multinomial."""
    logits = logits[:, -1, :] / temperature
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)


@pytest.mark.bench_full
@pytest.mark.parametrize("provider", ["fused", "fqgan eager", "official loop"])
def test_generation(benchmark, setting, provider, device="cpu"):
    (preset, overrides), batch, precision = setting
    model, ref = _models(preset, tuple(sorted(overrides.items())), precision)
    c = model.config
    k, T = c.num_factors, c.block_size
    labels = torch.arange(batch, device=device) % c.num_classes

    calls: list[float] = []

    def run():
        t0 = time.perf_counter()
        if provider == "official loop":
            torch.manual_seed(0)
            rows = official.generate_fq(ref, labels, T, CFG_SCALE, [1.0] * k, [0] * k, [1.0] * k,
                                        official_sample_from_logits)
            out = torch.stack(rows, dim=1)  # [B, k, T]
        else:
            out = generate(model, labels, cfg_scale=CFG_SCALE, seed=0, compile=provider == "fused")
        sync(device)
        calls.append(time.perf_counter() - t0)
        return out

    def check(out):
        assert out.shape == (batch, k, T) and 0 <= int(out.min()) and int(out.max()) < c.vocab_size

    def light_warm():  # the model's kernels and the draw on one step's shapes: a generation takes minutes
        model.logits(torch.zeros(1, k, 1, dtype=torch.long, device=device), labels[:1])
        torch.multinomial(torch.ones(2 * batch, c.vocab_size, device=device), 1)

    label(benchmark, shape_text(preset, overrides, B=batch, k=k) + f" cfg {precision}")
    # One timed call after a warm-up: a whole generation for the fused provider (it compiles its 4 graphs
    # there), the light one otherwise.
    timed(benchmark, run, check=check, device=device, cold=True, warm=run if provider == "fused" else light_warm)
    stats = getattr(benchmark, "stats", None)
    best = stats.stats.min if stats is not None and getattr(stats, "stats", None) else None
    record(benchmark, tokens=batch * T * k, tokens_per_s=round(batch * T * k / best, 1) if best else None,
           images_per_s=round(batch / best, 3) if best else None, precision=precision,
           threads=torch.get_num_threads(), **({"compile_s": round(calls[0], 1)} if provider == "fused" else {}))
