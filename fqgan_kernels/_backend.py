"""Backend choice (DESIGN.md section 5).

``reference`` (plain PyTorch, any device), ``cpu`` (C++ extension), ``triton`` (CUDA tensors, or
CPU tensors under ``TRITON_INTERPRET=1``), ``cuda`` (CUDA C++ extension). ``auto`` picks the fastest
backend an op has for the tensor's device. ``backend=`` or ``FQGAN_KERNELS_BACKEND`` forces one; a
forced backend that cannot run raises an error saying why. ``auto`` never silently falls back to
``reference`` where a compiled backend should exist: if the CPU extension failed to build it
raises; only an explicit ``FQGAN_USE_CPP=0`` makes it use ``reference`` (with a warning, once).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from . import _ext

BACKENDS = ("reference", "cpu", "triton", "cuda")
ENV_VAR = "FQGAN_KERNELS_BACKEND"


@dataclass(frozen=True)
class BackendInfo:
    """Whether a backend can run here, and why (not)."""

    name: str
    available: bool
    reason: str
    devices: tuple[str, ...]

    def __str__(self) -> str:
        mark = "yes" if self.available else "no "
        devices = ",".join(self.devices) if self.devices else "-"
        return f"{self.name:<10} {mark}  devices={devices:<9} {self.reason}"


class BackendReport(dict):
    """``{name: BackendInfo}`` plus ``auto``: which backend ``auto`` picks per device type."""

    def __init__(self, infos: Iterable[BackendInfo], auto: dict[str, str]):
        super().__init__((i.name, i) for i in infos)
        self.auto = auto

    def __repr__(self) -> str:
        lines = [str(info) for info in self.values()]
        lines.append("auto: " + ", ".join(f"{dev} -> {name}" for dev, name in self.auto.items()))
        return "\n".join(lines)

    __str__ = __repr__


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_status() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if torch.cuda.is_available():
        return True, "triton on CUDA devices"
    if triton_interpret():
        return True, "triton interpreter on CPU tensors (TRITON_INTERPRET=1; slow, for tests)"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors)"


def _info(name: str) -> BackendInfo:
    if name == "reference":
        return BackendInfo(name, True, "plain PyTorch", ("any",))
    if name == "cpu":
        mod = _ext.cpu()
        reason = _ext.cpu_status()
        if mod is not None:
            reason = f"{reason}; isa={mod.isa()}, threads={torch.get_num_threads()}"
        return BackendInfo(name, mod is not None, reason, ("cpu",))
    if name == "triton":
        ok, reason = _triton_status()
        devices = ("cuda", "cpu") if ok and triton_interpret() else ("cuda",)
        return BackendInfo(name, ok, reason, devices)
    mod = _ext.cuda()
    reason = _ext.cuda_status()
    if mod is not None and not torch.cuda.is_available():
        return BackendInfo(name, False, f"{reason}; but no CUDA device is visible", ("cuda",))
    return BackendInfo(name, mod is not None, reason, ("cuda",))


def backends() -> BackendReport:
    """Which backends are usable here, and why not; ``.auto`` tells what ``auto`` picks.

    >>> import fqgan_kernels as fk
    >>> print(fk.backends())  # doctest: +SKIP
    reference  yes  devices=any       plain PyTorch
    cpu        yes  devices=cpu       compiled on first use in ...; isa=avx2, threads=2
    ...
    """
    infos = [_info(name) for name in BACKENDS]
    auto = {"cpu": _auto_name("cpu", ("cpu",), ("triton", "cuda"))}
    if torch.cuda.is_available():
        auto["cuda"] = _auto_name("cuda", ("cpu",), ("cuda", "triton"))
    return BackendReport(infos, auto)


def _auto_name(device_type: str, cpu_order: tuple[str, ...], cuda_order: tuple[str, ...]) -> str:
    try:
        return _resolve_auto("nearest_code", device_type, BACKENDS, cpu_order, cuda_order, warn=False)
    except RuntimeError as e:
        return f"error ({e})"


_warned: set[str] = set()


def _resolve_auto(op: str, device_type: str, supported: tuple[str, ...], cpu_order: tuple[str, ...],
                  cuda_order: tuple[str, ...], warn: bool = True) -> str:
    if device_type == "cpu":
        for name in cpu_order:
            if name not in supported:
                continue
            info = _info(name)
            if info.available:
                return name
            if name == "cpu" and "FQGAN_USE_CPP=0" in info.reason:
                if warn and op not in _warned:
                    _warned.add(op)
                    warnings.warn(f"fqgan_kernels: {op} uses the slow 'reference' backend on CPU because "
                                  "FQGAN_USE_CPP=0", RuntimeWarning, stacklevel=4)
                return "reference"
            raise RuntimeError(f"fqgan_kernels: the '{name}' backend for {op} is unavailable: {info.reason}. "
                               "Fix the build (see README) or pass backend='reference' explicitly.")
        return "reference"  # the op has no compiled CPU kernel by design
    if device_type == "cuda":
        reasons = []
        for name in cuda_order:
            if name not in supported:
                continue
            info = _info(name)
            if info.available:
                return name
            reasons.append(f"{name}: {info.reason}")
        if not reasons:
            return "reference"
        raise RuntimeError(f"fqgan_kernels: no compiled backend for {op} on CUDA ({'; '.join(reasons)}). "
                           "Pass backend='reference' to use plain PyTorch.")
    return "reference"  # other devices (mps, xpu, meta): plain PyTorch


def _check_forced(op: str, name: str, device_type: str, supported: tuple[str, ...]) -> None:
    if name not in supported:
        raise ValueError(f"fqgan_kernels: {op} has no '{name}' backend (it has: {', '.join(supported)})")
    if name == "reference":
        return
    info = _info(name)
    if not info.available:
        raise RuntimeError(f"fqgan_kernels: backend '{name}' cannot run {op}: {info.reason}")
    if device_type not in info.devices:
        raise RuntimeError(f"fqgan_kernels: backend '{name}' cannot run {op} on {device_type} tensors "
                           f"(it runs on: {', '.join(info.devices)})")


@torch.compiler.assume_constant_result
def _resolve_cached(op: str, backend: str, device_type: str, supported: tuple[str, ...],
                    cpu_order: tuple[str, ...], cuda_order: tuple[str, ...]) -> str:
    if backend == "auto":
        return _resolve_auto(op, device_type, supported, cpu_order, cuda_order)
    _check_forced(op, backend, device_type, supported)
    return backend


def resolve_backend(op: str, backend: str | None, device: torch.device,
                    supported: tuple[str, ...] = BACKENDS,
                    cpu_order: tuple[str, ...] = ("cpu",),
                    cuda_order: tuple[str, ...] = ("cuda", "triton")) -> str:
    """The backend that runs ``op`` on ``device``: ``backend`` if given, else ``$FQGAN_KERNELS_BACKEND``,
    else ``auto``. Raises ``ValueError`` for an unknown name and ``RuntimeError`` when the chosen
    backend cannot run here, with the reason."""
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto") or "auto"
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    name = name.strip().lower()
    if name not in (*BACKENDS, "auto"):
        source = "backend=" if backend is not None else f"${ENV_VAR}="
        raise ValueError(f"fqgan_kernels: unknown backend {source}{name!r}; choose one of "
                         f"{', '.join(('auto', *BACKENDS))}")
    return _resolve_cached(op, name, device.type, tuple(supported), tuple(cpu_order), tuple(cuda_order))
