"""FactorizedQuantizer training step (forward + backward; entropy_weight=0.03 at T=0.01 and
disentangle_weight=0.1 on): the fused quantizer (backend auto) against a reference quantizer built
from fqgan_kernels.reference (eager and torch.compile), K=16384, D=8, k=3 (FQGAN-Triple),
N = 4096 and 8192 tokens (16 and 32 images of 16 x 16 tokens).

Inputs: z sits near its codes (each sub-vector a normalised code plus noise of std 0.05 per
dimension), as the commitment loss keeps it in training. "peaked" is the FQGAN configuration
(entropy at T = 0.01: a near one-hot softmax over codes, many subnormal exponentials); "flat" is the
same step at T = 1. Paired in the summary at the end of the session. The default run times N = 4096
(``HEADLINE_TOKENS``); ``--bench-full`` both of ``FULL_TOKENS``.

Before timing, each provider's first step is checked (benchmarks/checks.py): indices by the
nearest-code distance rule, loss and gradients (z and codebooks) against the eager reference step,
computed once per case, with the tolerances of tests/test_quantizer.py's GPU training-step test.

``peak_extra_MiB`` is the memory one step needs beyond its inputs and parameters (the reference
materialises N x K distance, softmax and log-softmax tensors and their gradients per sub-codebook).
"""

from __future__ import annotations

import pytest
import selection
import torch
from checks import Memo, check_close_to_reference, check_nearest, exact_nearest
from conftest import label, record, sync, timed

import fqgan_kernels as fk
from fqgan_kernels import reference as ref

k, D, K_FULL = 3, 8, 16384
ENTROPY_WEIGHT, DISENTANGLE_WEIGHT, BETA = 0.03, 0.1, 0.25
TEMPERATURE = {"peaked": 0.01, "flat": 1.0}
NOTE = {"peaked": "FQGAN config (entropy T=0.01), z near its codes (noise std 0.05)",
        "flat": "entropy T=1.0, same z and codes"}
NEAR_CODE_NOISE = 0.05
FULL_TOKENS = [4096, 8192]
HEADLINE_TOKENS = [4096]  # the default run (benchmarks/selection.py)
SMOKE_TOKENS = [64]
GPU_TOKENS = [8192, 65536]


def pytest_generate_tests(metafunc):
    if "tokens" in metafunc.fixturenames:
        gpu = metafunc.definition.get_closest_marker("cuda") is not None
        mode = selection.mode(metafunc.config)
        tokens = SMOKE_TOKENS if mode == "smoke" else (
            GPU_TOKENS if gpu else (FULL_TOKENS if mode == "full" else HEADLINE_TOKENS))
        metafunc.parametrize("tokens", tokens, ids=[f"N{n}" for n in tokens])
    if "inputs" in metafunc.fixturenames:
        metafunc.parametrize("inputs", ["flat", "peaked"])


def codebook_size(tokens: int) -> int:
    return 256 if tokens in SMOKE_TOKENS else K_FULL


