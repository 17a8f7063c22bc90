"""LPIPS perceptual distance (Zhang et al. 2018, v0.1 linear heads over VGG16): the ``lpips`` package's
``lpips.LPIPS(net="vgg")``, whose trunk is torchvision's ``vgg16().features``, with both of its weight
files read from local disk. LlamaGen / FQGAN ``tokenizer/models/lpips.py`` (taming-transformers' copy)
computes the same network.

Two local files:

- the VGG16 trunk: torchvision's ImageNet weights ``vgg16-397923af.pth`` (a state dict with
  ``features.{i}.weight`` / ``.bias``; ``classifier.*`` is ignored). Given by argument, else
  ``$FQGAN_VGG16_WEIGHTS``, else torch hub's cache ``<torch.hub.get_dir()>/checkpoints/vgg16-397923af.pth``
  (where torchvision puts it).
- the linear heads ``vgg.pth`` (v0.1; ``lin{0..4}.model.1.weight``, md5 d507d7349b931f0638a25a48a722f98a,
  the file LlamaGen downloads). Given by argument, else ``$FQGAN_LPIPS_WEIGHTS``, else the copy inside
  the installed ``lpips`` wheel (``weights/v0.1/vgg.pth``).

What is ours rather than the package's: the network is built with ``pretrained=False, pnet_rand=True``
(nothing downloaded: torchvision builds ``vgg16`` without weights, lpips reads no file), and both files
are then loaded by :meth:`LPIPS.load_vgg16` / :meth:`LPIPS.load_heads`, which check every key and shape.
lpips' own heads loader is ``load_state_dict(strict=False)``, which keeps random heads, silently, from a
file that lacks them. lpips is imported through :func:`fqgan.runtime.vision.import_torchvision` (it
imports torchvision).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn

from fqgan.runtime.checkpoint import CheckpointError, check_state_dict, find_file, load_torch_file
from fqgan.runtime.vision import import_torchvision

__all__ = ["LPIPS", "LPIPS_ENV", "VGG16_ENV", "VGG16_FILE", "find_lpips_heads", "find_vgg16"]

VGG16_ENV = "FQGAN_VGG16_WEIGHTS"
LPIPS_ENV = "FQGAN_LPIPS_WEIGHTS"
VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


def find_vgg16(path: str | os.PathLike | None = None) -> Path:
    """Where the VGG16 trunk weights are (see the module docstring for the search order)."""
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
                     how=f"Install the lpips package (pip install 'fqgan-kernels[model]'), or pass the path of its "
                         f"weights/v0.1/vgg.pth (lpips_weights=...) or set {LPIPS_ENV}.")


def _import_lpips() -> ModuleType:
    import_torchvision()  # lpips imports torchvision's models at import time
    try:
        import lpips
    except ModuleNotFoundError as e:
        if e.name != "lpips":
            raise
        raise ModuleNotFoundError("LPIPS needs the lpips package: pip install 'fqgan-kernels[model]' "
                                  "(or pip install --no-deps lpips)", name="lpips") from e
    return lpips


def _build_lpips_vgg(lpips: ModuleType) -> nn.Module:
    """``lpips.LPIPS(net="vgg")`` with random weights, heads ``Sequential(Dropout, Conv2d)`` as in ``vgg.pth``."""
    # On the meta device: torchvision's vgg16() would allocate and initialise its 124M-parameter
    # classifier (about 1 s and 0.5 GB), which lpips keeps no reference to.
    with torch.device("meta"), warnings.catch_warnings():
        # lpips passes torchvision's deprecated pretrained=False (the same as weights=None).
        warnings.filterwarnings("ignore", message=r"The parameter 'pretrained' is deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"Arguments other than a weight enum", category=UserWarning)
        metric = lpips.LPIPS(net="vgg", version="0.1", pretrained=False, pnet_rand=True, use_dropout=True,
                             verbose=False)
    metric.to_empty(device="cpu")
    metric.scaling_layer = lpips.ScalingLayer()  # to_empty left its constant buffers uninitialised
    for module in metric.modules():
        if isinstance(module, nn.Conv2d):
            module.reset_parameters()
    return metric.train()  # lpips builds in eval mode; an nn.Module starts in training mode


class LPIPS(nn.Module):
    """``LPIPS(x, y) = sum_l mean_hw(w_l . (n(f_l(x)) - n(f_l(y)))^2)``: ``[B, 3, H, W]`` x2 in [-1, 1] ->
    ``[B, 1, 1, 1]``, f_l the VGG16 taps relu1_2 ... relu5_3 of the scaled input ``(x - shift) / scale``,
    n the unit channel normalisation (``x / (||x|| + 1e-10)``), w_l the 1x1 linear heads. Equals
    ``lpips.LPIPS(net="vgg", version="0.1")(x, y)`` (it is that module, :attr:`metric`). All parameters
    frozen; gradients reach the inputs.

    :param use_dropout: keep the v0.1 heads' ``nn.Dropout(0.5)`` before each linear head, as the
        official loss does: it is live whenever the module is in training mode (the official training
        puts its loss module, LPIPS included, in train mode). ``False`` replaces it with ``nn.Identity``.

    Build with :meth:`from_files` for the real weights; ``LPIPS()`` alone has random weights.
    """

    def __init__(self, use_dropout: bool = True) -> None:
        super().__init__()
        self.metric = _build_lpips_vgg(_import_lpips())
        if not use_dropout:
            for lin in self.metric.lins:
                lin.model[0] = nn.Identity()  # keeps the heads' index 1, the key of vgg.pth
        self.requires_grad_(False)

    @classmethod
    def from_files(cls, vgg16_weights: str | os.PathLike | None = None,
                   lpips_weights: str | os.PathLike | None = None, use_dropout: bool = True) -> LPIPS:
        """LPIPS with the VGG16 trunk and the v0.1 heads read from local files (search order in the
        module docstring); a missing file raises :class:`~fqgan.runtime.checkpoint.MissingFileError`
        saying where it looked and how to provide it."""
        vgg_path, heads_path = find_vgg16(vgg16_weights), find_lpips_heads(lpips_weights)
        model = cls(use_dropout=use_dropout)
        model.load_vgg16(load_torch_file(vgg_path, "VGG16 weights"), str(vgg_path))
        model.load_heads(load_torch_file(heads_path, "LPIPS heads"), str(heads_path))
        return model

    @torch.no_grad()
    def load_vgg16(self, state: dict[str, Tensor], source: str = "state dict") -> None:
        """Load a torchvision VGG16 state dict (``features.*`` used, ``classifier.*`` ignored) or a
        features-only one (``{i}.weight``); a missing or misshapen conv raises :class:`CheckpointError`."""
        state = check_state_dict(state, f"VGG16 weights ({source})")
        feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        if not feats:
            feats = dict(state)
        # lpips splits torchvision's features into slice1..slice5 and keeps its indices: slice2.5.weight
        # is features.5.weight.
        own = {name.split(".", 1)[1]: p for name, p in self.metric.net.named_parameters()}
        missing = sorted(set(own) - set(feats), key=lambda k: int(k.split(".")[0]))
        if missing:
            raise CheckpointError(f"VGG16 weights ({source}) lack {len(missing)} of the {len(own)} feature tensors, "
                                  f"e.g. {['features.' + k for k in missing[:4]]}; expected torchvision's vgg16 "
                                  "state dict (features.0.weight ...)")
        wrong = [f"features.{k}: {tuple(feats[k].shape)} != {tuple(p.shape)}" for k, p in own.items()
                 if feats[k].shape != p.shape]
        if wrong:
            raise CheckpointError(f"VGG16 weights ({source}) have wrong shapes: {wrong[:4]}")
        for k, p in own.items():
            p.copy_(feats[k])

    @torch.no_grad()
    def load_heads(self, state: dict[str, Tensor], source: str = "state dict") -> None:
        """Load ``lin{i}.model.1.weight`` (the lpips v0.1 ``vgg.pth`` layout)."""
        state = check_state_dict(state, f"LPIPS heads ({source})")
        for i, (lin, ch) in enumerate(zip(self.metric.lins, self.metric.chns)):
            key = f"lin{i}.model.1.weight"
            if key not in state:
                raise CheckpointError(f"LPIPS heads ({source}) lack {key}; found {sorted(state)[:6]}")
            if tuple(state[key].shape) != (1, ch, 1, 1):
                raise CheckpointError(f"LPIPS heads ({source}): {key} has shape {tuple(state[key].shape)}, "
                                      f"expected {(1, ch, 1, 1)}")
            lin.model[1].weight.copy_(state[key])

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return self.metric(input, target)
