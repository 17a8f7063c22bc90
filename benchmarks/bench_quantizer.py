"""FactorizedQuantizer training step (forward + backward; entropy_weight=0.03 at T=0.01 and
disentangle_weight=0.1 on): the fused quantizer (backend auto) against a reference quantizer built
from fqgan_kernels.reference (eager and torch.compile), K=16384, D=8, k=3 (FQGAN-Triple),
N = 4096 and 8192 tokens (16 and 32 images of 16 x 16 tokens).

``peak_extra_MiB`` is the memory one step needs beyond its inputs and parameters (the reference
materialises N x K distance, softmax and log-softmax tensors and their gradients per sub-codebook).
"""

from __future__ import annotations

import pytest
import torch
from conftest import is_smoke, peak_extra_bytes, record, sync

import fqgan_kernels as fk
from fqgan_kernels import reference as ref

k, D, K_FULL = 3, 8, 16384
ENTROPY_WEIGHT, DISENTANGLE_WEIGHT, BETA, T = 0.03, 0.1, 0.25, 0.01
FULL_TOKENS = [4096, 8192]
SMOKE_TOKENS = [64]
GPU_TOKENS = [8192, 65536]


def pytest_generate_tests(metafunc):
    if "tokens" in metafunc.fixturenames:
        gpu = metafunc.definition.get_closest_marker("cuda") is not None
        smoke = is_smoke(metafunc.config)
        tokens = SMOKE_TOKENS if smoke else (GPU_TOKENS if gpu else FULL_TOKENS)
        metafunc.parametrize("tokens", tokens, ids=[f"N{n}" for n in tokens])


def codebook_size(tokens: int) -> int:
    return 256 if tokens in SMOKE_TOKENS else K_FULL


def make_inputs(tokens: int, device: str = "cpu"):
    side = 16 if tokens >= 256 else 8
    g = torch.Generator().manual_seed(0)
    z = torch.randn(tokens // (side * side), k * D, side, side, generator=g).to(device)
    K = codebook_size(tokens)
    codebooks = ref.l2_normalize(torch.randn(k, K, D, generator=g)).to(device)
    return z, codebooks


def reference_step(z: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """The FQGAN-Triple quantizer loss from reference.py (channel-first z [B, k*D, H, W])."""
    zt = z.movedim(1, -1).reshape(-1, k, D)
    zn = ref.l2_normalize(zt)
    codes, _ = ref.nearest_code(zn.detach(), codebooks, True)
    quantized = ref.straight_through(zn, codes)
    vq = ref.vq_losses(zn, codes)
    entropy = ENTROPY_WEIGHT * ref.entropy_loss(zn, codebooks, T, True)
    dis = DISENTANGLE_WEIGHT * ref.disentangle_loss(quantized)
    loss = (vq.codebook + BETA * vq.commitment + entropy).sum() + dis
    return loss + quantized.sum() * 0  # the decoder's input stays in the graph


def make_step(provider: str, tokens: int, device: str = "cpu"):
    z, codebooks = make_inputs(tokens, device)
    z.requires_grad_()
    if provider == "fused":
        q = fk.FactorizedQuantizer(num_codebooks=k, codebook_size=codebooks.shape[1], codebook_dim=D,
                                   commitment_weight=BETA, entropy_weight=ENTROPY_WEIGHT,
                                   entropy_temperature=T, disentangle_weight=DISENTANGLE_WEIGHT).to(device)
        with torch.no_grad():
            q.codebooks.copy_(codebooks)
        params = [z, q.codebooks]

        def forward():
            return q(z).loss
    else:
        cb = codebooks.clone().requires_grad_()
        params = [z, cb]
        fn = torch.compile(reference_step) if provider == "compiled" else reference_step

        def forward():
            return fn(z, cb)

    def step():
        for p in params:
            p.grad = None
        forward().backward()
        sync(device)

    return step


def run(benchmark, provider: str, tokens: int, device: str = "cpu"):
    step = make_step(provider, tokens, device)
    step()  # warm-up: builds/loads kernels, compiles the torch.compile variant
    peak = peak_extra_bytes(step, device)
    K = codebook_size(tokens)
    heavy = provider != "fused" and tokens >= 4096
    rounds = 1 if benchmark.disabled else (2 if heavy else 5)
    benchmark.group = f"quantizer step N={tokens} K={K} D={D} k={k} {device}"
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)
    # 5 sweeps over N x K x k (search, entropy 2 forward + 2 backward), 2*D flops per element each.
    record(benchmark, flops=5 * 2.0 * tokens * K * k * D, peak_bytes=peak, threads=torch.get_num_threads(),
           provider=provider)


def test_reference_eager(benchmark, tokens):
    run(benchmark, "eager", tokens)


def test_reference_compiled(benchmark, tokens):
    run(benchmark, "compiled", tokens)


def test_fused(benchmark, tokens):
    run(benchmark, "fused", tokens)
    benchmark.extra_info["backends"] = str(fk.backends().auto)


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["eager", "compiled", "fused"])
def test_gpu(benchmark, tokens, provider):
    run(benchmark, provider, tokens, "cuda")
