#!/usr/bin/env python
"""Memory per GPU of FAR training (``fqgan train-generator``) under DDP and FSDP2: the table of
docs/training.md, "Parallelism and memory".

Parameters are counted exactly: each preset of :data:`fqgan.generator.PRESETS` is built on the meta device
(``with torch.device("meta"): FAR(FARConfig.from_preset(...))``, no memory). The rest is estimated from the
architecture, per GPU, in GiB (2**30 bytes):

* weights, gradients, AdamW: fp32 parameters (the master copy: bf16 autocast keeps them fp32), fp32
  gradients, two fp32 moments = 16 B per parameter under DDP; the same sharded over the W processes
  under FSDP2 (16 / W B per parameter).
* DDP extras: the reducer's gradient buckets (``DistributedDataParallel`` copies each gradient into a
  bucket: 4 B per parameter, as ``gradient_as_bucket_view`` is off) and autocast's bf16 copies of the
  weights that go through matmuls (kept from forward to backward: 2 B per such weight).
* FSDP2 extras (GPU mixed precision: bf16 parameters for compute, fp32 gradient reduction): the root's
  unsharded bf16 parameters (embeddings, heads, aggregation: not resharded after forward) and their
  bf16 gradients, plus two transformer blocks in flight (the one running and the prefetched one) with
  one block's bf16 gradient and its fp32 copy for the reduce-scatter: 4 B x root + 10 B x block. With
  ``--grad-accum`` > 1 the loop reduce-scatters every micro-batch, so the gradients stay sharded.
* EMA (``--ema``): one fp32 copy, 4 B per parameter (DDP) or 4 / W (FSDP, sharded like the model).
* activations: bytes per token per transformer block from what autograd saves in this model (listed in
  :func:`block_bytes`), times the tokens of one micro-batch (batch / W / grad_accum rows x T positions
  for the trunk; x k sub-token slots for the factorized AR head), plus the embeddings and the fused
  heads (:func:`rest_bytes`). With activation checkpointing each block keeps only its input, and one
  block is recomputed at a time during backward (an AR-head block: k x as many tokens as a trunk block).

Not counted: the CUDA context and allocator fragmentation (typically 1-3 GiB), NCCL buffers, the
gradients of activations alive inside one block's backward (less than that block's activations), the
data loader.

    python scripts/memory_table.py                     # the table of docs/training.md
    python scripts/memory_table.py --gpus 16 --grad-accum 2 --presets FAR-L FAR-XL
    python scripts/memory_table.py --check             # the activation formula against autograd, on CPU
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
from torch import nn

from fqgan.generator import FAR, PRESETS, FARConfig
from fqgan.generator.model import TransformerBlock

GIB = 2 ** 30


@dataclass(frozen=True)
class Counts:
    """Exact parameter counts of one FAR config (meta device)."""

    total: int
    block: int  # one transformer block (trunk and AR-head blocks are the same shape)
    blocks: int  # number of blocks (n_layer + ar_n_layer)
    matmul: int  # weights that autocast casts to bf16 (every nn.Linear weight and the k output heads)

    @property
    def root(self) -> int:
        """Parameters outside the blocks: FSDP's root unit (embeddings, heads, aggregation, final norm)."""
        return self.total - self.blocks * self.block


def count(config: FARConfig) -> Counts:
    with torch.device("meta"):
        model = FAR(config)
    blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
    per_block = {sum(p.numel() for p in b.parameters()) for b in blocks}
    if len(per_block) != 1:
        raise AssertionError(f"blocks of different sizes: {per_block}")
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)) + model.head.numel()
    return Counts(sum(p.numel() for p in model.parameters()), per_block.pop(), len(blocks), matmul)


