"""Loading the released FQGAN-Dual / FQGAN-Triple tokenizer checkpoints (showlab/FQGAN) into
:class:`~fqgan.tokenizer.model.FQTokenizer`.

Official layout (``tokenizer/vq_model_dual.py``, ``vq_model_triple.py``), per sub-codebook ``s``
(Dual: vis, sem; Triple: vis, sem_mid, sem_high) and its adapter list ``a`` (visual_head,
semantic_head[_mid|_high]) and feature predictor ``f`` (feat_pred_head; mid_sem_feat_pred, high_sem_feat_pred):

================================================  ==============================================
official key                                      this model
================================================  ==============================================
``encoder.{conv_in,conv_blocks,mid}.*``           same
``encoder.{a}.0.*``                               ``branches.{i}.adapter.*``
``encoder.norm_out_{s}.*``, ``conv_out_{s}.*``    ``branches.{i}.norm_out.*``, ``branches.{i}.conv_out.*``
``quant_conv_{s}.*``                              ``branches.{i}.quant_conv.*``
``quantize_{s}.embedding.weight`` [K, D]          ``quantizer.codebooks[i]`` of [k, K, D]
``quantize_{s}.codebook_used`` [65536]            dropped (a usage log, not a weight)
``post_quant_conv.*``, ``decoder.*``              same
``{f}.*``                                         ``feature_predictors.{i}.*``
================================================  ==============================================

i is the position of ``s`` in the official concatenation before ``post_quant_conv``
(``[vis, sem]``, ``[vis, sem_mid, sem_high]``). Inside the adapters and feature predictors the names are
identical (``transformer.{j}.attn.in_proj_weight`` etc.).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fqgan.runtime.checkpoint import CheckpointError, MissingFileError, check_state_dict, load_torch_file
from fqgan.runtime.errors import UsageError, UsageTypeError

from .config import FQGAN_DUAL_16, FQGAN_TRIPLE_16, TokenizerConfig
from .model import FQTokenizer

__all__ = [
    "OFFICIAL_NAMES",
    "from_official",
    "infer_official_config",
    "state_dict_from_official",
    "to_official_state_dict",
]

# Per k: (sub-codebook suffix, adapter list name, feature predictor name or None), in concatenation order.
OFFICIAL_NAMES: dict[int, tuple[tuple[str, str, str | None], ...]] = {
    2: (("vis", "visual_head", None), ("sem", "semantic_head", "feat_pred_head")),
    3: (("vis", "visual_head", None), ("sem_mid", "semantic_head_mid", "mid_sem_feat_pred"),
        ("sem_high", "semantic_head_high", "high_sem_feat_pred")),
}
_SHARED_PREFIXES = ("encoder.conv_in.", "encoder.conv_blocks.", "encoder.mid.", "post_quant_conv.", "decoder.")
# Our buffers that official checkpoints do not have (codebook usage statistics of fk.FactorizedQuantizer).
_OWN_ONLY = ("quantizer.step", "quantizer.last_used")


def _official_k(state: Mapping[str, Tensor]) -> int:
    if "quantize_sem_mid.embedding.weight" in state or "quantize_sem_high.embedding.weight" in state:
        return 3
    if "quantize_sem.embedding.weight" in state:
        return 2
    sample = sorted(state)[:6]
    raise CheckpointError("not an FQGAN-Dual or FQGAN-Triple tokenizer state dict: found neither "
                          f"quantize_sem.embedding.weight (Dual) nor quantize_sem_mid.embedding.weight (Triple); "
                          f"its first keys are {sample}")


def _prefix_map(k: int) -> list[tuple[str, str]]:
    """``(official prefix, our prefix)`` pairs of the per-sub-codebook modules."""
    pairs = []
    for i, (s, adapter, feat) in enumerate(OFFICIAL_NAMES[k]):
        pairs += [(f"encoder.{adapter}.0.", f"branches.{i}.adapter."),
                  (f"encoder.norm_out_{s}.", f"branches.{i}.norm_out."),
                  (f"encoder.conv_out_{s}.", f"branches.{i}.conv_out."),
                  (f"quant_conv_{s}.", f"branches.{i}.quant_conv.")]
        if feat is not None:
            pairs.append((f"{feat}.", f"feature_predictors.{i}."))
    return pairs


def _strip_wrappers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # DDP ("module.") and torch.compile ("_orig_mod.") prefixes, if a checkpoint was saved through them.
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def state_dict_from_official(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Map an official Dual/Triple state dict to this model's names.

    :returns: ``(state_dict, unexpected)``: our state dict (codebooks stacked into
        ``quantizer.codebooks`` [k, K, D]) and the official keys that have no place in this model
    """
    state = _strip_wrappers(check_state_dict(state, "FQGAN checkpoint"))
    k = _official_k(state)
    pairs = _prefix_map(k)
    out: dict[str, Tensor] = {}
    unexpected: list[str] = []
    codebooks: dict[int, Tensor] = {}
    suffixes = {s: i for i, (s, _, _) in enumerate(OFFICIAL_NAMES[k])}
    for key, value in state.items():
        m = re.fullmatch(r"quantize_(\w+?)\.(embedding\.weight|codebook_used)", key)
        if m and m.group(1) in suffixes:
            if m.group(2) == "embedding.weight":
                codebooks[suffixes[m.group(1)]] = value
            continue
        if key.startswith(_SHARED_PREFIXES):
            out[key] = value
            continue
        for theirs, ours in pairs:
            if key.startswith(theirs):
                out[ours + key[len(theirs):]] = value
                break
        else:
            unexpected.append(key)
    missing_cb = [f"quantize_{s}.embedding.weight" for s, i in suffixes.items() if i not in codebooks]
    if missing_cb:
        raise CheckpointError(f"FQGAN checkpoint (k={k}) lacks {missing_cb}")
    shapes = {tuple(v.shape) for v in codebooks.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise CheckpointError("the sub-codebooks must all be [K, D] of one shape, got "
                              + ", ".join(f"quantize_{s}: {tuple(codebooks[i].shape)}" for s, i in suffixes.items()))
    out["quantizer.codebooks"] = torch.stack([codebooks[i] for i in range(k)])
    return out, unexpected


def to_official_state_dict(model: FQTokenizer) -> dict[str, Tensor]:
    """The inverse mapping: ``model``'s weights under the official Dual/Triple names (k = 2 or 3), e.g.
    to run them in the official code. ``quantize_*.codebook_used`` is not written."""
    k = model.config.num_codebooks
    if k not in OFFICIAL_NAMES:
        raise UsageError(f"the official layouts exist for k = 2 (Dual) and 3 (Triple), not k = {k}")
    pairs = _prefix_map(k)
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if key in _OWN_ONLY:
            continue
        if key == "quantizer.codebooks":
            for i, (s, _, _) in enumerate(OFFICIAL_NAMES[k]):
                out[f"quantize_{s}.embedding.weight"] = value[i].clone()
            continue
        if key.startswith(_SHARED_PREFIXES):
            out[key] = value
            continue
        for theirs, ours in pairs:
            if key.startswith(ours):
                out[theirs + key[len(ours):]] = value
                break
        else:  # pragma: no cover - every parameter of FQTokenizer has an official name
            raise KeyError(f"no official name for {key}")
    return out


def _count(state: Mapping[str, Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for key in state if (m := rx.match(key))})


def infer_official_config(state: Mapping[str, Tensor], **overrides: Any) -> TokenizerConfig:
    """The :class:`TokenizerConfig` of a mapped official state dict (our names), from its shapes.

    What shapes cannot tell is taken from the official code: 8 attention heads in the adapters and
    feature predictors, GroupNorm with 32 groups, the released training's loss ratios (entropy 0.03,
    disentanglement 0.1) and its teachers when the feature widths match. ``overrides`` win.
    """
    try:
        k = state["quantizer.codebooks"].shape[0]
        K, D = state["quantizer.codebooks"].shape[1:]
        ch, in_channels = state["encoder.conv_in.weight"].shape[:2]
        levels = _count(state, r"encoder\.conv_blocks\.(\d+)\.")
        ch_mult = tuple(state[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in range(levels))
        dec_ch_mult = tuple(state[f"decoder.conv_blocks.{levels - 1 - i}.res.0.conv1.weight"].shape[0] // ch
                            for i in range(levels))
        num_res_blocks = _count(state, r"encoder\.conv_blocks\.0\.res\.(\d+)\.")
        z_channels = state["post_quant_conv.weight"].shape[0]
        out_channels = state["decoder.conv_out.weight"].shape[0]
        pos = state["branches.0.adapter.positional_embedding"]
        grid = math.isqrt(pos.shape[0])
        width = pos.shape[1]
        adapter_layers = _count(state, r"branches\.0\.adapter\.transformer\.(\d+)\.")
        mlp_key = "branches.0.adapter.transformer.0.mlp.c_fc.weight"
        adapter_mlp_ratio = state[mlp_key].shape[0] / width if mlp_key in state else 0.0
        feat_dims = tuple(state[f"feature_predictors.{i}.class_embedding"].shape[-1]
                          if f"feature_predictors.{i}.class_embedding" in state else 0 for i in range(k))
        feat_layers = max([_count(state, rf"feature_predictors\.{i}\.transformer\.(\d+)\.") for i in range(k)] + [0])
    except KeyError as e:
        raise CheckpointError(f"FQGAN checkpoint lacks {e.args[0]} (after mapping to this model's names); "
                              "cannot infer the architecture") from e
    preset = FQGAN_DUAL_16 if k == 2 else FQGAN_TRIPLE_16
    teachers = tuple(t if d and d == pd else None
                     for t, d, pd in zip(preset.teachers, feat_dims, preset.feat_pred_dims))
    values: dict[str, Any] = dict(
        num_codebooks=k, codebook_size=K, codebook_dim=D, image_size=grid * 2 ** (levels - 1),
        in_channels=in_channels, out_channels=out_channels, ch=ch, encoder_ch_mult=ch_mult,
        decoder_ch_mult=dec_ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels,
        adapter_layers=adapter_layers, adapter_mlp_ratio=adapter_mlp_ratio, feat_pred_dims=feat_dims,
        feat_pred_layers=feat_layers if any(feat_dims) else preset.feat_pred_layers, teachers=teachers,
        codebook_names=tuple(s for s, _, _ in OFFICIAL_NAMES[k]))
    values.update(overrides)
    return preset.replace(**values)


def _pick_state(checkpoint: Any, weights: str) -> Mapping[str, Tensor]:
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"FQGAN checkpoint: expected a dict, got {type(checkpoint).__name__}")
    if weights not in ("auto", "ema", "model", "state_dict"):
        raise UsageError(f"weights must be 'auto', 'ema', 'model' or 'state_dict', got {weights!r}")
    holders = [key for key in ("ema", "model", "state_dict") if isinstance(checkpoint.get(key), Mapping)]
    if weights == "auto":
        # The official reconstruction script's order: EMA weights first.
        return checkpoint[holders[0]] if holders else checkpoint
    if weights not in holders:
        raise CheckpointError(f"FQGAN checkpoint has no {weights!r} entry; it has {sorted(map(str, checkpoint))}")
    return checkpoint[weights]


def from_official(source: str | os.PathLike | Mapping[str, Any], config: TokenizerConfig | None = None, *,
                  weights: str = "auto", trusted: bool = False, **overrides: Any) -> FQTokenizer:
    """An :class:`FQTokenizer` (in eval mode) holding the weights of an official FQGAN-Dual or
    FQGAN-Triple checkpoint (downsample 8 or 16).

    :param source: a checkpoint file (``torch.save`` of ``{"model": ...}``, ``{"ema": ...}``,
        ``{"state_dict": ...}`` or a bare state dict), or such a dict already loaded
    :param config: the architecture to load into; default: inferred from the tensor shapes
        (:func:`infer_official_config`, with ``overrides`` applied)
    :param weights: which entry: ``"auto"`` (``ema``, else ``model``, else ``state_dict``, as the
        official reconstruction script), ``"ema"``, ``"model"`` or ``"state_dict"``
    :param trusted: allow arbitrary pickled objects in the file (``torch.load(weights_only=False)``)
    :raises MissingFileError: the file does not exist
    :raises CheckpointError: unreadable file; not a Dual/Triple state dict; a k other than
        ``config``'s; missing or unexpected keys (all listed) or shapes that differ from ``config``
    """
    if isinstance(source, Mapping):
        checkpoint, where = source, "checkpoint dict"
    elif not isinstance(source, (str, os.PathLike)):
        raise UsageTypeError(f"source must be a checkpoint path or a (state) dict, got {type(source).__name__}")
    else:
        if not os.path.isfile(source):
            raise MissingFileError(f"FQGAN checkpoint: no such file {os.fspath(source)!r}")
        checkpoint, where = load_torch_file(source, "FQGAN checkpoint", trusted=trusted), os.fspath(source)
    official = _pick_state(checkpoint, weights)
    state, unexpected = state_dict_from_official(official)
    k = state["quantizer.codebooks"].shape[0]
    if config is None:
        config = infer_official_config(state, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    if config.num_codebooks != k:
        names = ", ".join(f"quantize_{s}" for s, _, _ in OFFICIAL_NAMES[k])
        raise CheckpointError(f"{where} is an FQGAN-{'Dual' if k == 2 else 'Triple'} checkpoint (k={k}: {names}) but "
                              f"the config has num_codebooks={config.num_codebooks}")
    model = FQTokenizer(config)
    own = model.state_dict()
    back = {ours: theirs for theirs, ours in _prefix_map(k)}

    def official_name(key: str) -> str:
        if key == "quantizer.codebooks":
            return "quantize_*.embedding.weight"
        for ours, theirs in back.items():
            if key.startswith(ours):
                return theirs + key[len(ours):]
        return key

    missing = [official_name(key) for key in own if key not in state and key not in _OWN_ONLY]
    unexpected += [official_name(key) for key in state if key not in own]
    wrong = [f"{official_name(key)}: checkpoint {tuple(v.shape)} vs model {tuple(own[key].shape)}"
             for key, v in state.items() if key in own and v.shape != own[key].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if wrong:
            parts.append(f"shape mismatches ({len(wrong)}): {wrong}")
        raise CheckpointError(f"{where} does not fit the FQTokenizer config ({config.num_codebooks} sub-codebooks, "
                              f"downsample {config.down_factor}): " + "; ".join(parts))
    model.load_state_dict({**{key: own[key] for key in _OWN_ONLY}, **state})
    return model.eval()
