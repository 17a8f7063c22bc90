"""fqgan.eval.tokenizer: evaluate_tokenizer against independent computations, checkpoint loading
(train-tokenizer and official formats), and the eval-tokenizer / reconstruct commands end to end on
the tiny preset with random weights."""

import argparse
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fqgan.cli import add_eval_tokenizer_arguments, add_reconstruct_arguments, run_eval_tokenizer, run_reconstruct
from fqgan.data.images import load_image, to_uint8
from fqgan.eval.inception import INCEPTION_WEIGHTS_ENV, random_inception_state_dict, torch_fidelity_available
from fqgan.eval.tokenizer import evaluate_tokenizer
from fqgan.runtime.checkpoint import CheckpointError, MissingFileError, save_checkpoint
from fqgan.tokenizer import FQTokenizer
from fqgan.tokenizer.config import TINY
from fqgan.tokenizer.load import load_tokenizer
from fqgan.tokenizer.official import to_official_state_dict

skimage_metrics = pytest.importorskip("skimage.metrics")

SIZE = TINY.image_size  # 32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return FQTokenizer(TINY).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    """A train-tokenizer checkpoint whose EMA weights differ from its raw weights."""
    ema = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    save_checkpoint(path, {"model": model.state_dict(), "ema": ema, "model_config": TINY.to_dict(), "steps": 3},
                    "fqgan-tokenizer")
    return path


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, SIZE, SIZE, generator=g) * 2 - 1


def _hwc01(t):
    return t.permute(1, 2, 0).double().numpy() / 255.0


def _reference_metrics(model, batches):
    """PSNR, SSIM with scikit-image per image, and the per-sub-codebook index lists."""
    psnrs, ssims, indices = [], [], []
    with torch.no_grad():
        for x in batches:
            idx = model.encode(x)
            r8, x8 = to_uint8(model.decode_indices(idx)), to_uint8(x)
            for a, b in zip(r8, x8):
                psnrs.append(skimage_metrics.peak_signal_noise_ratio(_hwc01(a), _hwc01(b)))
                ssims.append(skimage_metrics.structural_similarity(
                    _hwc01(a), _hwc01(b), channel_axis=-1, gaussian_weights=True, sigma=1.5,
                    use_sample_covariance=False, data_range=1.0))
            indices.append(idx)
    return np.mean(psnrs), np.mean(ssims), torch.cat(indices)


def _read(path):
    return np.asarray(Image.open(path).convert("RGB"))


# -- evaluate_tokenizer -----------------------------------------------------------------------------
def test_evaluate_tokenizer_metrics_and_grid(tmp_path, model):
    batches = [_images(3, 1), _images(2, 2)]
    labels = torch.zeros(3, dtype=torch.long)
    model.train()  # evaluation switches to eval mode and restores the mode after
    result = evaluate_tokenizer(model, [(batches[0], labels), batches[1]], grid_path=tmp_path / "grid.png",
                                grid_images=4, rfid_note="rFID skipped: test")
    assert model.training
    model.eval()
    psnr_ref, ssim_ref, indices = _reference_metrics(model, batches)
    assert result["num_images"] == 5
    assert result["psnr"] == pytest.approx(psnr_ref, rel=1e-10)
    assert result["ssim"] == pytest.approx(ssim_ref, rel=1e-9)
    assert 0 < result["ssim"] < result["ssim_official"] <= 1
    k, size = TINY.num_codebooks, TINY.codebook_size
    assert result["codebook_names"] == list(TINY.codebook_names)
    for i in range(k):
        codes, counts = np.unique(indices[:, i].numpy(), return_counts=True)
        p = counts / counts.sum()
        assert result["usage"][i] == pytest.approx(len(codes) / size, rel=1e-6)
        assert result["perplexity"][i] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-5)
    assert result["rfid"] is None and result["rfid_note"] == "rFID skipped: test"

    # The grid: 4 originals in the first row, their reconstructions right below.
    canvas = _read(result["grid"])
    label_width = canvas.shape[1] - (2 + 4 * (SIZE + 2))
    assert label_width > 0 and canvas.shape[0] == 2 + 2 * (SIZE + 2)
    with torch.no_grad():
        recon = to_uint8(model.decode_indices(model.encode(batches[0])))
    for col in range(3):
        left = label_width + 2 + col * (SIZE + 2)
        np.testing.assert_array_equal(canvas[2:2 + SIZE, left:left + SIZE],
                                      to_uint8(batches[0][col]).permute(1, 2, 0).numpy())
        np.testing.assert_array_equal(canvas[4 + SIZE:4 + 2 * SIZE, left:left + SIZE],
                                      recon[col].permute(1, 2, 0).numpy())


