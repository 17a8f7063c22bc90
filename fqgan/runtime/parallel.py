"""Data parallelism as a choice of the one loop: DDP or FSDP2, activation checkpointing, and the
sharded checkpoints (``torch.distributed.checkpoint``, DCP) that FSDP runs write.

* ``ddp``: one full copy of every module per process, gradients all-reduced
  (``DistributedDataParallel``). Checkpoints are one ``last.pt`` file (:mod:`fqgan.runtime.checkpoint`).
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``). Each of the task's chosen blocks is a
  unit of its own (its parameters are gathered just before it runs and freed after), then the whole
  module; parameters, gradients and optimizer state are sharded over the processes. On GPU the
  mixed-precision policy keeps bf16 parameters for compute and reduces gradients in fp32. Checkpoints
  are DCP folders (``last.dcp/``), written by every rank in parallel and resharded on load, so a run
  saved with W processes resumes with W' (one included).

The models know nothing of this; a task names the blocks to shard and to checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import fqgan_kernels as fk

from .checkpoint import META_FILE, CheckpointError, load_reason, save_checkpoint
from .dist import DistInfo
from .errors import UsageError

__all__ = ["PARALLEL_MODES", "apply_activation_checkpointing", "clip_grad_norm", "grad_sync", "load_sharded",
           "save_sharded", "set_full_optimizer_state", "shard", "unwrap", "wrap_ddp"]

PARALLEL_MODES = ("ddp", "fsdp")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP and/or ``torch.compile`` wrapper (FSDP2 shards in place: no wrapper)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def wrap_ddp(module: nn.Module, info: DistInfo) -> nn.Module:
    """``module`` in ``DistributedDataParallel`` when there are several processes, else itself."""
    if not info.distributed:
        return module
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def apply_activation_checkpointing(module: nn.Module, block_types: tuple[type[nn.Module], ...]) -> int:
    """Recompute the activations of every submodule of one of ``block_types`` in the backward pass
    instead of keeping them (non-reentrant ``torch.utils.checkpoint``; the RNG state is replayed, so
    dropout draws the same masks and the loss is unchanged). Returns the number of blocks wrapped.

    Parameter names gain a ``_checkpoint_wrapped_module.`` segment; state dicts do not (the wrapper's
    hooks strip it), so checkpoints stay interchangeable."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as apply_ac,
    )

    count = sum(isinstance(m, block_types) for m in module.modules())
    if count:
        apply_ac(module, check_fn=lambda m: isinstance(m, block_types))
    return count


def _is_checkpoint_wrapper(m: nn.Module) -> bool:
    return type(m).__name__ == "CheckpointWrapper"


def shard(module: nn.Module, block_types: tuple[type[nn.Module], ...], info: DistInfo,
          mixed_precision: bool = False) -> nn.Module:
    """FSDP2 ``fully_shard`` on every ``block_types`` submodule (the wrapped one, under activation
    checkpointing), then on ``module`` itself (the rest of its parameters). ``mixed_precision``: bf16
    parameters for compute, fp32 gradient reduction (FSDP2's ``MixedPrecisionPolicy``), for GPUs; a
    ``fk.FactorizedQuantizer`` is a unit of its own that always computes in fp32.

    Works with one process as well (a world of one: nothing is split), which keeps the code path the
    same for tests."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise UsageError("--parallel fsdp needs a process group: run under torchrun (one process is fine: "
                         "torchrun --nproc_per_node 1 ...)")
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision
              else MixedPrecisionPolicy())
    kwargs: dict[str, Any] = {"mp_policy": policy}
    if info.device.type == "cuda":
        from torch.distributed.device_mesh import init_device_mesh

        kwargs["mesh"] = init_device_mesh("cuda", (info.world_size,))
    wrapped_inside = set()  # blocks under activation checkpointing: their wrapper is the FSDP unit
    for m in list(module.modules()):
        if isinstance(m, fk.FactorizedQuantizer):
            # Codebooks stay fp32 (nearest codes and VQ losses as in the fp32 reference), whatever the policy.
            fully_shard(m, **{**kwargs, "mp_policy": MixedPrecisionPolicy()})
            wrapped_inside.update(id(x) for x in m.modules())
            continue
        if m is module or id(m) in wrapped_inside:
            continue
        inner = m._checkpoint_wrapped_module if _is_checkpoint_wrapper(m) else m
        if isinstance(inner, block_types):
            wrapped_inside.add(id(inner))
            fully_shard(m, **kwargs)
    fully_shard(module, **kwargs)
    return module


def is_sharded(module: nn.Module) -> bool:
    """True when ``module`` was sharded by :func:`shard` (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(module), FSDPModule)