def block_bytes(c: FARConfig, bf16_params: bool, mask_bytes: float = 1.0) -> dict[str, float]:
    """Bytes autograd keeps per token for one :class:`TransformerBlock` in training under bf16 autocast.

    ``bf16_params``: FSDP2 mixed precision (bf16 parameters, so a bf16 residual stream); else fp32
    parameters under autocast (DDP), where the residual adds promote to fp32. ``mask_bytes``: bytes per
    dropout-mask element (bool on CUDA; the input's dtype on CPU).
    """
    D, F, H = c.dim, c.hidden_dim, c.n_head
    kv = c.kv_heads * c.head_dim
    if bf16_params:
        # RMSNorm keeps its fp32 upcast of x, its bf16 normalised x (for the weight's gradient) and its bf16
        # output, which is the input the following matmuls keep (no autocast cast: it is bf16 already).
        norms, linear_inputs = 2 * (4 * D + 2 * D + 2 * D), 0
    else:
        # RMSNorm keeps its fp32 input and fp32 normalised x; wqkv, w1 and w3 each keep their own bf16 cast
        # of its fp32 output.
        norms, linear_inputs = 2 * (4 * D + 4 * D), 3 * 2 * D
    return {
        "norms": norms,
        "linear inputs": linear_inputs,
        "qkv (pinned by v, a view)": 2 * (D + 2 * kv),
        "q, k after RoPE": 2 * (D + kv),
        "attention output (wo's input)": 2 * D,
        "attention log-sum-exp, rms": 4 * H + 2 * 4,
        "SwiGLU (w1 out, silu out, w3 out, product)": 4 * 2 * F,
        "dropout masks": mask_bytes * D * ((c.resid_dropout_p > 0) + (c.ffn_dropout_p > 0)),
    }


def rest_bytes(c: FARConfig, bf16_params: bool, mask_bytes: float = 1.0) -> dict[str, float]:
    """Bytes per image position outside the blocks: embeddings, final norm, the fused heads."""
    k, D = c.num_factors, c.dim
    return {
        "aggregate input": 2 * k * D,
        "final norm": k * D * (4 + 2 if bf16_params else 4 + 4),
        "head hidden": 2 * k * D,
        # The fused linear + cross-entropy (cpu and cuda backends) computes its gradients in the forward pass
        # and keeps them (not as saved tensors) until backward.
        "head hidden gradient": 2 * k * D,
        "token dropout mask": mask_bytes * D if c.token_dropout_p > 0 else 0,
        "indices, targets, lse": 24 * k,
    }


def fixed_activation_bytes(c: FARConfig) -> float:
    """Per micro-batch, independent of its size: the heads' weight gradient from the fused forward (bf16,
    k x V x D) and the cuda kernel's fp32 accumulator of one head (V x D)."""
    return 2 * c.num_factors * c.vocab_size * c.dim + 4 * c.vocab_size * c.dim


def activations(c: FARConfig, positions: int, bf16_params: bool, checkpointing: bool) -> float:
    """Activation bytes of one micro-batch of ``positions`` = rows x T image positions."""
    k = c.num_factors
    block = sum(block_bytes(c, bf16_params).values())
    rest = sum(rest_bytes(c, bf16_params).values())
    block_tokens = positions * (c.n_layer + c.ar_n_layer * k)  # AR-head blocks run over k slots per position
    if not checkpointing:
        return block_tokens * block + positions * rest + fixed_activation_bytes(c)
    kept = (2 if bf16_params else 4) * c.dim  # each block keeps its input (the residual stream)
    recompute = positions * max(k, 1) * block  # one block's activations at a time, the largest (AR head)
    return block_tokens * kept + positions * rest + fixed_activation_bytes(c) + recompute


@dataclass
class Row:
    preset: str
    params: int
    parallel: str
    state: float  # params + grads + AdamW
    extra: float  # DDP buckets + bf16 copies / FSDP gathered working set
    ema: float
    act: float
    act_ac: float

    @property
    def total(self) -> float:
        return self.state + self.extra + self.ema + self.act

    @property
    def total_ac(self) -> float:
        return self.state + self.extra + self.ema + self.act_ac


def rows(presets: list[str], gpus: int, batch: int, grad_accum: int, overrides: dict) -> list[Row]:
    if batch % (gpus * grad_accum):
        raise SystemExit(f"--batch-size {batch} does not split into {gpus} GPUs x {grad_accum} micro-batches")
    out = []
    for name in presets:
        c = FARConfig.from_preset(name, **overrides)
        n = count(c)
        positions = batch // gpus // grad_accum * c.block_size
        for parallel in ("ddp", "fsdp"):
            fsdp = parallel == "fsdp"
            if fsdp:
                state, ema = 16 * n.total / gpus, 4 * n.total / gpus
                extra = 4 * n.root + 10 * n.block
            else:
                state, ema = 16 * n.total, 4 * n.total
                extra = 4 * n.total + 2 * n.matmul
            out.append(Row(name, n.total, parallel, state, extra, ema, activations(c, positions, fsdp, False),
                           activations(c, positions, fsdp, True)))
    return out


