"""fqgan.eval.inception: the FID InceptionV3's layout (key names and shapes of pytorch-fid's weight file),
loading through the real path from a file the test writes, and how the weights are found."""

import pytest
import torch

from fqgan.data.images import to_uint8
from fqgan.eval.inception import (
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_FILENAME,
    FIDInceptionV3,
    _avg_pool_3x3,
    find_inception_weights,
    inception_features,
    load_fid_inception,
    resolve_rfid_weights,
)
from fqgan.runtime.checkpoint import CheckpointError, MissingFileError

# torchvision's inception_v3 (1000 classes, with AuxLogits) has 27,161,264 parameters (its model table).
# pytorch-fid's network = that without AuxLogits (conv0 128x768 + bn, conv1 768x128x5x5 + bn, fc 768->1000)
# and with 1008 instead of 1000 classes.
AUX = (768 * 128 + 2 * 128) + (128 * 768 * 25 + 2 * 768) + (768 * 1000 + 1000)
FID_INCEPTION_PARAMS = 27_161_264 - AUX + 8 * (2048 + 1)


def _expected_convs():
    """(name, cin, cout, kh, kw) of every BasicConv2d of torchvision's Inception3, written out per block."""
    convs = [("Conv2d_1a_3x3", 3, 32, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3), ("Conv2d_2b_3x3", 32, 64, 3, 3),
             ("Conv2d_3b_1x1", 64, 80, 1, 1), ("Conv2d_4a_3x3", 80, 192, 3, 3)]
    for m, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        convs += [(f"{m}.branch1x1", cin, 64, 1, 1), (f"{m}.branch5x5_1", cin, 48, 1, 1),
                  (f"{m}.branch5x5_2", 48, 64, 5, 5), (f"{m}.branch3x3dbl_1", cin, 64, 1, 1),
                  (f"{m}.branch3x3dbl_2", 64, 96, 3, 3), (f"{m}.branch3x3dbl_3", 96, 96, 3, 3),
                  (f"{m}.branch_pool", cin, pool, 1, 1)]
    convs += [("Mixed_6a.branch3x3", 288, 384, 3, 3), ("Mixed_6a.branch3x3dbl_1", 288, 64, 1, 1),
              ("Mixed_6a.branch3x3dbl_2", 64, 96, 3, 3), ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3)]
    for m, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        convs += [(f"{m}.branch1x1", 768, 192, 1, 1), (f"{m}.branch7x7_1", 768, c7, 1, 1),
                  (f"{m}.branch7x7_2", c7, c7, 1, 7), (f"{m}.branch7x7_3", c7, 192, 7, 1),
                  (f"{m}.branch7x7dbl_1", 768, c7, 1, 1), (f"{m}.branch7x7dbl_2", c7, c7, 7, 1),
                  (f"{m}.branch7x7dbl_3", c7, c7, 1, 7), (f"{m}.branch7x7dbl_4", c7, c7, 7, 1),
                  (f"{m}.branch7x7dbl_5", c7, 192, 1, 7), (f"{m}.branch_pool", 768, 192, 1, 1)]
    convs += [("Mixed_7a.branch3x3_1", 768, 192, 1, 1), ("Mixed_7a.branch3x3_2", 192, 320, 3, 3),
              ("Mixed_7a.branch7x7x3_1", 768, 192, 1, 1), ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
              ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1), ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3)]
    for m, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        convs += [(f"{m}.branch1x1", cin, 320, 1, 1), (f"{m}.branch3x3_1", cin, 384, 1, 1),
                  (f"{m}.branch3x3_2a", 384, 384, 1, 3), (f"{m}.branch3x3_2b", 384, 384, 3, 1),
                  (f"{m}.branch3x3dbl_1", cin, 448, 1, 1), (f"{m}.branch3x3dbl_2", 448, 384, 3, 3),
                  (f"{m}.branch3x3dbl_3a", 384, 384, 1, 3), (f"{m}.branch3x3dbl_3b", 384, 384, 3, 1),
                  (f"{m}.branch_pool", cin, 192, 1, 1)]
    return convs


def _expected_state_shapes():
    shapes = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}
    for name, cin, cout, kh, kw in _expected_convs():
        shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{p}"] = (cout,)
        shapes[f"{name}.bn.num_batches_tracked"] = ()
    return shapes


@pytest.fixture(scope="module")
def random_inception():
    """The network with random weights and random BatchNorm statistics (so that loading is visible)."""
    g = torch.Generator().manual_seed(0)
    model = FIDInceptionV3()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * (0.1 if t.dim() > 1 else 0.5))
    return model.eval()


