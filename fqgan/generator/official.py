"""Load FAR checkpoints written by the official code (showlab/FQGAN ``autoregressive/``) by key mapping.

Official key (``far_dual.py`` k = 2, ``far_triple.py`` k = 3)   ->  this package (:class:`FAR`)
``cls_embedding.embedding_table.weight`` [C + 1, D]              ->  ``class_embed.embedding_table.weight``
``tok_embeddings_{i}.weight`` [V, D], i = 1..k                   ->  ``tok_embed[i - 1]`` of [k, V, D]
``aggregation_layer.{weight [D, kD], bias [D]}``                 ->  ``aggregate.{weight, bias}``
``layers.{l}.{attention.wqkv, attention.wo, feed_forward.w1/w2/w3, attention_norm, ffn_norm}.weight``
                                                                  ->  ``layers.{l}.<same>``
``ar_head.{l}.<same as layers>``                                 ->  ``ar_layers.{l}.<same>``
``norm.weight``                                                  ->  ``norm.weight``
``output_{i}.weight`` [V, D] (no bias)                           ->  ``head[i - 1]`` of [k, V, D]

Factor i of the checkpoint is row i - 1 of ``indices [B, k, T]``: for the released models, dual:
(vis, sem); triple: (vis, sem_mid, sem_high) -- the tokenizer decoder's channel order.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import Tensor

from fqgan.runtime.errors import MissingFileError, UsageError, UsageTypeError

from .config import PRESETS, FARConfig
from .model import FAR

# State the official model may carry that is not a weight (RoPE table, generation caches).
_IGNORED = re.compile(r"^(freqs_cis|causal_mask|(layers|ar_head)\.\d+\.attention\.kv_cache\.[kv]_cache)$")
_PREFIXES = ("module.", "_orig_mod.")
_HEADS_BY_DIM = {PRESETS[name].dim: PRESETS[name].n_head for name in ("FAR-B", "FAR-L")}


def _load(source: str | os.PathLike | Mapping) -> Mapping:
    if isinstance(source, Mapping):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise UsageTypeError(f"source must be a path or a state dict, got {type(source).__name__}")
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise MissingFileError(f"FAR checkpoint not found: {os.path.abspath(path)}")
    # Official training checkpoints also pickle the argparse Namespace of the run under "args".
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def state_dict_from_official(checkpoint: Mapping, use_ema: bool = False) -> dict[str, Tensor]:
    """The model weights of an official checkpoint: ``checkpoint["ema"]`` if ``use_ema``, else the first of
    ``model`` (DDP runs), ``module`` (DeepSpeed), ``state_dict``, or the mapping itself (FSDP), with the
    ``module.`` / ``_orig_mod.`` prefixes of DDP and torch.compile removed."""
    if use_ema:
        if "ema" not in checkpoint:
            raise UsageError(f"use_ema=True but the checkpoint has no 'ema' entry (keys: {sorted(checkpoint)[:8]})")
        sd = checkpoint["ema"]
    else:
        sd = next((checkpoint[k] for k in ("model", "module", "state_dict")
                   if isinstance(checkpoint.get(k), Mapping)), checkpoint)
    out = {}
    for key, value in sd.items():
        if not isinstance(value, Tensor):
            raise UsageError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor: "
                             "not a model state dict")
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        if not _IGNORED.match(key):
            out[key] = value
    return out


def _count(sd: Mapping[str, Tensor], fmt: str) -> int:
    n = 0
    while fmt.format(n + 1) in sd:
        n += 1
    return n


def _layers(sd: Mapping[str, Tensor], prefix: str) -> int:
    ids = {int(m.group(1)) for key in sd if (m := re.match(rf"^{prefix}\.(\d+)\.", key))}
    if ids and ids != set(range(len(ids))):
        raise UsageError(f"checkpoint has {prefix}.* indices {sorted(ids)}: expected 0..{max(ids)}")
    return len(ids)


def config_from_official(sd: Mapping[str, Tensor], *, num_factors: int | None = None, n_head: int | None = None,
                         block_size: int = 256, **overrides) -> FARConfig:
    """The :class:`FARConfig` an official state dict describes (k, V, D, layers, classes, SwiGLU size from the
    weight shapes; ``n_head`` from FAR-B/FAR-L by width unless given; ``block_size`` is not stored)."""
    if "cls_embedding.embedding_table.weight" not in sd:
        if any(key.startswith("cls_embedding.cap_proj") for key in sd):
            raise UsageError("this is a text-conditional (t2i) FAR checkpoint; only class-conditional (c2i) is "
                             "supported")
        raise UsageError("not a FAR checkpoint: no 'cls_embedding.embedding_table.weight' "
                         f"(first keys: {sorted(sd)[:6]})")
    k = _count(sd, "tok_embeddings_{}.weight")
    k_out = _count(sd, "output_{}.weight")
    if k == 0 or k != k_out:
        raise UsageError(f"checkpoint has {k} input embeddings (tok_embeddings_i) and {k_out} output heads "
                         "(output_i): expected k >= 1 of each")
    if num_factors is not None and num_factors != k:
        raise UsageError(f"checkpoint is a k = {k} FAR (tok_embeddings_1..{k}, output_1..{k}) but num_factors = "
                         f"{num_factors} was asked")
    V, D = sd["tok_embeddings_1.weight"].shape
    if n_head is None:
        if D not in _HEADS_BY_DIM:
            raise UsageError(f"cannot infer n_head for width dim = {D} (FAR-B: 1024, FAR-L: 1280); pass n_head=")
        n_head = _HEADS_BY_DIM[D]
    n_layer, ar_n_layer = _layers(sd, "layers"), _layers(sd, "ar_head")
    if n_layer == 0 or ar_n_layer == 0:
        raise UsageError(f"checkpoint has {n_layer} trunk layers and {ar_n_layer} AR-head layers; need >= 1 each")
    class_dropout_prob = overrides.pop("class_dropout_prob", 0.1)
    rows = sd["cls_embedding.embedding_table.weight"].shape[0]
    num_classes = rows - int(class_dropout_prob > 0)
    head_dim = D // n_head
    for key in ("layers.0.attention.wqkv.weight", "layers.0.feed_forward.w1.weight"):
        if key not in sd:
            raise UsageError(f"official FAR checkpoint has no {key!r}")
    qkv_rows = sd["layers.0.attention.wqkv.weight"].shape[0]
    n_kv_head = (qkv_rows // head_dim - n_head) // 2
    ffn = sd["layers.0.feed_forward.w1.weight"].shape[0]
    config = FARConfig(num_factors=k, vocab_size=V, block_size=block_size, num_classes=num_classes, dim=D,
                       n_layer=n_layer, n_head=n_head, n_kv_head=None if n_kv_head == n_head else n_kv_head,
                       ar_n_layer=ar_n_layer, class_dropout_prob=class_dropout_prob, **overrides)
    if config.hidden_dim != ffn:
        config = replace(config, ffn_dim=ffn)
    return config


_RENAMES = (("class_embed.", "cls_embedding."), ("aggregate.", "aggregation_layer."), ("ar_layers.", "ar_head."))
_STACKED = {"tok_embed": "tok_embeddings_{}.weight", "head": "output_{}.weight"}  # [k, V, D] <-> k keys


def _official_key(key: str) -> str:
    for mine, official in _RENAMES:
        if key.startswith(mine):
            return official + key[len(mine):]
    return key  # layers.*, norm.weight


def to_official_state_dict(model: FAR) -> dict[str, Tensor]:
    """``model``'s weights under the official key names (the inverse of :func:`from_official`'s mapping)."""
    out = {}
    for key, value in model.state_dict().items():
        if key in _STACKED:
            out.update({_STACKED[key].format(i + 1): value[i] for i in range(value.shape[0])})
        else:
            out[_official_key(key)] = value
    return out


def from_official(source: str | os.PathLike | Mapping, *, num_factors: int | None = None, n_head: int | None = None,
                  block_size: int = 256, use_ema: bool = False, **overrides) -> FAR:
    """A :class:`FAR` holding the weights of an official FAR checkpoint (dual or triple code; FAR-B, FAR-L).

    :param source: path of a ``torch.save``'d official checkpoint (``{"model": ..., "optimizer": ..., "args": ...}``
        or a bare state dict), or such a mapping already in memory
    :param num_factors: expected k; a checkpoint with another k raises ValueError (None: take the checkpoint's)
    :param n_head: attention heads (not stored in the weights); None: 16 for width 1024 (FAR-B), 20 for 1280 (FAR-L)
    :param block_size: image positions T = (image_size / downsample) ** 2 the model was trained on (not stored;
        256 = 256 px at downsample 16, the released setting)
    :param use_ema: take the checkpoint's ``ema`` weights
    :param overrides: other :class:`FARConfig` fields (dropouts, ``class_dropout_prob`` = 0 if the table has no
        null-class row, ``rope_base``, ``norm_eps``)
    :returns: the model in eval mode, float32, on the CPU
    :raises FileNotFoundError: no file at ``source``
    :raises ValueError: not a (c2i) FAR checkpoint, wrong k, missing or unexpected keys, shape mismatches
    """
    sd = state_dict_from_official(_load(source), use_ema=use_ema)
    config = config_from_official(sd, num_factors=num_factors, n_head=n_head, block_size=block_size, **overrides)
    model = FAR(config)
    expected = to_official_state_dict(model)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise UsageError(f"official FAR checkpoint does not match {config}:\n  missing keys: {missing[:12]}"
                         f"{' ...' if len(missing) > 12 else ''}\n  unexpected keys: {unexpected[:12]}"
                         f"{' ...' if len(unexpected) > 12 else ''}")
    bad = [f"{key}: checkpoint {tuple(sd[key].shape)}, model {tuple(v.shape)}"
           for key, v in expected.items() if sd[key].shape != v.shape]
    if bad:
        raise UsageError("official FAR checkpoint shapes do not match the inferred config:\n  " + "\n  ".join(bad))
    state = {key: (torch.stack([sd[_STACKED[key].format(i + 1)] for i in range(config.num_factors)])
                   if key in _STACKED else sd[_official_key(key)]) for key in model.state_dict()}
    model.load_state_dict(state, strict=True)
    return model.eval()
