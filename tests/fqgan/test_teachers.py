"""Feature teachers: tiny random CLIP / DINOv2 configs saved with save_pretrained and loaded back
through fqgan.tokenizer.teachers, compared with the official preprocessing and feature selection."""

import contextlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

from fqgan.runtime.checkpoint import CheckpointError, MissingFileError
from fqgan.runtime.vision import import_torchvision
from fqgan.tokenizer.config import TINY
from fqgan.tokenizer.teachers import TEACHERS_ENV, FeatureTeacher, find_teacher, load_teacher, load_teachers

transformers = pytest.importorskip("transformers")
with contextlib.suppress(ModuleNotFoundError):
    import_torchvision()  # transformers' models import torchvision when installed: through the door

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


def official_dino_positions(model, height, width, resample="4.41.1"):
    """Dinov2Embeddings.interpolate_pos_encoding of transformers 4.41.1, the version FQGAN's
    requirements.txt pins: bicubic with scale_factor (grid + 0.1) / sqrt(positions).
    ``resample="size"``: newer transformers' size=(grid, grid) instead (to check the test sees it)."""
    pos = model.embeddings.position_embeddings
    num_positions = pos.shape[1] - 1
    if (height // model.config.patch_size) ** 2 == num_positions and height == width:
        return pos
    class_pos_embed = pos[:, 0]
    patch_pos_embed = pos[:, 1:]
    dim = pos.shape[-1]
    height = height // model.config.patch_size
    width = width // model.config.patch_size
    side = int(math.sqrt(num_positions))
    patch_pos_embed = patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if resample == "size":
        patch_pos_embed = F.interpolate(patch_pos_embed.float(), size=(height, width), mode="bicubic",
                                        align_corners=False)
    else:
        height, width = height + 0.1, width + 0.1
        patch_pos_embed = F.interpolate(
            patch_pos_embed.to(dtype=torch.float32),
            scale_factor=(float(height / math.sqrt(num_positions)), float(width / math.sqrt(num_positions))),
            mode="bicubic", align_corners=False)
        assert (int(height), int(width)) == tuple(patch_pos_embed.shape[-2:])
    patch_pos_embed = patch_pos_embed.to(pos.dtype).permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def official_dino_features(model, images, resample="4.41.1"):
    """FQGAN dino_encoder.py: ImageNet mean/std after nearest 224, then Dinov2Model of transformers
    4.41.1 (patch embeddings, class token, positions as :func:`official_dino_positions`, encoder,
    final layernorm): last_hidden_state[:, 0]. The embedding step is spelled out here because the
    installed transformers resamples the positions differently."""
    inp = F.interpolate(images * 0.5 + 0.5, (224, 224))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pixel_values = (inp - mean) / std
    emb = model.embeddings.patch_embeddings(pixel_values)
    emb = torch.cat((model.embeddings.cls_token.expand(emb.shape[0], -1, -1), emb), dim=1)
    emb = emb + official_dino_positions(model, 224, 224, resample)
    hidden = model.encoder(emb).last_hidden_state
    return model.layernorm(hidden)[:, 0]


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


def test_dinov2_positions_resampled_as_transformers_4_41(tmp_path, images):
    """DINOv2's real geometry (patch 14, trained at 518: a 37x37 grid, 16x16 at 224): the teacher adds
    the position table that transformers 4.41.1 (pinned by FQGAN) resamples with scale_factor
    (16 + 0.1) / 37, not newer transformers' size=(16, 16) -- those give other features."""
    torch.manual_seed(2)
    saved = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=518, patch_size=14))
    with torch.no_grad():  # a smooth table, as learned ones are (a random one would exaggerate the gap)
        yy, xx = torch.meshgrid(torch.arange(37.0), torch.arange(37.0), indexing="ij")
        freq = torch.arange(1, 33.0) / 8
        table = torch.sin(xx[..., None] * freq / 5 + yy[..., None] * freq.flip(0) / 7).reshape(1, 37 * 37, 32)
        saved.embeddings.position_embeddings[:, 1:] = table
    saved.save_pretrained(tmp_path / "dino")
    saved.eval()
    teacher = load_teacher(tmp_path / "dino")
    assert teacher.model.embeddings.position_embeddings.shape == (1, 1 + 16 * 16, 32)
    x = images(2, 64)
    torch.testing.assert_close(teacher(x), official_dino_features(saved, x))
    newer = official_dino_features(saved, x, resample="size")
    assert (newer - official_dino_features(saved, x)).abs().max() > 1e-3  # the pin has teeth


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
    with pytest.raises(ValueError, match="hidden size 128 but the feature predictor of sub-codebook 1 predicts 64-d"):
        load_teachers(TINY, paths={1: tmp_path / "wide"})


def test_missing_teacher_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv(TEACHERS_ENV, raising=False)
    expected = rf"Looked at: \${TEACHERS_ENV} \(not set\).*huggingface-cli download"
    with pytest.raises(MissingFileError, match=expected):
        load_teacher("openai/clip-vit-base-patch16-not-here")
    with pytest.raises(MissingFileError, match=str(tmp_path / "openai" / "clip-x")):
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
