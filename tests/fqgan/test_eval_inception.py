"""fqgan.eval.inception: torch-fidelity's FID InceptionV3 has pytorch-fid's layout (key names and shapes of both
weight files), loads through the checked path from a file the test writes (as torch-fidelity's own loader does),
resizes as TF 1.x, gives the features of the ADM evaluator (pool3, bias-free logits, mixed_6/conv), and the
weights are found without any download."""

import sys

import pytest
import torch

from fqgan.data.images import to_uint8
from fqgan.eval.inception import (
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_FILENAME,
    INCEPTION_WEIGHTS_FILENAMES,
    INSTALL_HINT,
    SPATIAL_DIM,
    find_inception_weights,
    import_torch_fidelity,
    inception_features,
    load_fid_inception,
    random_inception_state_dict,
    resolve_rfid_weights,
    torch_fidelity_available,
)
from fqgan.runtime.checkpoint import CheckpointError, MissingFileError

pytestmark = pytest.mark.skipif(not torch_fidelity_available(), reason=INSTALL_HINT)

# torchvision's inception_v3 (1000 classes, with AuxLogits) has 27,161,264 parameters (its model table).
# The FID network = that without AuxLogits (conv0 128x768 + bn, conv1 768x128x5x5 + bn, fc 768->1000)
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
def state():
    """Random weights and random BatchNorm statistics (so that loading is visible), as torch-fidelity's file:
    no BatchNorm counters."""
    return {k: v for k, v in random_inception_state_dict(0).items() if not k.endswith("num_batches_tracked")}


def _tf_network(path):
    """torch-fidelity's own FeatureExtractorInceptionV3, loading ``path`` with its own loader."""
    fe = import_torch_fidelity().feature_extractor_inceptionv3
    return fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                         feature_extractor_weights_path=str(path))


def test_state_dict_keys_and_shapes_are_pytorch_fids(state):
    # torchvision's Inception3 names with 1008 classes and no AuxLogits: pytorch-fid's file; torch-fidelity's
    # converter writes the same names (without num_batches_tracked). Either file loads.
    expected = {k: v for k, v in _expected_state_shapes().items() if not k.endswith("num_batches_tracked")}
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert sum(v.numel() for k, v in state.items() if not k.split(".")[-1].startswith("running")) == (
        FID_INCEPTION_PARAMS) == 23_850_960


def test_load_roundtrip_and_torch_fidelitys_own_loader(tmp_path, state):
    path = tmp_path / INCEPTION_WEIGHTS_FILENAME
    torch.save(state, path)
    model = load_fid_inception(path, spatial=True)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    loaded = model.net.state_dict()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    # pytorch-fid's layout (with the BatchNorm counters) loads too, with the same fingerprint (same tensors).
    full = dict(state, **{k: torch.tensor(0) for k in _expected_state_shapes() if k.endswith("num_batches_tracked")})
    torch.save(full, tmp_path / "pt_style.pth")
    assert load_fid_inception(tmp_path / "pt_style.pth").fingerprint == model.fingerprint
    # The features are torch-fidelity's, computed by its own network loading the same file by its own loader.
    x = (torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    seen = []
    hook = model.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    f = model.extract(x)
    hook.remove()
    pool, logits = _tf_network(path)(x)
    assert torch.equal(f.pool, pool) and torch.equal(f.logits, logits)
    assert f.pool.shape == (2, 2048) and f.logits.shape == (2, 1008) and f.spatial.shape == (2, SPATIAL_DIM)
    # logits without the bias (ADM's softmax graph: pool3 @ W)
    torch.testing.assert_close(f.logits, f.pool @ model.net.fc.weight.T, rtol=1e-5, atol=1e-5)
    # sFID: mixed_6/conv = Mixed_6d.branch1x1 (post-ReLU), first 7 channels, NHWC order: index (h * 17 + w) * 7 + c.
    nchw = seen[0]
    assert nchw.shape == (2, 192, 17, 17)
    for h, w, c in ((0, 0, 0), (3, 11, 6), (16, 16, 2)):
        assert f.spatial[1, (h * 17 + w) * 7 + c] == nchw[1, c, h, w]
    assert model(x[:1]).shape == (1, 2048)


def test_resize_is_tensorflow_1x():
    # TF 1.x ResizeBilinear (align_corners=False): source coordinate = dst * in / out, no half-pixel centres;
    # torch's bilinear samples at (dst + 0.5) * in / out - 0.5. For 2 -> 4 pixels [a, b]:
    # TF: a, (a + b) / 2, b, b; torch: a, 3a/4 + b/4, a/4 + 3b/4, b.
    import_torch_fidelity()
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = torch.tensor([[[[0.0, 8.0]]]])
    tf = interpolate_bilinear_2d_like_tensorflow1x(x, size=(1, 4), align_corners=False)
    assert tf.flatten().tolist() == [0.0, 4.0, 8.0, 8.0]
    torch_bilinear = torch.nn.functional.interpolate(x, size=(1, 4), mode="bilinear", align_corners=False)
    assert torch_bilinear.flatten().tolist() == [0.0, 2.0, 6.0, 8.0]


class _Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))
        self.seen = None

    def forward(self, x):
        self.seen = x
        return x.float().flatten(1)


def test_inception_features_feed_8bit_images():
    # The network takes uint8 images (as torch-fidelity's and ADM's); model-side [-1, 1] images are quantised.
    x = torch.rand(3, 3, 5, 7) * 2.4 - 1.2
    rec = _Recorder()
    inception_features(rec, x)
    assert rec.seen.dtype == torch.uint8 and torch.equal(rec.seen, to_uint8(x))


def test_extract_bad_input(tmp_path, state):
    torch.save(state, tmp_path / "w.pth")
    model = load_fid_inception(tmp_path / "w.pth")
    with pytest.raises(TypeError, match="uint8"):
        model.extract(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.extract(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))


def test_load_rejects_wrong_files(tmp_path, state):
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
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    # Nothing configured, nothing cached: skipped, with where we looked (both names) and how to provide the file.
    found, message = resolve_rfid_weights()
    assert found is None and message.startswith("rFID skipped")
    for part in (str(hub / INCEPTION_WEIGHTS_FILENAMES[0]), str(hub / INCEPTION_WEIGHTS_FILENAMES[1]),
                 "--inception-weights", INCEPTION_WEIGHTS_ENV, "torch-fidelity", "pytorch-fid"):
        assert part in message
    with pytest.raises(MissingFileError):
        find_inception_weights()
    hub.mkdir(parents=True)
    (hub / INCEPTION_WEIGHTS_FILENAMES[1]).write_bytes(b"x")  # pytorch-fid's cache
    assert resolve_rfid_weights() == (hub / INCEPTION_WEIGHTS_FILENAMES[1], "")
    (hub / INCEPTION_WEIGHTS_FILENAMES[0]).write_bytes(b"x")  # torch-fidelity's comes first
    assert resolve_rfid_weights() == (hub / INCEPTION_WEIGHTS_FILENAMES[0], "")
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
    # Without torch-fidelity: skipped when nothing was asked for, an error naming the extra when it was.
    monkeypatch.setattr("fqgan.eval.inception.torch_fidelity_available", lambda: False)
    with pytest.raises(ModuleNotFoundError, match=r"fqgan-kernels\[eval\]"):
        resolve_rfid_weights(mine)
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV)
    found, message = resolve_rfid_weights()
    assert found is None and "fqgan-kernels[eval]" in message


def test_missing_torch_fidelity_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # what an absent package looks like to import
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'fqgan-kernels\[eval\]'"):
        import_torch_fidelity()
