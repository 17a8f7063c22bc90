"""LPIPS perceptual distance over VGG16 features (Zhang et al. 2018, v0.1 linear heads), as
LlamaGen / FQGAN ``tokenizer/models/lpips.py``, without torchvision or the ``lpips`` package.

Two local files:

- the VGG16 backbone: torchvision's ImageNet weights ``vgg16-397923af.pth`` (a state dict with
  ``features.{i}.weight`` / ``.bias``; ``classifier.*`` is ignored). Given by argument, else
  ``$FQGAN_VGG16_WEIGHTS``, else torch hub's cache ``<torch.hub.get_dir()>/checkpoints/vgg16-397923af.pth``
  (where torchvision puts it).
- the linear heads ``vgg.pth`` (v0.1; ``lin{0..4}.model.1.weight``, md5 d507d7349b931f0638a25a48a722f98a,
  the file LlamaGen downloads). Given by argument, else ``$FQGAN_LPIPS_WEIGHTS``, else the copy inside an
  installed ``lpips`` wheel (``pip install --no-deps lpips``; found without importing the package,
  which imports torchvision).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from fqgan.runtime.checkpoint import CheckpointError, check_state_dict, find_file, load_torch_file

__all__ = ["LPIPS", "LPIPS_ENV", "VGG16_ENV", "VGG16_FILE", "VGG16Features", "find_lpips_heads", "find_vgg16"]

VGG16_ENV = "FQGAN_VGG16_WEIGHTS"
LPIPS_ENV = "FQGAN_LPIPS_WEIGHTS"
VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"

# torchvision vgg16().features: conv channels, "M" = max pool. Indices of the layers follow from it.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_CHANNELS = (64, 128, 256, 512, 512)


def find_vgg16(path: str | os.PathLike | None = None) -> Path:
    """Where the VGG16 backbone weights are (see the module docstring for the search order)."""
    hub = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    return find_file("VGG16 weights for LPIPS", path, VGG16_ENV, [hub],
                     how=f"Download torchvision's {VGG16_FILE} ({VGG16_URL}) where there is network access, then "
                         f"pass its path (vgg16_weights=...) or set {VGG16_ENV}; or set perceptual_weight=0 "
                         "to train without the perceptual loss.")


def _lpips_package_heads() -> list[Path]:
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(loc) / "weights" / "v0.1" / "vgg.pth" for loc in spec.submodule_search_locations]


def find_lpips_heads(path: str | os.PathLike | None = None) -> Path:
    """Where the LPIPS v0.1 linear heads (``vgg.pth``) are (see the module docstring)."""
    return find_file("LPIPS linear heads (vgg.pth v0.1)", path, LPIPS_ENV, _lpips_package_heads(),
                     how=f"Install the lpips wheel without its dependencies (pip install --no-deps lpips), or pass "
                         f"the path of its weights/v0.1/vgg.pth (lpips_weights=...) or set {LPIPS_ENV}.")


class VGG16Features(nn.Module):
    """torchvision's ``vgg16().features[:30]`` (13 3x3 convs + ReLU, 4 max pools), same indices and
    parameter names (``features.{i}.weight``). ``forward`` returns the five LPIPS taps relu1_2,
    relu2_2, relu3_3, relu4_3, relu5_3: ``[B, 64, H, W]`` ... ``[B, 512, H/16, W/16]``."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                in_ch = v
        self.features = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                taps.append(x)
        return taps

    def load_torchvision(self, state: dict[str, Tensor], source: str = "state dict") -> None:
        """Load a torchvision VGG16 state dict (``features.*`` used, ``classifier.*`` ignored) or a
        features-only one (``{i}.weight``); a missing or misshapen conv raises :class:`CheckpointError`."""
        state = check_state_dict(state, f"VGG16 weights ({source})")
        feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        if not feats:
            feats = dict(state)
        own = self.features.state_dict()
        missing = sorted(set(own) - set(feats), key=lambda k: int(k.split(".")[0]))
        if missing:
            raise CheckpointError(f"VGG16 weights ({source}) lack {len(missing)} of the {len(own)} feature tensors, "
                                  f"e.g. {['features.' + k for k in missing[:4]]}; expected torchvision's vgg16 "
                                  "state dict (features.0.weight ...)")
        wrong = [f"features.{k}: {tuple(feats[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
                 if feats[k].shape != v.shape]
        if wrong:
            raise CheckpointError(f"VGG16 weights ({source}) have wrong shapes: {wrong[:4]}")
        self.features.load_state_dict({k: feats[k] for k in own})