def test_state_dict_keys_and_shapes_are_pytorch_fids():
    state = FIDInceptionV3().state_dict()
    expected = _expected_state_shapes()
    assert sorted(set(state) - set(expected)) == [] and sorted(set(expected) - set(state)) == []
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert sum(p.numel() for p in FIDInceptionV3().parameters()) == FID_INCEPTION_PARAMS == 23_850_960
    for m in FIDInceptionV3().modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.eps == 1e-3  # TF's BatchNorm epsilon
        if isinstance(m, torch.nn.Conv2d):
            assert m.bias is None


def test_fid_variants_of_the_pools():
    # TF averages only in-image pixels at the border (count_include_pad=False): a constant stays constant.
    x = torch.full((1, 2, 5, 4), 3.0)
    torch.testing.assert_close(_avg_pool_3x3(x), x)
    m = FIDInceptionV3()
    assert m.Mixed_7b.pool == "avg" and m.Mixed_7c.pool == "max"


def test_load_roundtrip_through_a_weight_file(tmp_path, random_inception):
    path = tmp_path / INCEPTION_WEIGHTS_FILENAME
    torch.save(random_inception.state_dict(), path)
    loaded = load_fid_inception(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for (k, a), b in zip(random_inception.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    # A file without the BatchNorm counters (older torch) loads too.
    state = {k: v for k, v in random_inception.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "no_counters.pth")
    loaded2 = load_fid_inception(tmp_path / "no_counters.pth")
    for k, v in state.items():
        assert torch.equal(loaded2.state_dict()[k], v), k
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    f = inception_features(loaded, x)  # one forward (the state dicts are equal, so the outputs are too)
    assert f.shape == (1, 2048) and f.dtype == torch.float32 and (f >= 0).all() and f.max() > 0


class _Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))
        self.seen = None

    def forward(self, x):
        self.seen = x
        return x.flatten(1)


def test_inception_features_feed_8bit_images_in_0_1():
    # pytorch-fid reads PNGs as [0, 1] floats; the network then resizes and scales to [-1, 1] itself.
    x = torch.rand(3, 3, 5, 7) * 2.4 - 1.2
    rec = _Recorder()
    inception_features(rec, x)
    torch.testing.assert_close(rec.seen, to_uint8(x).float() / 255, rtol=0, atol=0)

def test_load_rejects_wrong_files(tmp_path, random_inception):
    state = random_inception.state_dict()
    with pytest.raises(MissingFileError, match="absent.pth"):
        load_fid_inception(tmp_path / "absent.pth")
    bad = dict(state)
    del bad["Mixed_6b.branch7x7_2.conv.weight"]
    bad["extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"1 missing keys \['Mixed_6b.branch7x7_2.conv.weight'\].*1 unexpected"):
        load_fid_inception(tmp_path / "bad.pth")
    tv = {k: v for k, v in state.items() if not k.startswith("fc.")}
    tv.update({"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000),
               "AuxLogits.fc.weight": torch.zeros(1000, 768)})
    torch.save(tv, tmp_path / "torchvision.pth")
    with pytest.raises(CheckpointError, match="torchvision's ImageNet Inception"):
        load_fid_inception(tmp_path / "torchvision.pth")
    shape = dict(state)
    shape["Conv2d_1a_3x3.bn.bias"] = torch.zeros(31)
    torch.save(shape, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"Conv2d_1a_3x3.bn.bias: file \[31\] vs model \[32\]"):
        load_fid_inception(tmp_path / "shape.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_fid_inception(tmp_path / "list.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x00junk")
    with pytest.raises(CheckpointError, match="FID Inception weights: .*junk.pth"):
        load_fid_inception(tmp_path / "junk.pth")


def test_find_weights(tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILENAME
    # Nothing configured, nothing cached: skipped, with where we looked and how to provide the file.
    found, message = resolve_rfid_weights()
    assert found is None and message.startswith("rFID skipped")
    for part in (str(cached), "--inception-weights", INCEPTION_WEIGHTS_ENV, "pytorch-fid"):
        assert part in message
    with pytest.raises(MissingFileError):
        find_inception_weights()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert resolve_rfid_weights() == (cached, "")
    mine = tmp_path / "mine.pth"
    mine.write_bytes(b"x")
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(mine))
    assert resolve_rfid_weights() == (mine, "")
    # An explicit request for a missing file fails, even with a usable file elsewhere.
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(tmp_path / "gone.pth"))
    with pytest.raises(MissingFileError, match="gone.pth"):
        resolve_rfid_weights()
    with pytest.raises(MissingFileError, match="other.pth"):
        resolve_rfid_weights(tmp_path / "other.pth")  # the argument wins over the variable
    assert resolve_rfid_weights(mine) == (mine, "")
