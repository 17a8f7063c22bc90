"""One FQGAN tokenizer training step on CPU: FQGAN-Dual-16 (real widths, K = 16384), batch
2 x 3 x 256 x 256, every loss on (pixel L2, LPIPS, PatchGAN hinge with the discriminator started,
codebook / commitment / entropy 0.03 / disentanglement 0.1, InfoNCE against a tiny random CLIP
teacher of width 1024), with the quantizer on the fused backend (``auto`` -> the compiled CPU
kernels) against the reference backend (plain PyTorch, N x K distances and softmaxes).

A step = tokenizer forward, generator loss, its backward, discriminator loss, its backward (the two
backward passes of the official loop; optimizer updates left out: the same for both providers).

``extra_info``:
- ``peak_extra_MiB``: the step's peak resident memory beyond what was live before it (VmHWM).
- ``quantizer_s`` / ``quantizer_share``: wall time spent in the quantizer, measured with timed hooks:
  forward from a forward pre-hook to a forward hook on ``model.quantizer``; backward from the moment
  the gradient of the quantizer's output is complete (a tensor hook on ``quantized``) to the moment
  the gradient of its input is (a tensor hook on the latents): the latents feed only the quantizer,
  and every node created after it (decoder, feature head, losses) has run by then, so the window holds
  exactly the quantizer's backward (nearest-code scatter, loss kernels, normalisations).
- ``quantizer_ops_share`` (``--bench-full`` only): the same share from torch.profiler, over the
  ``fqgan::*`` custom ops only (their CPU total time, children included), from one extra profiled step.

Smoke mode (``--benchmark-disable`` / ``FQGAN_BENCH_SMOKE=1``): the TINY preset on 32 x 32 images.
"""

from __future__ import annotations

import contextlib
import time

import pytest
import torch
from conftest import is_full, is_smoke, label, record, timed

from fqgan.tokenizer import FQTokenizer, TokenizerLoss, TokenizerLossConfig, get_preset
from fqgan.tokenizer.lpips import LPIPS
from fqgan.tokenizer.teachers import FeatureTeacher

transformers = pytest.importorskip("transformers")
try:  # transformers' models import torchvision when it is installed: beside the CPU torch, through fqgan's door
    from fqgan.runtime.vision import import_torchvision
except ImportError:  # an fqgan without it (and without torchvision in the model extra)
    import_torchvision = None
if import_torchvision is not None:
    with contextlib.suppress(ModuleNotFoundError):
        import_torchvision()

PROVIDERS = ["fused", "reference"]


def tiny_teacher(width: int) -> FeatureTeacher:
    """A random one-layer CLIP vision tower of the teacher's width (no weight file needed)."""
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=width, intermediate_size=width, num_hidden_layers=1,
                                           num_attention_heads=16 if width % 16 == 0 else 4, image_size=224,
                                           patch_size=32)
    return FeatureTeacher(transformers.CLIPVisionModel(config), "clip")


class QuantizerTimer:
    """Wall time of ``model.quantizer``'s forward and backward in one step (see the module docstring)."""

    def __init__(self, model: FQTokenizer) -> None:
        self.forward_s = self.backward_s = 0.0
        self._t0 = self._tb0 = 0.0
        model.quantizer.register_forward_pre_hook(self._pre)
        model.quantizer.register_forward_hook(self._post)

    def reset(self) -> None:
        self.forward_s = self.backward_s = 0.0

    def _pre(self, module, args) -> None:
        (z,) = args
        if z.requires_grad:
            z.register_hook(self._grad_in)
        self._t0 = time.perf_counter()

    def _post(self, module, args, output) -> None:
        self.forward_s += time.perf_counter() - self._t0
        if output.quantized.requires_grad:
            output.quantized.register_hook(self._grad_out)

    def _grad_out(self, grad):
        self._tb0 = time.perf_counter()

    def _grad_in(self, grad):
        self.backward_s += time.perf_counter() - self._tb0

    @property
    def total_s(self) -> float:
        return self.forward_s + self.backward_s


def make_step(provider: str, smoke: bool):
    base = get_preset("tiny") if smoke else get_preset("fqgan-dual-16")
    config = base.replace(quantizer_backend="auto" if provider == "fused" else "reference")
    torch.manual_seed(0)
    model = FQTokenizer(config).train()
    width = config.feat_pred_dims[1]
    loss_fn = TokenizerLoss(TokenizerLossConfig(disc_start=0), config, teachers=[tiny_teacher(width)],
                            lpips=LPIPS()).train()
    x = torch.rand(2, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    timer = QuantizerTimer(model)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn.discriminator.zero_grad(set_to_none=True)
        out = model(x)
        g = loss_fn.generator_loss(x, out, step=1, last_layer=model.last_layer)
        g.loss.backward()
        d = loss_fn.discriminator_loss(x, out.reconstruction, step=1)
        d.loss.backward()

    return step, timer


def profiled_quantizer_share(step) -> float:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
    ops = [e for e in prof.key_averages() if e.key.startswith("fqgan::")]
    return sum(e.cpu_time_total for e in ops) / 1e6 / wall


@pytest.mark.parametrize("provider", PROVIDERS)
def test_tokenizer_train_step(benchmark, provider, request):
    smoke = is_smoke(request.config)
    step, timer = make_step(provider, smoke)
    label(benchmark, "TINY B=2 32px" if smoke else "FQGAN-Dual-16 K=16384 B=2 256px",
          "random images, every loss on, tiny random CLIP teacher")
    # the warm-up (oneDNN primitives, kernel caches) is not counted in the quantizer's time
    timed(benchmark, step, after_warmup=timer.reset)
    stats = getattr(benchmark, "stats", None)
    rounds = stats.stats.rounds if stats is not None and getattr(stats, "stats", None) else 1
    wall = stats.stats.mean if stats is not None and getattr(stats, "stats", None) else None
    extra = dict(threads=torch.get_num_threads(), quantizer_s=round(timer.total_s / rounds, 4),
                 quantizer_fwd_s=round(timer.forward_s / rounds, 4),
                 quantizer_bwd_s=round(timer.backward_s / rounds, 4))
    if wall:
        extra["quantizer_share"] = round(timer.total_s / rounds / wall, 4)
    if is_full(request.config):  # one more step, profiled
        extra["quantizer_ops_share"] = round(profiled_quantizer_share(step), 4)
    record(benchmark, **extra)
