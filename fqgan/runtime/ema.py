"""Exponential moving average of a model's weights (official ``update_ema``, decay 0.9999)."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from .errors import UsageError

__all__ = ["EMA"]


class EMA:
    """``ema = decay * ema + (1 - decay) * param`` after each optimiser step; buffers (quantizer
    usage counters, norms' running statistics) are copied, so the EMA model is usable as is. The EMA
    model is a frozen copy in eval mode.

    Parameters are matched by position (``model.parameters()`` order), not by name, so the model may
    be wrapped after the EMA was made (DDP, activation-checkpoint wrappers add name prefixes but keep
    the order). The update is two fused ``torch._foreach_*`` calls, not a Python loop over tensors.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        if not 0.0 <= decay <= 1.0:
            raise UsageError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """One EMA step towards ``model``'s current weights (``decay=0`` copies them)."""
        d = self.decay if decay is None else decay
        # Read each time: sharding the EMA model (FSDP) replaces its parameters by sharded ones.
        mine, mine_buffers = list(self.model.parameters()), list(self.model.buffers())
        params = [p.detach() for p in model.parameters()]
        buffers = list(model.buffers())
        if len(params) != len(mine) or len(buffers) != len(mine_buffers):
            raise UsageError(f"model has {len(params)} parameters and {len(buffers)} buffers, the EMA "
                             f"{len(mine)} and {len(mine_buffers)}: not the model the EMA was made from")
        if params:
            same = all(p.dtype == e.dtype for p, e in zip(params, mine))
            src = params if same else [p.to(e.dtype) for p, e in zip(params, mine)]
            torch._foreach_lerp_(mine, src, 1.0 - d)
        if buffers:
            torch._foreach_copy_(mine_buffers, buffers)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
