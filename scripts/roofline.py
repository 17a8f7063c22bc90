#!/usr/bin/env python
"""Predicted lower-bound times (roofline) of the GPU benchmarks on an H200, and the join with a
benchmark run: ``measured / predicted`` per row.

Per op and GPU-benchmark shape (``SHAPES``, the one list of them for this script), two bounds:

* ``fused``: what any implementation must do. Bytes: every input read once, every output written
  once (the gradients included for forward + backward ops). FLOPs: the multiply-adds of the
  algorithm (2 per multiply-add), at the peak of the unit the kernels use: FP32 CUDA cores for
  nearest_code / entropy_loss (float32 FMA; tensor-core TF32 would move near-ties and logits),
  BF16 tensor cores for linear_cross_entropy. exp: one SFU (MUFU.EX2) operation per exponential.
* ``reference``: the plain-PyTorch composition the benchmarks time as ``reference`` (and
  ``torch.compile`` of it), run on ``meta`` tensors at the real shape: every aten op is counted
  as reading its inputs and writing its outputs once (views move nothing), matmul FLOPs from
  ``torch.utils.flop_counter``. This includes its N x K / N x V tensors.

``bound = max(bytes / HBM bandwidth, FLOPs / peak, exps / SFU rate)``, with the H200 SXM figures of
``H200`` below. A bound is a floor, not a prediction of the achievable time.

    python scripts/roofline.py                          # the predicted table (markdown)
    python scripts/roofline.py --bench-json bench.json  # measured / predicted per benchmark row
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# NVIDIA H200 SXM datasheet (nvidia.com/en-us/data-center/h200, "Specifications", H200 SXM column):
# GPU memory bandwidth 4.8 TB/s; FP32 67 TFLOPS; TF32 Tensor Core 989 TFLOPS and BFLOAT16 Tensor
# Core 1,979 TFLOPS, both footnoted "with sparsity", so dense = half. SFU: 16 results per clock per
# SM for exp2/log2/rcp/rsqrt (CUDA C++ Programming Guide, "Arithmetic Instructions", compute
# capability 9.0) x 132 SMs x 1.98 GHz (the boost clock behind 67 TFLOPS = 132 x 128 x 2 x 1.98e9).
H200 = {
    "hbm_bytes_per_s": 4.8e12,
    "fp32_flops": 67e12,
    "tf32_tc_flops": 989e12 / 2,
    "bf16_tc_flops": 1979e12 / 2,
    "sfu_per_s": 132 * 16 * 1.98e9,
}
PEAK_NAMES = {"fp32_flops": "FP32 FMA", "tf32_tc_flops": "TF32 tensor cores", "bf16_tc_flops": "BF16 tensor cores"}
ELEM = {"fp32": 4, "bf16": 2, "fp16": 2}

# The GPU benchmark shapes (benchmarks/bench_*.py, the `cuda`-marked tests), one entry per bench row
# family: (op, shape parameters, dtypes).
SHAPES = {
    "nearest_code": [((65536, 16384, 8, 3), ("fp32", "bf16"))],  # (N, K, D, k), forward
    "entropy_loss": [((8192, 16384, 8, 3), ("fp32",)), ((65536, 16384, 8, 3), ("fp32",))],  # fwd+bwd
    "linear_cross_entropy": [((k, 32768, h, 16384), ("bf16",)) for h in (1024, 1280) for k in (2, 3)],  # (k,N,H,V)
    "sample": [((64, 16384), ("fp32", "bf16"))],  # (B, V): 3 factor steps of cond + uncond rows
    "quantizer": [((8192, 16384, 8, 3), ("fp32",)), ((65536, 16384, 8, 3), ("fp32",))],  # step, fwd+bwd
}
SAMPLE_STEPS = 3  # bench_sample.py K_STEPS: one timed call = 3 factor steps


@dataclass
class Bound:
    op: str
    shape: tuple
    dtype: str
    kind: str  # "fused" or "reference"
    bytes: float
    flops: float
    peak: str  # key of H200 for the FLOPs
    exps: float = 0.0
    note: str = ""

    @property
    def seconds(self) -> float:
        return max(self.bytes / H200["hbm_bytes_per_s"], self.flops / H200[self.peak],
                   self.exps / H200["sfu_per_s"])

    @property
    def limiter(self) -> str:
        terms = {"HBM": self.bytes / H200["hbm_bytes_per_s"], PEAK_NAMES[self.peak]: self.flops / H200[self.peak],
                 "SFU exp": self.exps / H200["sfu_per_s"]}
        return max(terms, key=terms.get)


# -- fused (compulsory) bounds -----------------------------------------------------------------
def fused_bound(op: str, shape: tuple, dtype: str) -> Bound:
    e = ELEM[dtype]
    if op == "nearest_code":
        N, K, D, k = shape
        # read z and the codebooks, write codes and int64 indices; 2 FLOPs per multiply-add of z . e_j
        return Bound(op, shape, dtype, "fused", (2 * N * k * D + k * K * D) * e + 8 * N * k,
                     2.0 * N * K * D * k, "fp32_flops",
                     note="plus ~3 compare/select per (n, j) for the running argmax, not counted")
    if op == "entropy_loss":
        N, K, D, k = shape
        # read z, codebooks; write dL/dz, dL/de (float32). The streaming algorithm forms the logits
        # in each of its 4 sweeps (2D FLOPs each) and accumulates 3 more D-vectors per (n, j) in the
        # backward (rows: A and B, codes: G z): 14 D FLOPs and 4 exps per (n, j).
        return Bound(op, shape, dtype, "fused", 2 * (N * k * D + k * K * D) * 4, 14.0 * D * N * K * k,
                     "fp32_flops", exps=4.0 * N * K * k)
    if op == "linear_cross_entropy":
        k, N, H, V = shape
        # read hidden, weight, int64 targets; write grad_hidden, grad_weight; logits, grad_hidden
        # and grad_weight GEMMs (6 N V H per head); one exp per logit in the forward and backward
        return Bound(op, shape, dtype, "fused", 2 * k * (N + V) * H * e + 8 * k * N, 6.0 * k * N * V * H,
                     "bf16_tc_flops", exps=2.0 * k * N * V,
                     note="the triton backend recomputes the logits in the backward: 8 N V H per head")
    if op == "sample":
        B, V = shape
        # per factor step: read cond and uncond once, one exp per logit, write B int64 tokens
        return Bound(op, shape, dtype, "fused", SAMPLE_STEPS * (2 * B * V * e + 8 * B), 0.0, "fp32_flops",
                     exps=SAMPLE_STEPS * B * V)
    if op == "quantizer":
        N, K, D, k = shape
        nc = fused_bound("nearest_code", shape, dtype)
        ent = fused_bound("entropy_loss", shape, dtype)
        # + vq_losses and disentanglement, forward and backward: read z, codes; write two gradients
        vq = 4 * N * k * D * 4
        return Bound(op, shape, dtype, "fused", nc.bytes + ent.bytes + vq, nc.flops + ent.flops, "fp32_flops",
                     exps=ent.exps, note="nearest_code + entropy_loss fwd+bwd + vq/disentangle losses")
    raise ValueError(op)


# -- reference composition, counted on meta tensors ---------------------------------------------
def _count(fn) -> tuple[float, float]:
    """(bytes, FLOPs) of ``fn()`` run eagerly op by op (meta tensors: nothing is computed)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    free = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
            aten.new_empty.default, aten.new_empty_strided.default, aten.detach.default,
            aten.lift_fresh.default, aten._local_scalar_dense.default}

    def nbytes(t):
        if t.numel() == 0:
            return 0
        # a broadcast (stride-0) view reads its storage once, not numel times
        span = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
        return min(t.numel(), span) * t.element_size()

    class Traffic(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func not in free and not func.is_view:
                tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
                Traffic.total += sum(nbytes(t) for t in tensors)
            return out

    flops = FlopCounterMode(display=False)
    with flops, Traffic():
        fn()
    return float(Traffic.total), float(flops.get_total_flops())


def reference_bound(op: str, shape: tuple, dtype: str) -> Bound:
    import torch

    from fqgan_kernels import reference as ref

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    meta = dict(device="meta", dtype=dt)
    peak = "bf16_tc_flops" if dtype != "fp32" else "fp32_flops"
    if op == "nearest_code":
        N, K, D, k = shape
        z, cb = torch.empty(N, k, D, **meta), torch.empty(k, K, D, **meta)
        b, f = _count(lambda: ref.nearest_code(z, cb, True))
        # the reference computes in float32 whatever the input dtype
        return Bound(op, shape, dtype, "reference", b, f, "fp32_flops")
    if op == "entropy_loss":
        N, K, D, k = shape
        z = torch.empty(N, k, D, **meta, requires_grad=True)
        cb = torch.empty(k, K, D, **meta, requires_grad=True)
        b, f = _count(lambda: ref.entropy_loss(z, cb, 0.01).sum().backward())
        return Bound(op, shape, dtype, "reference", b, f, "fp32_flops", exps=3.0 * N * K * k,
                     note="exp in softmax, log_softmax and their backward")
    if op == "linear_cross_entropy":
        k, N, H, V = shape
        x = torch.empty(k, N, H, **meta, requires_grad=True)
        w = torch.empty(k, V, H, **meta, requires_grad=True)
        t = torch.zeros(k, N, dtype=torch.int64, device="meta")

        def step():
            loss = ref.linear_cross_entropy(x, w, t).loss
            torch.autograd.grad(loss, [x, w])

        b, f = _count(step)
        # the reference upcasts to float32 before its GEMMs (reference.py _compute_dtype)
        return Bound(op, shape, dtype, "reference", b, f, "fp32_flops", exps=2.0 * k * N * V)
    if op == "sample":
        B, V = shape
        # real CPU tensors (B x V is small): reference.sample reads values (.item() in its non-finite
        # rule), which meta tensors cannot; the traffic counted is the same
        g = torch.Generator().manual_seed(0)
        c, u = (torch.randn(B, V, generator=g).to(dt) for _ in range(2))
        uni = torch.rand(B, generator=g, dtype=torch.float64)
        # the heaviest setting of bench_sample.py (top-k and top-p: topk, sort, softmax, cumsum)
        b, f = _count(lambda: [ref.sample(c, u, 4.0, 1.0, 1000, 0.9, uniform=uni) for _ in range(SAMPLE_STEPS)])
        return Bound(op, shape, dtype, "reference", b, f, "fp32_flops", exps=2.0 * SAMPLE_STEPS * B * V,
                     note="setting topk+topp (the others read less)")
    if op == "quantizer":
        N, K, D, k = shape
        step = _quantizer_reference_step()
        z = torch.empty(N // 256, k * D, 16, 16, **meta, requires_grad=True)
        cb = torch.empty(k, K, D, **meta, requires_grad=True)
        b, f = _count(lambda: step(z, cb, 0.01)[0].backward())  # (loss, indices); traffic independent of T
        return Bound(op, shape, dtype, "reference", b, f, peak, exps=3.0 * N * K * k)
    raise ValueError(op)


def _quantizer_reference_step():
    """bench_quantizer.py's reference_step (the composition the quantizer benchmark times)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    interp = os.environ.get("TRITON_INTERPRET")
    try:
        import bench_quantizer
    finally:  # benchmarks/conftest.py sets TRITON_INTERPRET on GPU-less machines; leave it as it was
        if interp is None:
            os.environ.pop("TRITON_INTERPRET", None)
    return bench_quantizer.reference_step


def all_bounds(with_reference: bool = True) -> list[Bound]:
    out = []
    for op, entries in SHAPES.items():
        for shape, dtypes in entries:
            for dtype in dtypes:
                out.append(fused_bound(op, shape, dtype))
                if with_reference:
                    out.append(reference_bound(op, shape, dtype))
    return out


def _fmt_ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def _size(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def predicted_table(bounds: list[Bound]) -> str:
    lines = ["| op | shape | dtype | composition | bytes | GFLOP | exps (G) | bound ms | limited by |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for b in bounds:
        lines.append(f"| {b.op} | {_shape_label(b.op, b.shape)} | {b.dtype} | {b.kind} | {_size(b.bytes)} | "
                     f"{b.flops / 1e9:.0f} | {b.exps / 1e9:.2f} | {_fmt_ms(b.seconds)} | {b.limiter} |")
    return "\n".join(lines) + "\n"


def _shape_label(op: str, shape: tuple) -> str:
    names = {"nearest_code": "N K D k", "entropy_loss": "N K D k", "quantizer": "N K D k",
             "linear_cross_entropy": "k N H V", "sample": "B V"}[op].split()
    return " ".join(f"{n}={v}" for n, v in zip(names, shape))


# -- the FAR decode step (generation, issue 19) -------------------------------------------------------
# One decode step = one image position for every row: the trunk on one token, then per factor the AR head on
# one slot, that head's V logits and the draw. With CFG the rows are the B conditional and B null-class rows.
# Bytes: every weight read once per step (the AR head's k times: its slots are sequential), the KV cache of
# the prefix read once (the compulsory keys: position t reads t + 1 of them; our compiled step reads its
# bucket's, on average (T/2 + T/8) / (T/2) = 1.25x that), the new keys and values written. FLOPs: 2 per
# multiply-add of those weights per row, plus attention (QK and PV: 4 D per key per row and layer).
# bound(step) = max(bytes / bandwidth, FLOPs / peak); a generation is the sum over its T steps.
DECODE_PRESETS = ("FAR-B", "FAR-L")
DECODE_BATCHES = (1, 64)
FIFTY_K = 50_000
# The tokenizer's pixel decoder per 256 x 256 image, FQGAN-Dual-16 (FLOPs counted on meta tensors by
# torch.utils.flop_counter, `decoder_flops()`); the official script decodes in float32 (TF32 allowed).
TOKENIZER_PRESET = "fqgan-dual-16"


@dataclass
class DecodeBound:
    preset: str
    n_layer: int
    ar_n_layer: int
    batch: int
    rows: int  # batch x 2 with CFG
    dtype: str
    weight_bytes: float  # per step
    kv_bytes: float  # per generation (all T steps)
    flops: float  # per generation
    seconds: float  # per generation: sum over the steps of max(bytes / bandwidth, FLOPs / peak)
    memory_seconds: float  # per generation: the bytes term alone
    compute_seconds: float  # per generation: the FLOPs term alone
    memory_steps: int  # steps limited by memory
    steps: int

    @property
    def limiter(self) -> str:
        return ("memory" if self.memory_steps == self.steps else "compute" if self.memory_steps == 0
                else f"memory {self.memory_steps}/{self.steps} steps")


def far_config(preset: str, n_layer: int | None = None, ar_n_layer: int | None = None, k: int = 2,
               vocab_size: int = 16384, block_size: int = 256):
    from fqgan.generator.config import FARConfig

    over = {n: v for n, v in (("n_layer", n_layer), ("ar_n_layer", ar_n_layer)) if v is not None}
    return FARConfig.from_preset(preset, num_factors=k, vocab_size=vocab_size, block_size=block_size,
                                 num_classes=1000, **over)


def decode_bound(c, batch: int, *, bandwidth: float, peak: float, elem: int = 2, cfg: bool = True,
                 name: str = "") -> DecodeBound:
    """The bound of one :func:`fqgan.generator.generate` call (T steps) of FAR config ``c`` at ``batch``."""
    D, k, V, T = c.dim, c.num_factors, c.vocab_size, c.block_size
    kv = c.kv_heads * c.head_dim
    block = D * (D + 2 * kv) + D * D + 3 * D * c.hidden_dim  # wqkv, wo, w1, w3, w2 (norms: negligible)
    step_params = c.n_layer * block + k * c.ar_n_layer * block + k * V * D + k * D * D  # + heads, aggregate
    R = batch * (2 if cfg else 1)
    weight_bytes = elem * step_params
    total_s = total_flops = total_kv = total_mem = total_comp = 0.0
    memory_steps = 0
    for t in range(T):
        keys = t + 1
        kv_bytes = elem * R * 2 * kv * (c.n_layer * (keys + 1) + k * c.ar_n_layer * (k + 1) / 2 + k * c.ar_n_layer)
        flops = 2.0 * R * step_params + 4.0 * R * D * (c.n_layer * keys + c.ar_n_layer * k * (k + 1) / 2)
        mem_s, comp_s = (weight_bytes + kv_bytes) / bandwidth, flops / peak
        memory_steps += mem_s >= comp_s
        total_s += max(mem_s, comp_s)
        total_mem += mem_s
        total_comp += comp_s
        total_flops += flops
        total_kv += kv_bytes
    return DecodeBound(name or "FAR", c.n_layer, c.ar_n_layer, batch, R, "bf16" if elem == 2 else "fp32",
                       weight_bytes, total_kv, total_flops, total_s, total_mem, total_comp, memory_steps, T)


def decoder_flops(preset: str = TOKENIZER_PRESET) -> float:
    """FLOPs of the tokenizer's ``decode_indices`` for one image (meta tensors: nothing is computed)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fqgan.tokenizer.config import get_preset
    from fqgan.tokenizer.model import FQTokenizer

    cfg = get_preset(preset)
    with torch.device("meta"):
        model = FQTokenizer(cfg).eval()
    idx = torch.zeros(1, cfg.num_codebooks, cfg.grid_size, cfg.grid_size, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.decode_indices(idx)
    return float(counter.get_total_flops())


def h200_decode_table(batches=DECODE_BATCHES, presets=DECODE_PRESETS) -> str:
    """The decode-step bounds of the released sizes on H200 (bf16 weights and KV cache, CFG), and the time to
    sample 50,000 images."""
    bw, peak = H200["hbm_bytes_per_s"], H200["bf16_tc_flops"]
    lines = ["| model | batch (rows) | weights / step | KV read / step (mean) | GFLOP / step (mean) | bytes / HBM | "
             "FLOPs / BF16 peak | bound / step | limited by | bound tokens/s | bound / 50k images |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for preset in presets:
        c = far_config(preset)
        for batch in batches:
            b = decode_bound(c, batch, bandwidth=bw, peak=peak, name=preset)
            runs = -(-FIFTY_K // batch)
            lines.append(f"| {preset} | {batch} ({b.rows}) | {_size(b.weight_bytes)} | {_size(b.kv_bytes / b.steps)} | "
                         f"{b.flops / b.steps / 1e9:.1f} | {_fmt_ms(b.memory_seconds / b.steps)} ms | "
                         f"{_fmt_ms(b.compute_seconds / b.steps)} ms | {_fmt_ms(b.seconds / b.steps)} ms | "
                         f"{b.limiter} | "
                         f"{batch * c.block_size * c.num_factors / b.seconds:,.0f} | {runs * b.seconds / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def fifty_k_prediction(batch: int = 64, efficiency: float = 1.5) -> str:
    """Predicted time to sample 50,000 images (FID's sample count) on one H200: the generation bound at
    ``batch``, times ``efficiency`` (the issue's goal: within 1.5x of the bound), plus the tokenizer's pixel
    decoder at the TF32 peak (float32 with TF32, as the official script) times the same factor."""
    dec = decoder_flops()
    dec_s = FIFTY_K * dec / H200["tf32_tc_flops"]
    lines = [f"Time to sample {FIFTY_K:,} images on one H200 at batch {batch} (x2 rows with CFG), bf16 generator "
             f"(CUDA graphs), the tokenizer decoding in TF32 ({dec / 1e9:.0f} GFLOP per image): bound, and "
             f"predicted at {efficiency}x the bound.", "",
             "| model | generation bound | decoder bound | total bound | predicted |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for preset in DECODE_PRESETS:
        b = decode_bound(far_config(preset), batch, bandwidth=H200["hbm_bytes_per_s"], peak=H200["bf16_tc_flops"],
                         name=preset)
        gen_s = -(-FIFTY_K // batch) * b.seconds
        total = gen_s + dec_s
        lines.append(f"| {preset} | {gen_s / 60:.1f} min | {dec_s / 60:.1f} min | {total / 60:.1f} min | "
                     f"{efficiency * total / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def measured_ceilings(device: str) -> tuple[float, float]:
    """(copy bandwidth bytes/s read + written, bf16 matmul FLOP/s) measured on ``device``: the CPU's own
    roof (no datasheet); best of a few repeats."""
    import time

    import torch

    def best(fn, reps=5):
        fn()
        out = float("inf")
        for _ in range(reps):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            out = min(out, time.perf_counter() - t0)
        return out

    n = 2**27 if device == "cpu" else 2**29  # 512 MiB / 2 GiB of float32
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    bw = 2 * src.nbytes / best(lambda: dst.copy_(src))
    m = 2048 if device == "cpu" else 8192
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    peak = 2 * m**3 / best(lambda: a @ b, reps=3)
    return bw, peak


def measure_decode(preset: str, n_layer: int | None, ar_n_layer: int | None, batches: list[int], device: str,
                   modes: list[str], dtype: str = "bf16", emit=None) -> str:
    """``generate()`` of ``preset`` (random weights, CFG 2 on both factors) timed on ``device`` per batch and mode
    (eager / compiled), against its bound: the H200 datasheet on CUDA, this machine's measured ceilings on CPU.
    ``emit``, when given, receives each line of the table as soon as it is known (a run cut short by a time
    limit keeps its finished rows)."""
    import time

    import torch

    from fqgan.generator import FAR, generate

    c = far_config(preset, n_layer, ar_n_layer)
    torch.manual_seed(0)
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    with torch.device(device):
        model = FAR(c)
    with torch.no_grad():
        model.head.normal_(0.0, 2.0 / c.dim**0.5)  # the official init zeroes the heads
    model = model.to(dt).eval()
    if device == "cuda":
        bw, peak, roof = H200["hbm_bytes_per_s"], H200["bf16_tc_flops"], "H200 datasheet"
    else:
        bw, peak = measured_ceilings(device)
        roof = f"this CPU, measured: copy {bw / 1e9:.1f} GB/s, bf16 mm {peak / 1e12:.2f} TFLOP/s"
    layers = f"{c.n_layer} + {c.ar_n_layer} layers"
    lines = [f"{preset} width ({c.dim}, {layers}), k = {c.num_factors}, V = {c.vocab_size}, T = {c.block_size}, "
             f"CFG 2 (x2 rows), {dtype}, {device}, torch threads {torch.get_num_threads()}; bound from {roof}", "",
             "| batch | mode | first call s | s / call | tokens/s | images/s | bound s / call | measured / bound |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    if emit is not None:
        for line in lines:
            emit(line)
    for batch in batches:
        b = decode_bound(c, batch, bandwidth=bw, peak=peak, elem=2 if dtype == "bf16" else 4, name=preset)
        labels = torch.arange(batch, device=device) % c.num_classes
        for mode in modes:
            times = []
            for _ in range(2):  # the first call compiles (compiled) or warms up
                t0 = time.perf_counter()
                generate(model, labels, cfg_scale=2.0, seed=0, compile=mode == "compiled")
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            first, s = times
            tokens = batch * c.block_size * c.num_factors
            lines.append(f"| {batch} | {mode} | {first:.1f} | {s:.3f} | {tokens / s:,.0f} | {batch / s:.2f} | "
                         f"{b.seconds:.3f} | {s / b.seconds:.2f}x |")
            if emit is not None:
                emit(lines[-1])
    return "\n".join(lines) + "\n"


# -- join with a pytest-benchmark JSON -------------------------------------------------------------
_DTYPE_RE = re.compile(r"(float32|bfloat16|float16)")
_DTYPE_NAME = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _dtype_of(value) -> str | None:
    m = _DTYPE_RE.search(str(value))
    return _DTYPE_NAME[m.group(1)] if m else None


def classify(entry: dict) -> tuple[str, tuple, str, str] | None:
    """(op, shape, dtype, kind) of one pytest-benchmark entry of a `cuda` benchmark, or None."""
    file = entry.get("fullname", "").split("::")[0]
    func = entry.get("name", "").split("[")[0]
    p = entry.get("params") or {}
    provider = str(p.get("provider", ""))
    fused = {"triton", "cuda", "fused", "liger", "cce"}
    if file.endswith("bench_nearest_code.py") and func == "test_gpu":
        return "nearest_code", tuple(p["shape"]), _dtype_of(p.get("dtype")) or "fp32", \
            "fused" if provider in fused else "reference"
    if file.endswith("bench_entropy_loss.py") and func == "test_gpu":
        return "entropy_loss", tuple(p["shape"]), "fp32", "fused" if provider in fused else "reference"
    if file.endswith("bench_linear_cross_entropy.py") and func == "test_gpu":
        k, n, h, v, dt = p["shape"]
        return "linear_cross_entropy", (k, n, h, v), _dtype_of(dt) or "fp32", \
            "fused" if provider in fused else "reference"
    if file.endswith("bench_sample.py") and func.startswith(("test_fused_", "test_reference_")) and \
            func.endswith(("_cuda", "_triton")):
        B, V, dt = p["shape"]
        return "sample", (B, V), _dtype_of(dt) or "fp32", "fused" if func.startswith("test_fused") else "reference"
    if file.endswith("bench_quantizer.py") and func == "test_gpu":
        n = int(p["tokens"])
        return "quantizer", (n, 16384, 8, 3), "fp32", "fused" if provider == "fused" else "reference"
    return None


def bound_of(key: tuple[str, tuple, str, str]) -> Bound | None:
    """The bound of ``(op, shape, dtype, kind)`` when that shape and dtype are in ``SHAPES``, else None."""
    op, shape, dtype, kind = key
    if not any(tuple(s) == tuple(shape) and dtype in dts for s, dts in SHAPES.get(op, [])):
        return None
    return fused_bound(op, tuple(shape), dtype) if kind == "fused" else reference_bound(op, tuple(shape), dtype)


def join_table(bench: list[dict], bounds: list[Bound] | None = None) -> str:
    """One markdown table: every benchmark row with its measured min / median, throughput, peak
    memory, and the bound of its composition with measured / bound. ``bounds``: the bounds to use;
    by default each row's bound is computed when needed (a reference bound runs the reference on
    meta tensors: only for the compositions the run has)."""
    if bounds is not None:
        index = {(b.op, tuple(b.shape), b.dtype, b.kind): b for b in bounds}
    else:
        keys = {classify(e) for e in bench} - {None}
        index = {k: b for k in keys if (b := bound_of(k)) is not None}
    lines = ["| group | name | min ms | median ms | GFLOP/s | peak MiB | bound ms | min / bound | limited by |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for e in sorted(bench, key=lambda e: (e.get("group") or "", e["name"])):
        s, x = e["stats"], e.get("extra_info", {})
        gf, peak = x.get("GFLOP/s"), x.get("peak_extra_MiB")
        key = classify(e)
        b = index.get(key) if key else None
        bound = _fmt_ms(b.seconds) if b else "-"
        ratio = f"{s['min'] / b.seconds:.1f}x" if b and b.seconds > 0 else "-"
        lines.append(f"| {e.get('group') or ''} | {e['name']} | {s['min'] * 1e3:.3f} | {s['median'] * 1e3:.3f} | "
                     f"{gf if isinstance(gf, (int, float)) else '-'} | "
                     f"{peak if isinstance(peak, (int, float)) else '-'} | {bound} | {ratio} | "
                     f"{b.limiter if b else 'no roofline row (scripts/roofline.py SHAPES)'} |")
    return "\n".join(lines) + "\n"


# -- coverage: every GPU benchmark row has a bound -------------------------------------------------
def pytest_collection_finish(session):
    """pytest hook (``-p roofline``): dump the collected items as pytest-benchmark would name them."""
    path = os.environ.get("ROOFLINE_COLLECT_OUT")
    if not path:
        return
    items = []
    for item in session.items:
        if item.get_closest_marker("cuda") is None:
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        items.append({"fullname": item.nodeid, "name": item.name, "params": params})
    with open(path, "w") as f:
        json.dump(items, f, default=lambda o: f"UNSERIALIZABLE[{o!r}]")  # as pytest-benchmark's JSON


def check_coverage() -> int:
    """Collects the `cuda` benchmarks (no GPU needed) and checks that each has a roofline bound."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "items.json")
        env = {**os.environ, "ROOFLINE_COLLECT_OUT": out,
               "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "scripts"), os.environ.get("PYTHONPATH", "")])}
        subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-m", "cuda", "--collect-only", "-q",
                        "-p", "roofline", "-p", "no:cacheprovider"], cwd=ROOT, env=env, check=True,
                       stdout=subprocess.DEVNULL)
        with open(out) as f:
            items = json.load(f)
    index = {(b.op, tuple(b.shape), b.dtype, b.kind) for b in all_bounds(with_reference=False)}
    index |= {(op, shape, dt, "reference") for op, shape, dt, _ in index}
    missing = [it["fullname"] for it in items if (classify(it) or ("?",))[:4] not in index]
    print(f"{len(items)} cuda benchmark rows, {len(items) - len(missing)} with a roofline bound")
    for m in missing:
        print(f"  no bound: {m}")
    return 1 if missing or not items else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench-json", help="pytest-benchmark JSON of the GPU benchmarks: print measured / bound")
    p.add_argument("--no-reference", action="store_true", help="skip the reference bounds (no torch needed)")
    p.add_argument("--results", help="write the predicted table into this markdown file (its generated section)")
    p.add_argument("--check-coverage", action="store_true",
                   help="collect the `cuda` benchmarks and fail if one has no bound here (SHAPES out of date)")
    p.add_argument("--decode", action="store_true",
                   help="the FAR decode step on H200 (FAR-B, FAR-L at batch 1 and 64) and the time to sample 50k "
                        "images")
    p.add_argument("--decode-measure", action="store_true",
                   help="time generate() here against its bound (CPU: the measured copy bandwidth and bf16 mm rate; "
                        "CUDA: the H200 datasheet)")
    p.add_argument("--preset", default="FAR-B", help="--decode-measure: the model's width (default: %(default)s)")
    p.add_argument("--n-layer", type=int, default=None, help="--decode-measure: trunk layers (default: the preset's)")
    p.add_argument("--ar-n-layer", type=int, default=None,
                   help="--decode-measure: AR-head layers (default: the preset's)")
    p.add_argument("--batches", default="1,64", help="--decode-measure: batch sizes (default: %(default)s)")
    p.add_argument("--modes", default="eager,compiled", help="--decode-measure: eager, compiled or both")
    p.add_argument("--device", default="cpu", help="--decode-measure: cpu or cuda (default: %(default)s)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="--decode-measure: the weights' dtype")
    args = p.parse_args(argv)
    if args.check_coverage:
        return check_coverage()
    if args.decode:
        print(h200_decode_table())
        print(fifty_k_prediction())
        return 0
    if args.decode_measure:
        measure_decode(args.preset, args.n_layer, args.ar_n_layer, [int(b) for b in args.batches.split(",")],
                       args.device, args.modes.split(","), args.dtype, emit=lambda line: print(line, flush=True))
        return 0
    if args.bench_json:
        with open(args.bench_json) as f:
            bench = json.load(f)["benchmarks"]
        print(join_table(bench, all_bounds(with_reference=False) if args.no_reference else None))
        return 0
    bounds = all_bounds(with_reference=not args.no_reference)
    table = predicted_table(bounds)
    print(table)
    if args.results:
        from gpu_resources import replace_section

        header = ("Generated by `python scripts/roofline.py --results benchmarks/RESULTS.md` (no GPU needed). "
                  "Lower bounds on H200 SXM: max(bytes / 4.8 TB/s, FLOPs / peak, exps / SFU rate); FP32 FMA "
                  "67 TFLOP/s, BF16 dense tensor cores 989 TFLOP/s (datasheet 1,979 with sparsity), SFU "
                  f"{H200['sfu_per_s'] / 1e12:.2f} T exp/s (16/clk/SM x 132 SMs x 1.98 GHz). `fused` = compulsory "
                  "traffic and the algorithm's multiply-adds; `reference` = the plain-PyTorch composition "
                  "counted op by op on meta tensors (its N x K / N x V tensors included). "
                  "`scripts/gpu_check.sh` prints measured / bound per benchmark row.")
        replace_section(args.results, "roofline", header + "\n\n" + table,
                        "## Predicted lower bounds on H200 (roofline)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    sys.exit(main())