def markdown(table: list[Row]) -> str:
    def g(x: float) -> str:
        return f"{x / GIB:.1f}"

    lines = ["| preset | parameters | parallel | weights + grads + AdamW | DDP buckets + bf16 copies / FSDP "
             "gathered | EMA | activations | activations, AC | total (with `--ema`) | total with AC (with `--ema`) |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in table:
        lines.append(f"| {r.preset} | {r.params:,} | {r.parallel.upper()} | {g(r.state)} | {g(r.extra)} | "
                     f"{g(r.ema)} | {g(r.act)} | {g(r.act_ac)} | {g(r.total - r.ema)} ({g(r.total)}) | "
                     f"{g(r.total_ac - r.ema)} ({g(r.total_ac)}) |")
    return "\n".join(lines)


# -- --check: the activation formula against what autograd saves ------------------------------------
def _saved_bytes(model: nn.Module, rows_: int, c: FARConfig) -> int:
    """Bytes of the distinct storages autograd saves in one bf16-autocast training forward of ``rows_`` rows
    (parameters themselves excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    g = torch.Generator().manual_seed(rows_)
    idx = torch.randint(0, c.vocab_size, (rows_, c.num_factors, c.block_size), generator=g)
    labels = torch.randint(0, c.num_classes, (rows_,), generator=g)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        out = model(idx, labels)
    del out
    return sum(seen.values())


def check() -> int:
    """Compare the per-position formula with autograd's saved tensors for small FARs on CPU: the
    difference between two batch sizes removes everything that does not scale with the batch (bf16
    weight copies). On CPU a dropout mask is stored in its input's dtype, not as bool."""
    bad = 0
    for k in (2, 3):
        c = FARConfig(dim=192, n_layer=2, n_head=3, ar_n_layer=2, block_size=16, vocab_size=97, num_classes=7,
                      num_factors=k)
        for bf16_params in (False, True):
            torch.manual_seed(0)
            model = FAR(c).train()
            if bf16_params:
                model = model.to(torch.bfloat16)
            measured = (_saved_bytes(model, 5, c) - _saved_bytes(model, 3, c)) / (2 * c.block_size)
            block = sum(block_bytes(c, bf16_params, mask_bytes=2).values())
            rest = rest_bytes(c, bf16_params, mask_bytes=2 if bf16_params else 4)
            rest.pop("head hidden gradient")  # kept by the fused op as an attribute, not a saved tensor
            formula = (c.n_layer + c.ar_n_layer * k) * block + sum(rest.values())
            ok = abs(measured - formula) <= 0.01 * formula
            bad += not ok
            print(f"k={k} {'bf16' if bf16_params else 'fp32'} params: measured {measured:,.0f} B per position, "
                  f"formula {formula:,.0f} ({'ok' if ok else 'MISMATCH'})")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["FAR-B", "FAR-L", "FAR-XL"], choices=sorted(PRESETS))
    ap.add_argument("--gpus", type=int, default=8, help="processes (W)")
    ap.add_argument("--batch-size", type=int, default=256, help="global batch (official 256)")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    ap.add_argument("--num-factors", type=int, default=2, help="k (2: FQGAN-Dual, 3: Triple)")
    ap.add_argument("--vocab-size", type=int, default=16384)
    ap.add_argument("--block-size", type=int, default=256, help="T = grid**2 (256: 256 px images, downsample 16)")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--check", action="store_true", help="check the activation formula on CPU and exit")
    args = ap.parse_args(argv)
    if args.check:
        return check()
    overrides = dict(num_factors=args.num_factors, vocab_size=args.vocab_size, block_size=args.block_size,
                     num_classes=args.num_classes)
    table = rows(args.presets, args.gpus, args.batch_size, args.grad_accum, overrides)
    per_gpu = args.batch_size // args.gpus // args.grad_accum
    print(f"W = {args.gpus} GPUs, global batch {args.batch_size}, grad_accum {args.grad_accum}: {per_gpu} rows x "
          f"T = {args.block_size} positions x k = {args.num_factors} per micro-batch; V = {args.vocab_size}, "
          f"{args.num_classes} classes; GiB per GPU\n")
    print(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