@contextlib.contextmanager
def grad_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block, the backward pass of a DDP ``module`` reduces its gradients over the processes
    only when ``enabled`` (the last micro-batch of an accumulated step; DDP's ``no_sync`` otherwise). FSDP2
    modules reduce-scatter at every micro-batch (see the comment); a plain module has nothing to do."""
    if not enabled and isinstance(module, nn.parallel.DistributedDataParallel):
        with module.no_sync():
            yield
        return
    # FSDP2 reduce-scatters every micro-batch: skipping it would keep the whole unsharded fp32 gradient
    # until the last one (4 bytes per parameter on every GPU), which is what FSDP is chosen to avoid.
    yield


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float, device: torch.device) -> torch.Tensor:
    """``clip_grad_norm_`` (the total norm before clipping) that also takes sharded (DTensor) gradients,
    where the norm is reduced over the shards; ``max_norm == 0``: no clipping, a zero norm."""
    params = [p for p in params if p.grad is not None]
    if max_norm <= 0 or not params:
        return torch.zeros((), device=device)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # DTensor: the global norm
        norm = norm.full_tensor()
    return norm


# -- sharded checkpoints (DCP) ---------------------------------------------------------------------
def _state(modules: Mapping[str, nn.Module], optimizers: Mapping[str, tuple[nn.Module, torch.optim.Optimizer]],
           ema: nn.Module | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {name: get_model_state_dict(unwrap(m)) for name, m in modules.items()}
    for key, (owner, opt) in optimizers.items():
        state[key] = get_optimizer_state_dict(unwrap(owner), opt)
    if ema is not None:
        state["ema"] = get_model_state_dict(ema)
    return state


def save_sharded(path: str | os.PathLike, modules: Mapping[str, nn.Module],
                 optimizers: Mapping[str, tuple[nn.Module, torch.optim.Optimizer]], ema: nn.Module | None,
                 meta: Mapping[str, Any], kind: str, info: DistInfo) -> str:
    """Write a DCP folder at ``path`` (collective: every rank writes its shards): the modules' and
    optimizers' states under their names (``"model"``, ``"optimizer"``, ...), ``"ema"``, and ``meta``
    (plain data: step, RNG, configs) in ``meta.pt``. The folder is written as ``.<name>.tmp`` and renamed
    into place when complete, so a crash leaves the previous checkpoint."""
    import torch.distributed.checkpoint as dcp

    path = os.fspath(path)
    parent, name = os.path.split(os.path.abspath(path))
    tmp, old = os.path.join(parent, f".{name}.tmp"), os.path.join(parent, f".{name}.old")
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if info.distributed:
        dist.barrier()
    dcp.save(_state(modules, optimizers, ema), checkpoint_id=tmp, no_dist=not info.distributed)
    if info.is_main:
        save_checkpoint(os.path.join(tmp, META_FILE), dict(meta), kind)
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    if info.distributed:
        dist.barrier()
    return path


def load_sharded(path: str | os.PathLike, modules: Mapping[str, nn.Module],
                 optimizers: Mapping[str, tuple[nn.Module, torch.optim.Optimizer]], ema: nn.Module | None,
                 info: DistInfo) -> None:
    """Load a DCP folder written by :func:`save_sharded` into ``modules``, ``optimizers`` and ``ema``,
    whatever their sharding now (FSDP2 over any number of processes, or plain modules): DCP reshards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _state(modules, optimizers, ema)
    try:
        dcp.load(state, checkpoint_id=os.fspath(path), no_dist=not info.distributed)
    except Exception as exc:  # DCP raises CheckpointException (a BaseException subclass) or RuntimeError
        raise CheckpointError(f"sharded checkpoint {os.fspath(path)!r} does not fit this run: {load_reason(exc)}") \
            from exc
    for name, m in modules.items():
        set_model_state_dict(unwrap(m), state[name])
    for key, (owner, opt) in optimizers.items():
        set_optimizer_state_dict(unwrap(owner), opt, state[key])
    if ema is not None:
        set_model_state_dict(ema, state["ema"])


def optimizer_state_by_name(state: Mapping[str, Any], owner: nn.Module,
                            optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An index-keyed optimizer state dict (``optimizer.state_dict()`` of a plain run, as in ``last.pt``)
    re-keyed by parameter name, the form DCP's ``set_optimizer_state_dict`` takes: parameter ``i`` of the
    saved state is the ``i``-th parameter of ``optimizer``'s groups, whose name comes from ``owner``."""
    names = {id(p): n for n, p in unwrap(owner).named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    saved = [i for g in state["param_groups"] for i in g["params"]]
    if len(saved) != len(order):
        raise CheckpointError(f"the checkpoint's optimizer holds {len(saved)} parameters, this run's {len(order)}")
    fqn = dict(zip(saved, order))
    groups = [{**g, "params": [fqn[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {fqn[i]: s for i, s in state["state"].items()}, "param_groups": groups}


def set_full_optimizer_state(state: Mapping[str, Any], owner: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load an index-keyed full optimizer state (``last.pt``) into the optimizer of a sharded module."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(unwrap(owner), optimizer, optimizer_state_by_name(state, owner, optimizer),
                             options=StateDictOptions(full_state_dict=True))