def _normalize_channels(x: Tensor, eps: float = 1e-10) -> Tensor:
    return x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """``LPIPS(x, y) = sum_l mean_hw(w_l . (n(f_l(x)) - n(f_l(y)))^2)``: ``[B, 3, H, W]`` x2 in [-1, 1] ->
    ``[B, 1, 1, 1]``, f_l the VGG16 taps of the scaled input ``(x - shift) / scale``, n the unit
    channel normalisation (``x / (||x|| + 1e-10)``), w_l the 1x1 linear heads. All parameters frozen;
    gradients reach the inputs.

    :param use_dropout: keep the v0.1 heads' ``nn.Dropout(0.5)`` before each linear head, as the
        official loss does: it is live whenever the module is in training mode (the official training
        puts its loss module, LPIPS included, in train mode).

    Build with :meth:`from_files` for the real weights; ``LPIPS()`` alone has random weights.
    """

    def __init__(self, use_dropout: bool = True) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Features()
        for i, ch in enumerate(_CHANNELS):
            head = nn.Sequential(nn.Dropout() if use_dropout else nn.Identity(),
                                 nn.Conv2d(ch, 1, kernel_size=1, stride=1, padding=0, bias=False))
            self.add_module(f"lin{i}", nn.Module())
            getattr(self, f"lin{i}").model = head
        self.requires_grad_(False)

    @classmethod
    def from_files(cls, vgg16_weights: str | os.PathLike | None = None,
                   lpips_weights: str | os.PathLike | None = None, use_dropout: bool = True) -> LPIPS:
        """LPIPS with the VGG16 backbone and the v0.1 heads read from local files (search order in the
        module docstring); a missing file raises :class:`~fqgan.runtime.checkpoint.MissingFileError`
        saying where it looked and how to provide it."""
        vgg_path, heads_path = find_vgg16(vgg16_weights), find_lpips_heads(lpips_weights)
        model = cls(use_dropout=use_dropout)
        model.net.load_torchvision(load_torch_file(vgg_path, "VGG16 weights"), str(vgg_path))
        model.load_heads(load_torch_file(heads_path, "LPIPS heads"), str(heads_path))
        return model

    def load_heads(self, state: dict[str, Tensor], source: str = "state dict") -> None:
        """Load ``lin{i}.model.1.weight`` (the lpips v0.1 ``vgg.pth`` layout)."""
        state = check_state_dict(state, f"LPIPS heads ({source})")
        for i, ch in enumerate(_CHANNELS):
            key = f"lin{i}.model.1.weight"
            if key not in state:
                raise CheckpointError(f"LPIPS heads ({source}) lack {key}; found {sorted(state)[:6]}")
            if tuple(state[key].shape) != (1, ch, 1, 1):
                raise CheckpointError(f"LPIPS heads ({source}): {key} has shape {tuple(state[key].shape)}, "
                                      f"expected {(1, ch, 1, 1)}")
            getattr(self, f"lin{i}").model[1].weight.data.copy_(state[key])

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        b = input.shape[0]
        # One VGG pass over both batches (no batch statistics in VGG, so the same as two passes).
        feats = self.net((torch.cat([input, target]) - self.shift) / self.scale)
        total = None
        for i, f in enumerate(feats):
            f0, f1 = f[:b], f[b:]
            diff = (_normalize_channels(f0) - _normalize_channels(f1)) ** 2
            term = getattr(self, f"lin{i}").model(diff).mean(dim=(2, 3), keepdim=True)
            total = term if total is None else total + term
        return total