class _TinyFeatures(torch.nn.Module):
    """A cheap stand-in for the FID network: 16-d features of uint8 images, the FID network's input (a
    2048 x 2048 sqrtm takes minutes on the 2-core CI machine; the Frechet distance itself is tested in
    test_eval_fid)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 16, 4, stride=4)

    def forward(self, x):
        assert x.dtype == torch.uint8
        return self.proj(x.float() / 255).mean(dim=(2, 3))  # linear: full-rank covariances from 20 images


def test_evaluate_tokenizer_rfid_and_saved_outputs(tmp_path, model):
    from fqgan.eval.fid import frechet_distance, load_stats
    from fqgan.eval.inception import inception_features

    features = _TinyFeatures().eval()
    batches = [_images(12, 3), _images(12, 4)]
    result = evaluate_tokenizer(model, batches, num_images=20, inception=features, save_dir=tmp_path / "recon",
                                fid_stats_dir=tmp_path / "stats")
    assert result["num_images"] == 20
    x = torch.cat(batches)[:20]
    with torch.no_grad():
        recon = model.decode_indices(model.encode(x))
        fx, fr = inception_features(features, x).double().numpy(), inception_features(features, recon).double().numpy()
    expected = frechet_distance(fx.mean(0), np.cov(fx, rowvar=False), fr.mean(0), np.cov(fr, rowvar=False))
    assert result["rfid"] == pytest.approx(expected, rel=1e-6)
    assert result["rfid_note"] == ""  # 20 images > 16 dimensions: full-rank covariances
    mu, sigma = load_stats(tmp_path / "stats" / "reconstructions.npz")
    np.testing.assert_allclose(mu, fr.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(fr, rowvar=False), rtol=1e-5, atol=1e-9)
    files = sorted(p.name for p in (tmp_path / "recon").iterdir())
    assert files == [f"{i:06d}.png" for i in range(20)]
    np.testing.assert_array_equal(_read(tmp_path / "recon" / "000017.png"),
                                  to_uint8(recon[17]).permute(1, 2, 0).numpy())


def test_evaluate_tokenizer_bad_input(model):
    with pytest.raises(ValueError, match="no images"):
        evaluate_tokenizer(model, [])
    with pytest.raises(TypeError, match="image tensors"):
        evaluate_tokenizer(model, [np.zeros((1, 3, SIZE, SIZE))])
    with pytest.raises(ValueError, match="32x32 images"):
        evaluate_tokenizer(model, [torch.rand(1, 3, 64, 64)])
    with pytest.raises(TypeError, match="config.num_codebooks"):
        evaluate_tokenizer(torch.nn.Linear(2, 2), [_images(1, 0)])


# -- checkpoints ------------------------------------------------------------------------------------
def test_load_train_tokenizer_checkpoint(checkpoint, model):
    saved = torch.load(checkpoint, weights_only=True)
    for weights, entry in (("auto", "ema"), ("ema", "ema"), ("model", "model")):
        loaded = load_tokenizer(checkpoint, weights=weights)
        assert not loaded.training and loaded.config == TINY
        for k, v in loaded.state_dict().items():
            assert torch.equal(v, saved[entry][k]), (weights, k)


def test_load_official_checkpoint(tmp_path, model):
    path = tmp_path / "official.pt"
    torch.save({"model": to_official_state_dict(model), "args": argparse.Namespace(vq_model="VQ-16")}, path)
    loaded = load_tokenizer(path, official_config=TINY)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = _images(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), model.encode(x), rtol=0, atol=0)


def test_load_checkpoint_errors(tmp_path, checkpoint):
    with pytest.raises(MissingFileError, match="missing.pt"):
        load_tokenizer(tmp_path / "missing.pt")
    with pytest.raises(MissingFileError, match="directory"):
        load_tokenizer(tmp_path)
    save_checkpoint(tmp_path / "gen.pt", {"model": {}}, "fqgan-generator")
    with pytest.raises(CheckpointError, match="'fqgan-generator' checkpoint, not a tokenizer"):
        load_tokenizer(tmp_path / "gen.pt")
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_tokenizer(tmp_path / "junk.pt")
    ckpt = torch.load(checkpoint, weights_only=True)
    del ckpt["ema"]
    save_checkpoint(tmp_path / "noema.pt", {k: v for k, v in ckpt.items() if k not in ("kind", "format")},
                    "fqgan-tokenizer")
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_tokenizer(tmp_path / "noema.pt", weights="ema")
    with pytest.raises(ValueError, match="weights must be"):
        load_tokenizer(checkpoint, weights="best")


# -- commands ---------------------------------------------------------------------------------------
def _parse(add, argv):
    return add(argparse.ArgumentParser()).parse_args([str(a) for a in argv])


def _write_inputs(folder):
    rng = np.random.default_rng(7)
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(folder / "wide.png")
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / "square.png")
    Image.fromarray(rng.integers(0, 256, (48, 36, 3), dtype=np.uint8)).save(folder / "tall.jpg", quality=90)
    return folder


def test_reconstruct_command_end_to_end(tmp_path, checkpoint, capsys):
    inputs = _write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    args = _parse(add_reconstruct_arguments, [inputs / "wide.png", inputs / "tall.jpg", inputs / "square.png",
                                              "--checkpoint", checkpoint, "--out", out, "--batch-size", 2,
                                              "--device", "cpu"])
    records = run_reconstruct(args)
    printed = capsys.readouterr().out
    ema_model = load_tokenizer(checkpoint)
    summary = json.loads((out / "metrics.json").read_text())
    assert [r["name"] for r in summary["images"]] == ["wide", "tall", "square"] == [r["name"] for r in records]
    for rec in summary["images"]:
        name = rec["name"]
        x = load_image(next(inputs.glob(f"{name}.*")), size=SIZE)
        indices = np.load(out / f"{name}_indices.npy")
        assert indices.dtype == np.int64 and indices.shape == (TINY.num_codebooks, 8, 8)
        with torch.no_grad():
            expected = ema_model.encode(x[None])[0]
        np.testing.assert_array_equal(indices, expected.numpy())
        recon, seen = _read(out / f"{name}_recon.png"), _read(out / f"{name}_input.png")
        assert recon.shape == seen.shape == (SIZE, SIZE, 3)
        np.testing.assert_array_equal(seen, to_uint8(x).permute(1, 2, 0).numpy())
        # PSNR of the files on disk, computed independently.
        assert rec["psnr"] == pytest.approx(skimage_metrics.peak_signal_noise_ratio(seen / 255.0, recon / 255.0),
                                            rel=1e-10)
        assert name in printed
    assert summary["mean_psnr"] == pytest.approx(np.mean([r["psnr"] for r in records]))
    assert "mean" in printed and "PSNR" in printed


def test_reconstruct_command_bad_input(tmp_path, checkpoint):
    inputs = _write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    with pytest.raises(MissingFileError, match="nope.png"):
        run_reconstruct(_parse(add_reconstruct_arguments, [inputs / "nope.png", "--checkpoint", checkpoint,
                                                           "--out", out]))
    with pytest.raises(MissingFileError, match="absent.pt"):
        run_reconstruct(_parse(add_reconstruct_arguments, [inputs / "wide.png", "--checkpoint", tmp_path / "absent.pt",
                                                           "--out", out]))
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        run_reconstruct(_parse(add_reconstruct_arguments, [inputs, "--checkpoint", checkpoint, "--out", out]))
    assert not out.exists()  # every input is read before anything is written
    (inputs / "broken.png").unlink()
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(inputs / "wide.jpg")
    with pytest.raises(ValueError, match="share the name 'wide'"):
        run_reconstruct(_parse(add_reconstruct_arguments, [inputs, "--checkpoint", checkpoint, "--out", out]))


def test_eval_tokenizer_command_end_to_end(tmp_path, checkpoint, capsys, monkeypatch):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty cache: rFID is skipped
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    data = _write_inputs(tmp_path / "data")
    out = tmp_path / "eval"
    argv = ["--checkpoint", checkpoint, "--data", data, "--out", out, "--batch-size", 2, "--num-workers", 0,
            "--device", "cpu", "--quiet", "--grid-images", 3]
    result = run_eval_tokenizer(_parse(add_eval_tokenizer_arguments, argv))
    printed = capsys.readouterr().out
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["num_images"] == result["num_images"] == 3
    assert saved["psnr"] == pytest.approx(result["psnr"]) and saved["rfid"] is None
    assert saved["rfid_note"].startswith("rFID skipped") and INCEPTION_WEIGHTS_ENV in saved["rfid_note"]
    assert "rFID skipped" in printed and "usage" in printed and "PSNR" in printed
    assert _read(out / "grid.png").shape[0] == 2 + 2 * (SIZE + 2)
    # The metrics equal evaluate_tokenizer's on the same centre-cropped images and EMA weights.
    ema_model = load_tokenizer(checkpoint)
    images = torch.stack([load_image(p, size=SIZE) for p in sorted(data.iterdir())])
    direct = evaluate_tokenizer(ema_model, [images])
    assert result["psnr"] == pytest.approx(direct["psnr"], rel=1e-12)
    assert result["usage"] == direct["usage"]

    # A weight file named on the command line is loaded into torch-fidelity's network and its 2048-d
    # features reach the Frechet distance (replaced by a recorder: scipy's 2048 x 2048 sqrtm alone takes
    # minutes on 2 cores).
    if not torch_fidelity_available():
        pytest.skip("torch-fidelity (the eval extra) is not installed")
    import fqgan.eval.tokenizer as module

    seen = []

    def record(mu1, sigma1, mu2, sigma2):
        seen.append((mu1.shape, sigma1.shape, mu2.shape, sigma2.shape, float(np.abs(mu1 - mu2).sum())))
        return 1.5

    monkeypatch.setattr(module, "frechet_distance", record)
    weights = tmp_path / "inception.pth"
    torch.save(random_inception_state_dict(), weights)
    result = run_eval_tokenizer(_parse(add_eval_tokenizer_arguments, [
        *argv, "--num-images", 2, "--inception-weights", weights, "--save-fid-stats"]))
    assert result["num_images"] == 2 and result["rfid"] == 1.5 and "rank-deficient" in result["rfid_note"]
    assert seen[0][:4] == ((2048,), (2048, 2048), (2048,), (2048, 2048)) and seen[0][4] > 0
    assert (out / "inputs.npz").is_file() and (out / "reconstructions.npz").is_file()
    with pytest.raises(MissingFileError, match="gone.pth"):
        run_eval_tokenizer(_parse(add_eval_tokenizer_arguments, [*argv, "--inception-weights", tmp_path / "gone.pth"]))
    with pytest.raises(ValueError, match="--batch-size must be positive"):
        run_eval_tokenizer(_parse(add_eval_tokenizer_arguments, [*argv, "--batch-size", 0]))
