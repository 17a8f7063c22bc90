"""The photo classifier (fqgan/tokenizer/classifier.py, fqgan/train/classifier.py): its training through the
one loop, its checkpoint, and its feature teacher in the semantic loss as CLIP's would be; the held-out
split of the sample set it trains on; the tokenizer's fp32 quantizer and losses under CPU bf16 autocast."""

import numpy as np
import pytest
import torch

from fqgan.data import SampleImages
from fqgan.data.datasets import _region_corner
from fqgan.runtime.checkpoint import CheckpointError
from fqgan.runtime.logging import read_metrics
from fqgan.tokenizer import FQTokenizer, TokenizerLoss
from fqgan.tokenizer.classifier import ClassifierConfig, ClassifierTeacher, PhotoClassifier, load_classifier
from fqgan.tokenizer.config import TokenizerLossConfig
from fqgan.train.classifier import ClassifierTrainConfig, train_classifier
from fqgan.train.config import TokenizerTrainConfig
from fqgan.train.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ClassifierConfig(num_classes=19, widths=(8, 16), feature_dim=16)


def _cfg(tmp_path, name, **changes):
    base = dict(out_dir=str(tmp_path / name), model=SMALL, data="sample", sample_length=38, global_batch_size=8,
                num_workers=0, max_steps=3, log_every=1, ckpt_every=0, quiet=True, device="cpu", precision="fp32")
    base.update(changes)
    return ClassifierTrainConfig(**base)


def test_classifier_trains_saves_loads_and_resumes_exactly(tmp_path):
    data = SampleImages(32, length=38, region="train")
    full = train_classifier(_cfg(tmp_path, "full", max_steps=4), dataset=data)
    assert full.step == 4 and {"loss", "accuracy"} <= set(full.metrics)
    train_classifier(_cfg(tmp_path, "part", max_steps=2), dataset=data)
    train_classifier(_cfg(tmp_path, "part", max_steps=4, resume="auto"), dataset=data)
    a, b = read_metrics(tmp_path / "full" / "metrics.jsonl"), read_metrics(tmp_path / "part" / "metrics.jsonl")
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
    model = load_classifier(full.checkpoint)
    assert not model.training and model.config == SMALL
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    assert model(x).shape == (5, 19) and model.predict(x).shape == (5,)
    with pytest.raises(ValueError, match="another shape"):
        train_classifier(_cfg(tmp_path, "full", max_steps=5, resume="auto",
                              model=ClassifierConfig(num_classes=19, widths=(8,), feature_dim=16)), dataset=data)
    tok = train_tokenizer(TokenizerTrainConfig(
        out_dir=str(tmp_path / "tok"), model=_tokenizer_config(), data="sample", sample_length=4,
        global_batch_size=2, num_workers=0, max_steps=1, ckpt_every=0, quiet=True, device="cpu",
        precision="fp32", loss=TokenizerLossConfig(perceptual_weight=0.0, semantic_weight=0.0)))
    with pytest.raises(CheckpointError, match="fqgan-tokenizer"):
        load_classifier(tok.checkpoint)


def _tokenizer_config():
    from fqgan.tokenizer.config import TINY

    return TINY.replace(codebook_size=64, ch=16, z_channels=16, norm_groups=4, adapter_heads=2,
                        feat_pred_dims=(0, 16), feat_pred_heads=2)


def test_teacher_is_frozen_and_feeds_the_semantic_loss_like_clip(tmp_path):
    torch.manual_seed(0)
    teacher = ClassifierTeacher(PhotoClassifier(SMALL))
    teacher.train()
    assert not teacher.training and teacher.hidden_size == 16
    assert all(not p.requires_grad for p in teacher.parameters())
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    f = teacher(x)
    assert f.shape == (4, 16) and not f.requires_grad
    # Through the tokenizer's training as a CLIP teacher would be: the InfoNCE term is there and moves.
    seen = []
    cfg = TokenizerTrainConfig(out_dir=str(tmp_path / "t"), model=_tokenizer_config(), data="sample", sample_length=8,
                               global_batch_size=4, num_workers=0, max_steps=2, log_every=1, ckpt_every=0, quiet=True,
                               device="cpu", precision="fp32",
                               loss=TokenizerLossConfig(perceptual_weight=0.0, semantic_weight=0.5, disc_start=100))
    train_tokenizer(cfg, teachers={1: teacher}, on_step=lambda s, v: seen.append(s))
    log = read_metrics(tmp_path / "t" / "metrics.jsonl")
    assert seen == [1, 2] and all(r["semantic_sem"] > 0 for r in log)
    with pytest.raises(ValueError, match="hidden size 64"):
        TokenizerLoss(TokenizerLossConfig(perceptual_weight=0.0), _tokenizer_config(),
                      teachers={1: ClassifierTeacher(PhotoClassifier(ClassifierConfig(feature_dim=64)))})


def test_held_out_region_is_disjoint_from_the_training_region():
    rng = np.random.default_rng(0)
    for width, height in ((512, 512), (451, 300), (172, 448), (9, 5)):
        for side in (1, min(width, height) // 3, min(width, height) // 2):
            for _ in range(300):
                left, top = _region_corner(rng, width, height, side, "train")
                s = max(1, min(side, width // 2, height // 2))
                assert 0 <= left and left + s <= width and 0 <= top and top + s <= height
                assert not (left + s > width // 2 and top + s > height // 2)  # never reaches the quadrant
                left, top = _region_corner(rng, width, height, side, "heldout")
                assert left >= width // 2 and top >= height // 2 and left + s <= width and top + s <= height
    held = SampleImages(32, length=19, augment=False, region="heldout")
    train = SampleImages(32, length=19, region="train")
    assert [held[i][1] for i in range(19)] == list(range(19)) == [train[i][1] for i in range(19)]
    # The default stays what it was: crops anywhere, up to the whole shorter side.
    assert SampleImages(32).region == "all" and SampleImages(32).max_crop == 1.0
    with pytest.raises(ValueError, match="max_crop"):
        SampleImages(32, region="train", max_crop=0.8)
    with pytest.raises(ValueError, match="region"):
        SampleImages(32, region="left")


def test_quantizer_and_losses_stay_fp32_under_cpu_bf16_autocast(tiny_config):
    torch.manual_seed(0)
    model = FQTokenizer(tiny_config.replace(feat_pred_dims=(0, 0), teachers=(None, None)))
    loss = TokenizerLoss(TokenizerLossConfig(perceptual_weight=0.0, semantic_weight=0.0, disc_start=100), model.config)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model.encode_latents(x)
        q = model.quantize(x)
        g = loss.generator_loss(x, model(x), 1)
    assert z.dtype == torch.bfloat16  # the convolutions ran in bf16 ...
    # ... the quantizer in fp32: its losses and statistics, and the codes of the fp32 search on that z.
    assert q.loss.dtype == torch.float32 and q.breakdown.codebook.dtype == torch.float32
    torch.testing.assert_close(q.indices, model.quantizer(z.float()).indices, rtol=0, atol=0)
    assert g.loss.dtype == g.reconstruction.dtype == torch.float32
    assert g.quantizer.entropy.dtype == g.quantizer.disentangle.dtype == torch.float32
