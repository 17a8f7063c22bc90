"""The FID Inception network: torch-fidelity's ``FeatureExtractorInceptionV3``, from a local weight file.

The network is TensorFlow's FID graph (``inception-2015-12-05``, the one OpenAI's ADM evaluator runs),
ported to torch by torch-fidelity. It is used as torch-fidelity ships it, for gFID (``fqgan
eval-generator``) and rFID (``fqgan eval-tokenizer``) alike, because its input path is TF 1.x's: uint8
images, resized to 299 x 299 by ``interpolate_bilinear_2d_like_tensorflow1x`` (TF's ``ResizeBilinear``
without half-pixel centres) and scaled by ``(x - 128) / 128``, as the graph does. The hand-written
network that was here resized with torch's bilinear filter (half-pixel centres) from ``x / 255`` and
scaled by ``2 x - 1``; what that changed is measured in ``docs/evaluation.md``.

This module adds what torch-fidelity leaves to its caller:

* the weight file is never downloaded: :func:`find_inception_weights` looks for torch-fidelity's
  ``weights-inception-2015-12-05-6726825d.pth`` or pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
  (same keys, both converted from the same TF graph) and says where it looked;
* the file is read with ``weights_only=True`` and checked key by key (torch-fidelity itself unpickles the
  path it is given with ``weights_only=False``, so it is handed an empty placeholder instead and the
  checked tensors are loaded afterwards);
* :class:`FIDInception` returns the three features the ADM evaluator uses in one forward: pool3 (FID,
  precision / recall), the logits without bias (Inception Score) and, on request, ``mixed_6/conv``'s first
  7 channels (sFID), read by a forward hook since torch-fidelity does not expose that layer.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from fqgan.data.images import to_uint8
from fqgan.runtime.checkpoint import (
    CheckpointError,
    MissingFileError,
    check_state_dict,
    find_file,
    load_torch_file,
    state_fingerprint,
)
from fqgan.runtime.errors import UsageError, UsageTypeError
from fqgan.runtime.vision import import_torchvision

__all__ = [
    "FEATURE_DIM", "INCEPTION_WEIGHTS_ENV", "INCEPTION_WEIGHTS_FILENAME", "INCEPTION_WEIGHTS_FILENAMES",
    "LOGITS_DIM", "SPATIAL_DIM", "FIDInception", "InceptionFeatures", "default_inception_weights",
    "find_inception_weights", "import_torch_fidelity", "inception_features", "load_fid_inception",
    "random_inception_state_dict", "resolve_rfid_weights", "torch_fidelity_available",
]

INCEPTION_WEIGHTS_ENV = "FQGAN_INCEPTION_WEIGHTS"
INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's
PYTORCH_FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_FILENAMES = (INCEPTION_WEIGHTS_FILENAME, PYTORCH_FID_WEIGHTS_FILENAME)
INCEPTION_WEIGHTS_URLS = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILENAME,
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + PYTORCH_FID_WEIGHTS_FILENAME,
)
FEATURE_DIM = 2048  # pool_3
LOGITS_DIM = 1008  # softmax/logits of the TF graph (1000 ImageNet classes + 8 unused)
SPATIAL_DIM = 17 * 17 * 7  # ADM's sFID: mixed_6/conv [17, 17, 192] NHWC, first 7 channels, flattened
INSTALL_HINT = ("the FID Inception is torch-fidelity's: pip install 'fqgan-kernels[eval]' (or run "
                "scripts/setup_env.sh, which installs it beside the pinned torch)")
_SKELETON_KEY = "__fqgan_skeleton__"


class InceptionFeatures(NamedTuple):
    """What the ADM evaluator reads from the Inception graph, for a batch of B images."""

    pool: Tensor  # [B, 2048] float32: pool_3 (FID, precision / recall)
    logits: Tensor  # [B, 1008] float32: pool_3 @ W of softmax/logits, no bias (Inception Score)
    spatial: Tensor | None  # [B, 2023] float32: mixed_6/conv[..., :7] NHWC-flattened (sFID), when asked


def torch_fidelity_available() -> bool:
    """Whether torch-fidelity is installed (without importing it)."""
    return importlib.util.find_spec("torch_fidelity") is not None


def import_torch_fidelity() -> Any:
    """``import torch_fidelity``, after torchvision has gone through :func:`fqgan.runtime.vision.import_torchvision`
    (torch-fidelity imports torchvision itself, which beside the pinned CPU torch only that door can).

    :raises ModuleNotFoundError: torch-fidelity or torchvision is not installed (the message says how to install).
    """
    import_torchvision()
    try:
        import torch_fidelity
        import torch_fidelity.feature_extractor_inceptionv3
    except ModuleNotFoundError as e:
        if e.name != "torch_fidelity":
            raise
        raise ModuleNotFoundError(INSTALL_HINT, name="torch_fidelity") from e
    return torch_fidelity


@functools.cache
def _network_class() -> type:
    """torch-fidelity's ``FeatureExtractorInceptionV3``, whose constructor may be handed a placeholder state dict
    (its ``__init__`` loads whatever ``torch.load`` returns for the weights path; we load checked tensors later)."""
    base = import_torch_fidelity().feature_extractor_inceptionv3.FeatureExtractorInceptionV3

    class TorchFidelityInceptionV3(base):
        def load_state_dict(self, state_dict, *args, **kwargs):
            if _SKELETON_KEY in state_dict:  # called by base.__init__ with our placeholder: keep the layout only
                return None
            return super().load_state_dict(state_dict, *args, **kwargs)

    return TorchFidelityInceptionV3


def _skeleton() -> nn.Module:
    """The network with torch's default initialisation, in eval mode, built without any weight file."""
    buf = io.BytesIO()
    torch.save({_SKELETON_KEY: torch.zeros(())}, buf)
    buf.seek(0)
    # "2048" then "logits_unbiased": one forward gives both, in this order.
    return _network_class()("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=buf)


@contextlib.contextmanager
def _full_fp32(device: torch.device) -> Iterator[None]:
    """float32 convolutions and matmuls on CUDA even where TF32 is on (torch's default for cuDNN convolutions,
    and what training enables): a metric should not depend on the GPU generation. Restored afterwards."""
    if device.type != "cuda":
        yield
        return
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


class FIDInception(nn.Module):
    """torch-fidelity's FID InceptionV3 with the features of the ADM evaluator.

    ``forward(images)`` is pool3 ``[B, 2048]`` (the FID network's contract in :mod:`fqgan.eval.tokenizer`);
    :meth:`extract` gives every feature of :class:`InceptionFeatures`. ``images`` are uint8 ``[B, 3, H, W]``
    of any size (resized to 299 x 299 inside, TF 1.x's way). Build it with :func:`load_fid_inception`.

    :param net: a ``FeatureExtractorInceptionV3`` asked for ``["2048", "logits_unbiased"]``, weights loaded.
    :param spatial: also keep ``mixed_6/conv`` (torch-fidelity's ``Mixed_6d.branch1x1`` output, post-ReLU:
        ``mixed_6`` is ``Mixed_6d`` in torch-fidelity's TF-to-torch name map) for sFID.
    :param fingerprint: digest of the weights (:func:`fqgan.runtime.checkpoint.state_fingerprint`), which keys
        cached reference statistics.
    """

    def __init__(self, net: nn.Module, spatial: bool = False, fingerprint: str = "") -> None:
        super().__init__()
        self.net = net
        self.spatial = bool(spatial)
        self.fingerprint = fingerprint
        self._mixed_6: Tensor | None = None
        if self.spatial:
            net.Mixed_6d.branch1x1.register_forward_hook(self._keep_mixed_6)

    def _keep_mixed_6(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        # ADM: spatial[..., :7] of the NHWC tensor mixed_6/conv:0, reshaped to [B, 17 * 17 * 7].
        self._mixed_6 = output[:, :7].permute(0, 2, 3, 1).reshape(output.shape[0], -1).float()

    @torch.no_grad()
    def extract(self, images: Tensor) -> InceptionFeatures:
        """pool3, logits and (if built with ``spatial``) sFID features of uint8 images ``[B, 3, H, W]``."""
        if not isinstance(images, Tensor) or images.dtype != torch.uint8:
            raise UsageTypeError(f"images must be a uint8 tensor [B, 3, H, W], got "
                            f"{images.dtype if isinstance(images, Tensor) else type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] < 1:
            raise UsageError(f"images must have shape [B, 3, H, W] with B >= 1, got {list(images.shape)}")
        device = next(self.net.parameters()).device
        self._mixed_6 = None
        with _full_fp32(device):
            pool, logits = self.net(images.to(device))
        spatial = self._mixed_6 if self.spatial else None
        self._mixed_6 = None
        return InceptionFeatures(pool.float(), logits.float(), spatial)

    def forward(self, images: Tensor) -> Tensor:
        return self.extract(images).pool


# -- the weight file ----------------------------------------------------------------------------------
_HOW = (f"The FID Inception weights are {INCEPTION_WEIGHTS_FILENAME} (torch-fidelity, {INCEPTION_WEIGHTS_URLS[0]}) "
        f"or {PYTORCH_FID_WEIGHTS_FILENAME} (pytorch-fid, {INCEPTION_WEIGHTS_URLS[1]}), one port of TF FID's "
        f"Inception: download either once, then pass --inception-weights FILE, set {INCEPTION_WEIGHTS_ENV}=FILE, "
        "or put it in <torch hub dir>/checkpoints/ (where torch-fidelity and pytorch-fid cache it).")


def default_inception_weights() -> list[Path]:
    """Where torch-fidelity and pytorch-fid cache their files: ``<torch.hub.get_dir()>/checkpoints/<name>``."""
    return [Path(torch.hub.get_dir()) / "checkpoints" / name for name in INCEPTION_WEIGHTS_FILENAMES]


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The FID Inception weight file, without any download: ``path`` if given (only it); else
    ``$FQGAN_INCEPTION_WEIGHTS`` if set (only it); else the first of :func:`default_inception_weights` there.

    :raises MissingFileError: the file is not there (the message lists where it looked and how to provide it).
    """
    what = "FID Inception weights"
    if path is not None:
        return find_file(what, path, None, how=_HOW)
    if os.environ.get(INCEPTION_WEIGHTS_ENV):
        return find_file(what, None, INCEPTION_WEIGHTS_ENV, how=_HOW)
    return find_file(what, None, INCEPTION_WEIGHTS_ENV, default_inception_weights(), how=_HOW)


def resolve_rfid_weights(path: str | os.PathLike | None = None) -> tuple[Path | None, str]:
    """``(file, "")`` when rFID can run; ``(None, "rFID skipped: ...")`` when nothing was configured (no ``path``,
    no ``$FQGAN_INCEPTION_WEIGHTS``) and the default locations are empty or torch-fidelity is not installed.

    :raises MissingFileError: an explicit ``path`` or ``$FQGAN_INCEPTION_WEIGHTS`` names a missing file.
    :raises ModuleNotFoundError: the weights were asked for explicitly but torch-fidelity is not installed.
    """
    explicit = path is not None or bool(os.environ.get(INCEPTION_WEIGHTS_ENV))
    try:
        found = find_inception_weights(path)
    except MissingFileError as e:
        if explicit:
            raise
        return None, f"rFID skipped: {e}"
    if not torch_fidelity_available():
        if explicit:
            raise ModuleNotFoundError(INSTALL_HINT, name="torch_fidelity")
        return None, f"rFID skipped: {INSTALL_HINT}"
    return found, ""


def _check_state(state: dict[str, Tensor], expected: dict[str, Tensor], p: Path, what: str) -> None:
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    if any(k.startswith("AuxLogits.") for k in unexpected) or (
            "fc.weight" in state and state["fc.weight"].shape[0] == 1000):
        raise CheckpointError(f"{what}: {p} looks like torchvision's ImageNet Inception (1000 classes / AuxLogits), "
                              f"not the FID Inception: provide {' or '.join(INCEPTION_WEIGHTS_FILENAMES)}")
    if missing or unexpected:
        raise CheckpointError(f"{what}: {p} does not match the FID Inception: {len(missing)} missing keys "
                              f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}")
    bad = [f"{k}: file {list(v.shape)} vs model {list(expected[k].shape)}"
           for k, v in state.items() if v.shape != expected[k].shape]
    if bad:
        raise CheckpointError(f"{what}: {p} has wrong shapes for the FID Inception: {bad[:5]}")


def load_fid_inception(path: str | os.PathLike, device: torch.device | str = "cpu", *,
                       spatial: bool = False) -> FIDInception:
    """:class:`FIDInception` in eval mode with the weights of ``path``: torch-fidelity's or pytorch-fid's file, or
    any state dict with their keys and shapes (``num_batches_tracked`` entries are optional; torch-fidelity's file
    has none).

    :param spatial: also compute the sFID features (a forward hook; see :class:`FIDInception`).
    :raises MissingFileError: ``path`` does not exist.
    :raises CheckpointError: (a ``ValueError``) the file is unreadable or not a state dict of this network (missing /
        unexpected keys and wrong shapes are listed; torchvision's ImageNet Inception is recognised and named).
    :raises ModuleNotFoundError: torch-fidelity is not installed.
    """
    p = Path(path).expanduser()
    what = "FID Inception weights"
    state = dict(check_state_dict(load_torch_file(p, what), f"{what} {p}"))
    net = _skeleton()
    expected = net.state_dict()
    _check_state(state, expected, p, what)
    for k in expected:
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros((), dtype=torch.long)
    net.load_state_dict(state)
    fingerprint = state_fingerprint({"network": "inception-2015-12-05"},
                                    {k: v.float() for k, v in state.items() if not k.endswith("num_batches_tracked")})
    return FIDInception(net, spatial=spatial, fingerprint=fingerprint).to(device).eval().requires_grad_(False)


def random_inception_state_dict(seed: int = 0) -> dict[str, Tensor]:
    """A state dict of the FID Inception with random values, for tests and dry runs (never for reported numbers).

    He-normal convolutions and BatchNorm statistics near the identity keep activations of a usable scale through
    the 94 layers, so features respond to their input; fc is small. Keys and shapes are the network's own.
    """
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in _skeleton().state_dict().items():
        if not t.is_floating_point():
            state[name] = t.clone()
        elif name.endswith("conv.weight"):
            fan_in = t[0].numel()
            state[name] = torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif name.endswith("bn.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(t.shape, generator=g)
        elif name.endswith("bn.running_var"):
            state[name] = 0.5 + torch.rand(t.shape, generator=g)
        elif name.startswith("fc."):
            state[name] = 0.01 * torch.randn(t.shape, generator=g)
        else:  # bn.bias, bn.running_mean
            state[name] = 0.1 * torch.randn(t.shape, generator=g)
    return state


def inception_features(model: nn.Module, images: Tensor) -> Tensor:
    """Pool3 features ``[B, D]`` (float32) of model-side images ``[B, 3, H, W]`` in [-1, 1].

    The images are quantised to uint8 (:func:`fqgan.data.images.to_uint8`) and handed to ``model`` as such (the FID
    network's input, as torch-fidelity's and the ADM evaluator's), so features equal those of the same images
    stored as PNG. ``model`` is :class:`FIDInception` or any module mapping uint8 images to ``[B, D]``.
    """
    param = next(model.parameters())
    with torch.no_grad():
        return model(to_uint8(images).to(param.device)).float()