def make_inputs(tokens: int, device: str = "cpu"):
    """z [B, k*D, H, W] (channel-first) near its codes, codebooks [k, K, D] normalised."""
    side = 16 if tokens >= 256 else 8
    g = torch.Generator().manual_seed(0)
    K = codebook_size(tokens)
    codebooks = ref.l2_normalize(torch.randn(k, K, D, generator=g))
    picks = torch.randint(0, K, (tokens, k), generator=g)
    zt = torch.stack([codebooks[i][picks[:, i]] for i in range(k)], 1)
    zt = zt + NEAR_CODE_NOISE * torch.randn(tokens, k, D, generator=g)  # (N, k, D), tokens (b, h, w)
    z = zt.reshape(tokens // (side * side), side, side, k * D).permute(0, 3, 1, 2).contiguous()
    return z.to(device), codebooks.to(device)


def tokens_of(z: torch.Tensor) -> torch.Tensor:
    """[B, k*D, H, W] -> (N, k, D), tokens in (b, h, w) order."""
    return z.movedim(1, -1).reshape(-1, k, D)


def reference_step(z: torch.Tensor, codebooks: torch.Tensor, temperature: float):
    """The FQGAN-Triple quantizer loss from reference.py (channel-first z [B, k*D, H, W]), and the
    indices (N, k)."""
    zn = ref.l2_normalize(tokens_of(z))
    codes, indices = ref.nearest_code(zn.detach(), codebooks, True)
    quantized = ref.straight_through(zn, codes)
    vq = ref.vq_losses(zn, codes)
    entropy = ENTROPY_WEIGHT * ref.entropy_loss(zn, codebooks, temperature, True)
    dis = DISENTANGLE_WEIGHT * ref.disentangle_loss(quantized)
    loss = (vq.codebook + BETA * vq.commitment + entropy).sum() + dis
    return loss + quantized.sum() * 0, indices  # the decoder's input stays in the graph


def make_step(provider: str, tokens: int, inputs: str, device: str = "cpu"):
    """``(step, z, codebooks)``: ``step()`` runs forward + backward and returns (loss, indices (N, k))."""
    z, codebooks = make_inputs(tokens, device)
    z.requires_grad_()
    temperature = TEMPERATURE[inputs]
    if provider == "fused":
        q = fk.FactorizedQuantizer(num_codebooks=k, codebook_size=codebooks.shape[1], codebook_dim=D,
                                   commitment_weight=BETA, entropy_weight=ENTROPY_WEIGHT,
                                   entropy_temperature=temperature, disentangle_weight=DISENTANGLE_WEIGHT,
                                   channel_first=True).to(device)
        with torch.no_grad():
            q.codebooks.copy_(codebooks)
        cb = q.codebooks

        def forward():
            out = q(z)
            return out.loss, out.indices.permute(0, 2, 3, 1).reshape(-1, k)
    else:
        cb = codebooks.clone().requires_grad_()
        fn = torch.compile(reference_step) if provider == "compiled" else reference_step

        def forward():
            return fn(z, cb, temperature)

    def step():
        z.grad = None
        cb.grad = None
        loss, indices = forward()
        loss.backward()
        sync(device)
        return loss.detach(), indices

    return step, z, cb


_references = Memo(size=2)  # (tokens, inputs, device) -> (eager (loss, grad_z, grad_codebooks), exact nearest)


def references(tokens, inputs, device, eager_result=None):
    def compute():
        if eager_result is not None:
            eager = eager_result
        else:
            step, z, cb = make_step("eager", tokens, inputs, device)
            loss, _ = step()
            eager = (loss, z.grad, cb.grad)
        z, codebooks = make_inputs(tokens, device)
        return tuple(x.detach().clone() for x in eager), exact_nearest(tokens_of(z), codebooks, True)

    return _references.get((tokens, inputs, device), compute)


def run(benchmark, provider: str, tokens: int, inputs: str, device: str = "cpu"):
    K = codebook_size(tokens)
    label(benchmark, f"N={tokens} K={K} D={D} k={k}", NOTE[inputs])
    step, z, cb = make_step(provider, tokens, inputs, device)

    def check(result):  # the warm-up step (builds/loads kernels, compiles)
        loss, indices = result
        got = (loss, z.grad, cb.grad)
        eager, exact = references(tokens, inputs, device, got if provider == "eager" else None)
        what = f"quantizer step {provider} {inputs} N={tokens}"
        check_nearest(exact, indices, None, what)
        check_close_to_reference(what, got, eager)

    timed(benchmark, step, check=check, device=device, compiles=provider == "compiled")
    # 5 sweeps over N x K x k (search, entropy 2 forward + 2 backward), 2*D flops per element each.
    record(benchmark, flops=5 * 2.0 * tokens * K * k * D, threads=torch.get_num_threads(),
           temperature=TEMPERATURE[inputs])


def test_reference_eager(benchmark, tokens, inputs):
    run(benchmark, "eager", tokens, inputs)


def test_reference_compiled(benchmark, tokens, inputs):
    run(benchmark, "compiled", tokens, inputs)


def test_fused(benchmark, tokens, inputs):
    run(benchmark, "fused", tokens, inputs)
    benchmark.extra_info["backends"] = str(fk.backends().auto)


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["eager", "compiled", "fused"])
def test_gpu(benchmark, tokens, inputs, provider):
    run(benchmark, provider, tokens, inputs, "cuda")
