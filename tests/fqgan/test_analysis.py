"""What each sub-codebook learned (fqgan/eval/analysis.py, ``fqgan analyze``): bags of codes, mutual
information, linear probes, single-sub-codebook decodings, the files and metrics of a whole analysis, and
the command as a user meets it."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fqgan.cli import main
from fqgan.eval.analysis import (
    analyze_tokenizer,
    class_information_sentence,
    code_histograms,
    code_mutual_information,
    linear_probe_accuracy,
    load_analysis_data,
    single_codebook_decodes,
)
from fqgan.runtime.checkpoint import save_checkpoint
from fqgan.tokenizer import FQTokenizer
from fqgan.tokenizer.load import CHECKPOINT_KIND

pytestmark = pytest.mark.usefixtures("one_thread")


def test_code_histograms_are_bags_of_codes():
    idx = torch.tensor([[[[0, 1], [1, 3]], [[2, 2], [2, 2]]]])  # [1, k=2, 2, 2]
    h = code_histograms(idx, 4)
    assert h.shape == (1, 2, 4)
    torch.testing.assert_close(h[0, 0], torch.tensor([0.25, 0.5, 0.0, 0.25]))
    torch.testing.assert_close(h[0, 1], torch.tensor([0.0, 0.0, 1.0, 0.0]))


def test_mutual_information_in_bits_with_its_shuffled_baseline():
    labels = torch.arange(4).repeat(50)  # 4 balanced classes
    # Codes that name the class: I = H(class) = 2 bits; its shuffled estimate is far lower.
    tied = labels.view(-1, 1, 1).expand(-1, 2, 2).clone()
    mi, shuffled = code_mutual_information(tied, labels)
    assert mi == pytest.approx(2.0, abs=1e-9) and shuffled < 0.2
    # Codes independent of the class: near 0 both ways.
    noise = torch.randint(0, 8, (200, 2, 2), generator=torch.Generator().manual_seed(0))
    mi, shuffled = code_mutual_information(noise, labels)
    assert 0 <= mi < 0.2 and 0 <= shuffled < 0.2


def test_linear_probe_separates_separable_features_and_handles_one_class():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    x = np.eye(3)[y] * 5 + rng.normal(0, 0.1, (60, 3))
    acc, train_acc = linear_probe_accuracy(x[::2], y[::2], x[1::2], y[1::2])
    assert acc == 1.0 and train_acc == 1.0
    assert linear_probe_accuracy(x[:5], np.zeros(5, int), x[5:9], np.zeros(4, int)) == (1.0, 1.0)


class _Identity(nn.Module):
    """decode() returns its input: shows what single_codebook_decodes hands the decoder."""

    class config:  # an attribute bag, as FQTokenizer.config
        num_codebooks, codebook_dim = 2, 3

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))

    def decode(self, q):
        return q


def test_single_codebook_decodes_replace_the_others_by_their_mean_or_zeros():
    q = torch.randn(5, 6, 2, 2)
    out = single_codebook_decodes(_Identity(), q, fill="mean")  # [k, N, C, h, w]
    assert out.shape == (2, 5, 6, 2, 2)
    mean = q.mean(0, keepdim=True).clamp(-1, 1)
    torch.testing.assert_close(out[0][:, :3], q[:, :3].clamp(-1, 1))  # sub-codebook 0 kept
    torch.testing.assert_close(out[0][:, 3:], mean[:, 3:].expand(5, -1, -1, -1))  # sub-codebook 1 replaced
    torch.testing.assert_close(out[1][:, :3], mean[:, :3].expand(5, -1, -1, -1))
    zero = single_codebook_decodes(_Identity(), q, fill="zero")
    assert zero[0][:, 3:].abs().max() == 0 and zero[1][:, :3].abs().max() == 0
    with pytest.raises(ValueError, match="fill"):
        single_codebook_decodes(_Identity(), q, fill="noise")


def test_class_information_sentence_says_who_wins_by_how_much_or_that_it_is_noise():
    clear = {"vis": {"accuracy": 0.30, "mutual_information": 0.5, "mutual_information_shuffled": 0.1},
             "sem": {"accuracy": 0.70, "mutual_information": 0.9, "mutual_information_shuffled": 0.1}}
    s = class_information_sentence(clear, 1 / 19, 380)
    assert s.startswith("The 'sem' sub-codebook carries more class information than 'vis'") and "+40.0 points" in s
    close = {"vis": {**clear["vis"], "accuracy": 0.50}, "sem": {**clear["sem"], "accuracy": 0.52}}
    assert class_information_sentence(close, 1 / 19, 380).startswith("Neither sub-codebook")
    flipped = {"vis": {**clear["vis"], "mutual_information": 2.0}, "sem": clear["sem"]}
    assert "which ranks them the other way" in class_information_sentence(flipped, 1 / 19, 380)


@pytest.fixture
def tokenizer(tiny_config):
    torch.manual_seed(0)
    return FQTokenizer(tiny_config).eval()


def test_analyze_tokenizer_writes_the_figures_and_metrics(tmp_path, tokenizer):
    train, heldout, classes = load_analysis_data("sample", 32, num_images=38, seed=0)
    assert train[0].shape == (38, 3, 32, 32) and set(train[1].tolist()) == set(range(19)) and len(classes) == 19
    m = analyze_tokenizer(tokenizer, train, heldout, tmp_path / "an", class_names=classes, method="pca")
    for name in ("subcodebook_reconstructions.png", "embedding.png", "usage.png", "metrics.json"):
        assert (tmp_path / "an" / name).is_file(), name
    assert json.loads((tmp_path / "an" / "metrics.json").read_text())["probe"] == m["probe"]
    assert set(m["probe"]) == {"vis", "sem"} and m["chance"] == pytest.approx(1 / 19)
    for p in m["probe"].values():
        assert 0 <= p["accuracy"] <= 1 and 0 <= p["train_accuracy"] <= 1
        assert 0 <= p["mutual_information"] <= math.log2(19) and p["mutual_information_shuffled"] >= 0
    assert set(m["reconstruction"]) == {"full_psnr", "vis_only_psnr", "sem_only_psnr"}
    assert all(0 <= u["usage"] <= 1 for u in m["usage"].values())
    assert "sub-codebook" in m["summary"] and m["fill"] == "mean"
    # The grid: input, all codes, one row per sub-codebook; 8 held-out crops of 8 different classes.
    with Image.open(tmp_path / "an" / "subcodebook_reconstructions.png") as im:
        assert im.size[1] == 4 * (32 * 4 + 2) + 2
    with pytest.raises(ValueError, match="method"):
        analyze_tokenizer(tokenizer, train, heldout, tmp_path / "x", method="umap")


def test_analysis_data_of_an_image_folder_holds_out_every_fourth_image(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 36), (60 * i, 100 if c == "a" else 10, 0)).save(tmp_path / "imgs" / c / f"{i}.png")
    (x_tr, _), (x_ho, y_ho), classes = load_analysis_data(str(tmp_path / "imgs"), 32, num_images=8)
    assert classes == ["a", "b"] and x_tr.shape == (6, 3, 32, 32) and x_ho.shape == (2, 3, 32, 32)
    assert y_ho.tolist() == [0, 1]
    # A folder smaller than --num-images (default 380): every image is used, not the first one only.
    (x_tr, _), (x_ho, _), _ = load_analysis_data(str(tmp_path / "imgs"), 32)
    assert x_tr.shape[0] + x_ho.shape[0] == 8
    # Fewer than the folder holds: spread over it (first, middle, last: both classes); with under 4 the last is
    # held out and not trained on.
    (_, y_tr), (_, y_ho), _ = load_analysis_data(str(tmp_path / "imgs"), 32, num_images=3)
    assert y_tr.tolist() == [0, 1] and y_ho.tolist() == [1]


def test_analyze_command(tmp_path, tokenizer, capsys):
    ckpt = tmp_path / "tok.pt"
    save_checkpoint(ckpt, {"model_config": tokenizer.config.to_dict(), "model": tokenizer.state_dict()},
                    CHECKPOINT_KIND)
    out = tmp_path / "analysis"
    assert main(["analyze", "--tokenizer", str(ckpt), "--data", "sample", "--out", str(out), "--num-images", "19",
                 "--method", "pca", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "vis: linear probe" in text and "sem: linear probe" in text and "sub-codebook" in text
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_train_images"] == m["num_heldout_images"] == 19 and m["method"] == "pca"
    # A missing checkpoint: the command says so, without a traceback.
    with pytest.raises(SystemExit) as exc:
        main(["analyze", "--tokenizer", str(tmp_path / "nope.pt"), "--out", str(out)])
    assert exc.value.code == 2 and "nope.pt" in capsys.readouterr().err
