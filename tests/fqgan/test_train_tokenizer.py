"""The tokenizer training loop: exact resume, 2-process DDP equals one process on the whole batch,
clear errors for bad checkpoints and data."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fqgan.runtime.checkpoint import CheckpointError, load_checkpoint
from fqgan.runtime.logging import read_metrics
from fqgan.tokenizer.config import TINY, TokenizerLossConfig
from fqgan.tokenizer.load import load_tokenizer
from fqgan.train.config import TokenizerTrainConfig
from fqgan.train.tokenizer import train_tokenizer

# Smaller than TINY (fast on 2 shared cores), same structure: 32x32 images, 8x8 grid, k = 2.
MODEL = TINY.replace(codebook_size=64, ch=16, z_channels=16, norm_groups=4, adapter_heads=2,
                     feat_pred_dims=(0, 16), feat_pred_heads=2)


class ToyTeacher(nn.Module):
    """A frozen stand-in for CLIP: fixed random conv features, mean-pooled to ``hidden_size``."""

    hidden_size = 16

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.conv = nn.Conv2d(3, 16, 4, stride=4)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.2)
            self.conv.bias.zero_()
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)

    def forward(self, images):
        return self.conv(images).mean(dim=(2, 3))


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(tmp_path, name, **changes):
    base = dict(out_dir=str(tmp_path / name), model=MODEL, data="sample", sample_length=32, global_batch_size=4,
                num_workers=0, max_steps=4, log_every=1, ckpt_every=0, quiet=True, device="cpu",
                # fp32, not auto: auto is bf16 on CPUs with AMX / AVX512-BF16, and these tests compare runs
                # to fp32 tolerances
                precision="fp32", loss=TokenizerLossConfig(perceptual_weight=0.0, disc_start=3, semantic_weight=0.5))
    base.update(changes)
    return TokenizerTrainConfig(**base)


def _losses(cfg, **kw):
    seen = []
    train_tokenizer(cfg, on_step=lambda step, v: seen.append((step, v["loss_gen"], v["loss_disc"])), **kw)
    return seen


def test_resume_is_exact(tmp_path):
    # Dropout on (the RNG matters), EMA on, the discriminator starts at step 3, the semantic loss runs.
    model = MODEL.replace(dropout_p=0.1)
    full = _cfg(tmp_path, "full", model=model, ema=True)
    ref = _losses(full, teachers={1: ToyTeacher()})
    assert [s for s, _, _ in ref] == [1, 2, 3, 4]

    part = _cfg(tmp_path, "part", model=model, ema=True, max_steps=2)
    _losses(part, teachers={1: ToyTeacher()})
    resumed = _cfg(tmp_path, "part", model=model, ema=True, max_steps=4, resume="auto")
    got = _losses(resumed, teachers={1: ToyTeacher()})
    assert got == ref[2:]  # bit for bit: the same floats

    a = load_checkpoint(tmp_path / "full" / "last.pt", kind="fqgan-tokenizer")
    b = load_checkpoint(tmp_path / "part" / "last.pt", kind="fqgan-tokenizer")
    assert a["steps"] == b["steps"] == 4
    for key in ("model", "ema", "discriminator"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), f"{key}.{name}"
    # The resumed run's metrics file reads as one run.
    assert [r["step"] for r in read_metrics(tmp_path / "part" / "metrics.jsonl")] == [1, 2, 3, 4]
    tok = load_tokenizer(tmp_path / "part" / "last.pt")
    assert not tok.training
    assert tok.encode(torch.rand(1, 3, 32, 32) * 2 - 1).shape == (1, 2, 8, 8)


def _trainable_names(config):
    from fqgan.tokenizer import FQTokenizer

    model = FQTokenizer(config)
    model.feature_predictors.requires_grad_(False)  # semantic loss off: the loop freezes the heads
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _ddp_worker(rank, world, init_file, cfg_dict):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        train_tokenizer(TokenizerTrainConfig.from_dict(cfg_dict))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    # One step, global batch 4: 2 x 2 under gloo vs 4 in one process. The quantizer takes its
    # entropy statistics over the global batch (quantizer_distributed=True); the semantic InfoNCE is
    # a per-rank batch loss (official) and the discriminator's BatchNorm uses per-rank statistics, so
    # both are off for this comparison (disc_start > steps: its step has weight 0).
    model = MODEL.replace(quantizer_distributed=True)
    loss = TokenizerLossConfig(perceptual_weight=0.0, semantic_weight=0.0, disc_start=100)
    one = _cfg(tmp_path, "one", model=model, loss=loss, max_steps=1)
    train_tokenizer(one)
    two = _cfg(tmp_path, "two", model=model, loss=loss, max_steps=1)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "pg"), two.to_dict()), nprocs=2, join=True)

    a = load_checkpoint(tmp_path / "one" / "last.pt")
    b = load_checkpoint(tmp_path / "two" / "last.pt")
    assert b["world_size"] == 2 and len(b["rng"]) == 2
    # After Adam's first step exp_avg = (1 - beta1) * grad: the gradients themselves.
    names = _trainable_names(model)
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert len(state_a) == len(state_b) == len(names)
    for i, name in enumerate(names):
        ga, gb = state_a[i]["exp_avg"] / 0.1, state_b[i]["exp_avg"] / 0.1
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-7, msg=lambda m, n=name: f"grad of {n}: {m}")
        # The weights then agree wherever the gradient is not float noise on a mathematically zero
        # gradient (attention key biases): Adam turns such noise into full +-lr steps.
        real = ga.abs() > 1e-6
        torch.testing.assert_close(b["model"][name][real], a["model"][name][real], rtol=0, atol=1e-7)
    ra, rb = read_metrics(tmp_path / "one" / "metrics.jsonl")[0], read_metrics(tmp_path / "two" / "metrics.jsonl")[0]
    assert ra["loss_gen"] == pytest.approx(rb["loss_gen"], rel=1e-5)
    assert ra["usage_vis"] == rb["usage_vis"]


def test_resume_missing_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, "r", resume=str(tmp_path / "nowhere.pt"), max_steps=1,
               loss=TokenizerLossConfig(perceptual_weight=0.0, semantic_weight=0.0))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        train_tokenizer(cfg)


def test_resume_truncated_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, "t", max_steps=1, loss=TokenizerLossConfig(perceptual_weight=0.0, semantic_weight=0.0))
    train_tokenizer(cfg)
    path = tmp_path / "t" / "last.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        train_tokenizer(_cfg(tmp_path, "t", max_steps=2, resume="auto",
                             loss=TokenizerLossConfig(perceptual_weight=0.0, semantic_weight=0.0)))


def test_resume_with_another_model_config(tmp_path):
    loss = TokenizerLossConfig(perceptual_weight=0.0, semantic_weight=0.0)
    train_tokenizer(_cfg(tmp_path, "m", max_steps=1, loss=loss))
    with pytest.raises(ValueError, match="another model config.*codebook_size"):
        train_tokenizer(_cfg(tmp_path, "m", max_steps=2, loss=loss, resume="auto",
                             model=MODEL.replace(codebook_size=32)))


def test_empty_image_folder(tmp_path):
    (tmp_path / "imgs" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="contains no images"):
        train_tokenizer(_cfg(tmp_path, "e", data=str(tmp_path / "imgs")))


def test_batch_larger_than_data(tmp_path):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train_tokenizer(_cfg(tmp_path, "b", sample_length=3))


def test_teacher_needed_for_semantic_loss(tmp_path, monkeypatch):
    monkeypatch.delenv("FQGAN_TEACHERS_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="teacher"):
        train_tokenizer(_cfg(tmp_path, "s", max_steps=1))
    assert not os.path.exists(tmp_path / "s" / "last.pt")


def test_skip_disc_until_start(tmp_path):
    loss = TokenizerLossConfig(perceptual_weight=0.0, semantic_weight=0.0, disc_start=10)
    ref = _losses(_cfg(tmp_path, "ref", loss=loss, max_steps=2))
    got = _losses(_cfg(tmp_path, "skip", loss=loss, max_steps=2, skip_disc_until_start=True))
    assert [g[:2] for g in got] == [r[:2] for r in ref]  # the weight-0 step does not touch the tokenizer
    skipped = load_checkpoint(tmp_path / "skip" / "last.pt")
    ran = load_checkpoint(tmp_path / "ref" / "last.pt")
    assert skipped["optimizer_disc"]["state"] == {} and len(ran["optimizer_disc"]["state"]) > 0
