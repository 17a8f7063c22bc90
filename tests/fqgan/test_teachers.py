"""Feature teachers: tiny random CLIP / DINOv2 configs saved with save_pretrained and loaded back
through fqgan.teachers, compared with the official preprocessing and feature selection."""

import json

import pytest
import torch
import torch.nn.functional as F

from fqgan.teachers import TEACHERS_ENV, FeatureTeacher, find_teacher, load_teacher, load_teachers
from fqgan.tokenizer.config import TINY
from fqgan.tokenizer.weights import CheckpointError, WeightsNotFoundError

transformers = pytest.importorskip("transformers")

CLIP_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                   image_size=224, patch_size=32)


def save_clip_vision(path, full: bool = False):
    """A tiny random CLIP tower; ``full``: a whole CLIPModel (text + vision), as the hub's openai/clip-*."""
    torch.manual_seed(0)
    if full:
        cfg = transformers.CLIPConfig(
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1),
            vision_config=CLIP_VISION, projection_dim=16)
        model = transformers.CLIPModel(cfg)
    else:
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP_VISION))
    model.save_pretrained(path)
    return model


def save_dinov2(path, hidden=64):
    torch.manual_seed(1)
    model = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4, mlp_ratio=2, image_size=64, patch_size=32))
    model.save_pretrained(path)
    return model


def official_clip_features(vision_model, images):
    """FQGAN clip_encoder.py: ScalingLayer ([-1,1] -> [0,1], nearest 224, OpenAI mean/std), then
    hidden_states[-1][:, :1] of the vision tower."""
    inp = images * 0.5 + 0.5
    inp = F.interpolate(inp, (224, 224))
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    out = vision_model(pixel_values=(inp - mean) / std, output_hidden_states=True)
    return out.hidden_states[-1][:, :1].squeeze(1)


def official_dino_features(model, images):
    """FQGAN dino_encoder.py: ImageNet mean/std after nearest 224; last_hidden_state[:, 0]."""
    inp = F.interpolate(images * 0.5 + 0.5, (224, 224))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return model(pixel_values=(inp - mean) / std)["last_hidden_state"][:, 0]


@pytest.mark.parametrize("full", [False, True])
def test_clip_teacher_matches_official(tmp_path, images, full):
    saved = save_clip_vision(tmp_path / "clip", full=full)
    teacher = load_teacher(tmp_path / "clip")
    assert isinstance(teacher, FeatureTeacher) and teacher.kind == "clip" and teacher.hidden_size == 64
    # The weights are the saved ones, not a fresh random init: compare with a tower that gets them directly.
    if full:
        ref_vision = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP_VISION))
        getattr(ref_vision, "vision_model", ref_vision).load_state_dict(saved.vision_model.state_dict())
    else:
        ref_vision = saved
    ref_vision.eval()
    x = images(3, 32)
    feats = teacher(x)
    assert feats.shape == (3, 64) and not feats.requires_grad
    torch.testing.assert_close(feats, official_clip_features(ref_vision, x))


def test_dinov2_teacher_matches_official(tmp_path, images):
    saved = save_dinov2(tmp_path / "dino").eval()
    teacher = load_teacher(tmp_path / "dino")
    assert teacher.kind == "dinov2" and teacher.hidden_size == 64
    x = images(2, 48)
    torch.testing.assert_close(teacher(x), official_dino_features(saved, x))


def test_teacher_is_frozen_and_stays_in_eval(tmp_path):
    save_dinov2(tmp_path / "dino")
    teacher = load_teacher(tmp_path / "dino").train()
    assert not teacher.training and not teacher.model.training
    assert all(not p.requires_grad for p in teacher.parameters())


def test_lookup_by_name_under_root_and_env(tmp_path, monkeypatch):
    where = tmp_path / "openai" / "clip-vit-large-patch14"
    save_clip_vision(where)
    assert find_teacher("openai/clip-vit-large-patch14", root=tmp_path) == where
    monkeypatch.setenv(TEACHERS_ENV, str(tmp_path))
    assert load_teacher("openai/clip-vit-large-patch14").kind == "clip"
    save_dinov2(tmp_path / "dinov2-small")  # <root>/<last part of the name> also works
    assert find_teacher("facebook/dinov2-small") == tmp_path / "dinov2-small"


def test_load_teachers_for_a_config(tmp_path):
    save_clip_vision(tmp_path / "tiny-teacher")
    teachers = load_teachers(TINY, root=tmp_path)
    assert list(teachers) == [1] and teachers[1].hidden_size == 64
    save_dinov2(tmp_path / "wide", hidden=128)
    with pytest.raises(ValueError, match="hidden size 128 but the feature head of sub-codebook 1 predicts 64-d"):
        load_teachers(TINY, paths={1: tmp_path / "wide"})


def test_missing_teacher_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv(TEACHERS_ENV, raising=False)
    expected = rf"Looked at: \${TEACHERS_ENV} \(not set\).*huggingface-cli download"
    with pytest.raises(WeightsNotFoundError, match=expected):
        load_teacher("openai/clip-vit-base-patch16-not-here")
    with pytest.raises(WeightsNotFoundError, match=str(tmp_path / "openai" / "clip-x")):
        load_teacher("openai/clip-x", root=tmp_path)


def test_bad_teacher_directories(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="model_type 'bert'"):
        load_teacher(tmp_path / "bert")
    save_dinov2(tmp_path / "noweights")
    for f in (tmp_path / "noweights").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(CheckpointError, match="cannot load a Dinov2Model"):
        load_teacher(tmp_path / "noweights")
