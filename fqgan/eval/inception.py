"""The FID InceptionV3 (pool3, 2048-d features), written in plain torch, loading pytorch-fid's weights.

This is the network of TensorFlow's FID (``inception-2015-12-05``) as ported by pytorch-fid
(``pt_inception-2015-12-05-6726825d.pth``): torchvision's Inception3 layout with 1008 classes, no
auxiliary head, and the FID variants of its blocks (average pools that ignore padding, max pool in
the branch pool of the last block). Parameter names equal those of that file, so it loads as is.
No weights are downloaded: the user provides the file (see :func:`find_inception_weights`); without
it, rFID is skipped with a message saying how to provide it (:func:`resolve_rfid_weights`).

Input handling follows pytorch-fid: images in [0, 1], bilinear resize to 299 x 299
(``align_corners=False``), then ``2 x - 1``. :func:`inception_features` takes model-side images in
[-1, 1] and quantises them to 8 bits first, so features equal those of the same images saved as PNG.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fqgan.data.images import to_uint8
from fqgan.runtime.checkpoint import CheckpointError, MissingFileError, check_state_dict, find_file, load_torch_file

INCEPTION_WEIGHTS_ENV = "FQGAN_INCEPTION_WEIGHTS"
INCEPTION_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                         + INCEPTION_WEIGHTS_FILENAME)
FEATURE_DIM = 2048


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, as TF) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: Tensor) -> Tensor:
    # TF's average pool divides by the number of in-image pixels (padding not counted).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 -> 224 + pool_features channels."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_3x3(x))], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 -> 480 + cin channels."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions -> 768 channels."""

    def __init__(self, cin: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            d = conv(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_3x3(x))], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 -> 512 + cin channels."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs -> 2048 channels.

    :param pool: ``"avg"`` (Mixed_7b) or ``"max"``: the FID network's last block (Mixed_7c) pools with
        a 3x3 max pool in its pool branch, unlike the published Inception.
    """

    def __init__(self, cin: int, pool: str = "avg") -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_pool_3x3(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(s), self.branch3x3_2b(s),
            self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
            self.branch_pool(pooled),
        ], 1)


class FIDInceptionV3(nn.Module):
    """FID InceptionV3: ``forward(x)`` = pool3 features ``[B, 2048]`` of images ``x`` in [0, 1].

    ``x``: float ``[B, 3, H, W]``, resized bilinearly to 299 x 299 (any H, W), scaled to [-1, 1].
    ``fc`` (2048 -> 1008, the TF graph's logits) is kept so that the weight file loads with all its
    keys; FID does not use it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, 1008)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # [B, 64, 147, 147]
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [B, 64, 73, 73]
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # [B, 192, 71, 71]
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [B, 192, 35, 35]
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # ... -> [B, 2048, 8, 8]
        return x.mean(dim=(2, 3))  # [B, 2048]


_HOW = (f"rFID needs {INCEPTION_WEIGHTS_FILENAME} (pytorch-fid's port of TF FID's Inception, "
        f"{INCEPTION_WEIGHTS_URL}): download it once, then pass --inception-weights FILE, set "
        f"{INCEPTION_WEIGHTS_ENV}=FILE, or put it at <torch hub dir>/checkpoints/{INCEPTION_WEIGHTS_FILENAME} "
        f"(where pytorch-fid caches it).")


def default_inception_weights() -> Path:
    """pytorch-fid's download location: ``<torch.hub.get_dir()>/checkpoints/pt_inception-2015-12-05-6726825d.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME


def find_inception_weights(path: str | Path | None = None) -> Path:
    """The FID Inception weight file, without any download: ``path`` if given (only it); else
    ``$FQGAN_INCEPTION_WEIGHTS`` if set (only it); else :func:`default_inception_weights`.

    :raises MissingFileError: the file is not there (the message lists where it looked and how
        to provide the file).
    """
    what = "FID Inception weights"
    if path is not None:
        return find_file(what, path, None, how=_HOW)
    if os.environ.get(INCEPTION_WEIGHTS_ENV):
        return find_file(what, None, INCEPTION_WEIGHTS_ENV, how=_HOW)
    return find_file(what, None, INCEPTION_WEIGHTS_ENV, [default_inception_weights()], how=_HOW)


def resolve_rfid_weights(path: str | Path | None = None) -> tuple[Path | None, str]:
    """``(file, "")`` when the weights are found; ``(None, "rFID skipped: ...")`` when nothing was
    configured (no ``path``, no ``$FQGAN_INCEPTION_WEIGHTS``) and the default location is empty.

    :raises MissingFileError: an explicit ``path`` or ``$FQGAN_INCEPTION_WEIGHTS`` names a missing
        file (an explicit request fails loudly rather than being skipped).
    """
    try:
        return find_inception_weights(path), ""
    except MissingFileError as e:
        if path is not None or os.environ.get(INCEPTION_WEIGHTS_ENV):
            raise
        return None, f"rFID skipped: {e}"


def load_fid_inception(path: str | Path, device: torch.device | str = "cpu") -> FIDInceptionV3:
    """Build :class:`FIDInceptionV3` in eval mode with the weights of ``path`` (pytorch-fid's file or
    any state dict with the same keys and shapes; ``num_batches_tracked`` entries are optional).

    :raises MissingFileError: ``path`` does not exist.
    :raises CheckpointError: (a ``ValueError``) the file is unreadable or not a state dict of this
        network (missing / unexpected keys and wrong shapes are listed; torchvision's ImageNet
        Inception is recognised and named).
    """
    p = Path(path).expanduser()
    what = "FID Inception weights"
    state = check_state_dict(load_torch_file(p, what), f"{what} {p}")
    model = FIDInceptionV3()
    expected = model.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    if any(k.startswith("AuxLogits.") for k in unexpected) or (
            "fc.weight" in state and state["fc.weight"].shape[0] == 1000):
        raise CheckpointError(f"{what}: {p} looks like torchvision's ImageNet Inception (1000 classes / AuxLogits), "
                              f"not the FID Inception: provide {INCEPTION_WEIGHTS_FILENAME}")
    if missing or unexpected:
        raise CheckpointError(f"{what}: {p} does not match the FID Inception: {len(missing)} missing keys "
                              f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}")
    bad = [f"{k}: file {list(v.shape)} vs model {list(expected[k].shape)}"
           for k, v in state.items() if v.shape != expected[k].shape]
    if bad:
        raise CheckpointError(f"{what}: {p} has wrong shapes for the FID Inception: {bad[:5]}")
    model.load_state_dict(state, strict=False)  # strict apart from the optional counters checked above
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def inception_features(model: FIDInceptionV3, images: Tensor) -> Tensor:
    """Pool3 features ``[B, 2048]`` (float32) of model-side images ``[B, 3, H, W]`` in [-1, 1].

    Images are quantised to uint8 first (:func:`fqgan.data.images.to_uint8`) and scaled to [0, 1], so the
    features are those pytorch-fid computes from the same images stored as PNG.
    """
    param = next(model.parameters())
    x = to_uint8(images).to(param.device, torch.float32) / 255.0
    return model(x.to(param.dtype)).float()
