"""Backend choice and the one dispatch table runner (docs/design.md section 5).

Backends:

* ``reference`` -- ``fqgan_kernels/reference.py`` and nothing else: the ground truth, plain PyTorch
  autograd, any device (it builds the N x K / N x V tensors the kernels avoid).
* ``torch`` -- the chunked plain-PyTorch algorithm of an op (the kernels' maths in row chunks; memory
  of the same order as the kernels'), any device. It also runs float64 inputs for the compiled
  backends whose kernels are float32-only.
* ``cpu`` -- the C++ extension (CPU tensors); ``triton`` -- CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1``; ``cuda`` -- the CUDA C++ extension.

Each op file declares an :class:`Op`: per kernel stage (``forward``, ``backward``, ...), the callable
each backend runs and the backend that runs its float64 inputs. :meth:`Op.run` applies the float64
reroute and contiguity; :meth:`Op.resolve` applies availability: ``auto`` picks the fastest backend
the op has for the tensor's device, ``backend=`` or ``$FQGAN_KERNELS_BACKEND`` forces one, and a
forced backend that cannot run raises an error saying why. ``auto`` never silently falls back to
``reference`` where a compiled backend should exist: if the CPU extension failed to build it raises;
only an explicit ``FQGAN_USE_CPP=0`` makes CPU tensors take the ``torch`` path (``reference`` for an
op without one), with a warning, once per op.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import platform
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _ext

BACKENDS = ("reference", "torch", "cpu", "triton", "cuda")
ENV_VAR = "FQGAN_KERNELS_BACKEND"

# auto's preference per device type, fastest first.
_AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


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
    """``{name: BackendInfo}``; ``.auto``: the backend ``auto`` picks per device type; ``.cpu_model``
    and ``.isa``: the CPU and the instruction set the ``cpu`` kernels run (``None`` without them)."""

    def __init__(self, infos: Iterable[BackendInfo], auto: dict[str, str], cpu_model: str, isa: str | None):
        super().__init__((i.name, i) for i in infos)
        self.auto = auto
        self.cpu_model = cpu_model
        self.isa = isa

    def __repr__(self) -> str:
        threads = torch.get_num_threads()
        lines = [f"cpu model: {self.cpu_model} (kernel isa {self.isa or '-'}, {threads} threads)"]
        lines += [str(info) for info in self.values()]
        lines.append("auto: " + ", ".join(f"{dev} -> {name}" for dev, name in self.auto.items()))
        return "\n".join(lines)

    __str__ = __repr__


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else :func:`platform.processor`): every timing quoted
    in this project names it, because the kernels' speed differs between CPU families."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "cpu model", "processor\t: arm")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def triton_interpret() -> bool:
    """True under ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors (tests)."""
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
        return BackendInfo(name, True, "fqgan_kernels/reference.py, the ground truth (builds N x K / N x V)",
                           ("any",))
    if name == "torch":
        return BackendInfo(name, True, "chunked plain PyTorch (memory-safe; float64 route of the kernels)",
                           ("any",))
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
    """Which backends are usable here, and why not; ``.auto`` tells what ``auto`` picks, ``.cpu_model``
    and ``.isa`` which CPU and instruction set the ``cpu`` kernels run on.

    >>> import fqgan_kernels as fk
    >>> print(fk.backends())  # doctest: +SKIP
    cpu model: Intel(R) Xeon(R) Processor (kernel isa avx512, 2 threads)
    reference  yes  devices=any       fqgan_kernels/reference.py, the ground truth ...
    ...
    """
    infos = [_info(name) for name in BACKENDS]
    op = _OPS.get("nearest_code")
    auto = {}
    for device_type in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        try:
            auto[device_type] = op.resolve(None, torch.device(device_type), warn=False) if op else "?"
        except RuntimeError as e:
            auto[device_type] = f"error ({e})"
    mod = _ext.cpu()
    return BackendReport(infos, auto, cpu_model(), mod.isa() if mod is not None else None)


# -- kernels ---------------------------------------------------------------------------------------
def cpu_kernel(name: str) -> Callable[..., Any]:
    """``fqgan_kernels._C.<name>`` (looked up at call time: the extension loads on first use)."""

    def call(*args: Any) -> Any:
        return getattr(_ext.cpu(), name)(*args)

    call.__qualname__ = f"cpu.{name}"
    return call


def cuda_kernel(name: str) -> Callable[..., Any]:
    """``fqgan_kernels._C_cuda.<name>``."""

    def call(*args: Any) -> Any:
        return getattr(_ext.cuda(), name)(*args)

    call.__qualname__ = f"cuda.{name}"
    return call


def triton_kernel(module: str, name: str) -> Callable[..., Any]:
    """``fqgan_kernels.triton.<module>.<name>`` (imported at call time: triton is optional)."""

    def call(*args: Any) -> Any:
        return getattr(importlib.import_module(f"fqgan_kernels.triton.{module}"), name)(*args)

    call.__qualname__ = f"triton.{module}.{name}"
    return call


@dataclass(frozen=True)
class Route:
    """What one backend runs for one kernel stage of an op."""

    kernel: Callable[..., Any]
    float64: str | None = None  # the backend whose route runs float64 inputs; None: this kernel takes them


_OPS: dict[str, Op] = {}


class Op:
    """An op's dispatch table: ``routes[stage][backend]`` is the :class:`Route` that backend runs for
    that stage of the op (every stage lists the same backends). ``reference`` is not in the table:
    the op's public function calls ``fqgan_kernels.reference`` itself, outside the custom ops."""

    def __init__(self, name: str, routes: Mapping[str, Mapping[str, Route]]) -> None:
        stages = list(routes.values())
        names = tuple(stages[0])
        for table in stages:
            if tuple(table) != names:
                raise ValueError(f"{name}: every stage must list the same backends")
            for backend, route in table.items():
                if backend not in BACKENDS or backend == "reference":
                    raise ValueError(f"{name}: unknown kernel backend {backend!r}")
                if route.float64 is not None and route.float64 not in table:
                    raise ValueError(f"{name}: {backend}'s float64 route {route.float64!r} is not in the table")
        self.name = name
        self.routes = {stage: dict(table) for stage, table in routes.items()}
        self.backends: tuple[str, ...] = ("reference", *names)
        _OPS[name] = self

    def __repr__(self) -> str:
        return f"Op({self.name!r}, backends={self.backends}, stages={tuple(self.routes)})"

    def routed(self, stage: str, backend: str, dtype: torch.dtype) -> str:
        """The backend whose kernel runs ``stage`` for inputs of ``dtype`` when ``backend`` was chosen."""
        route = self.routes[stage][backend]
        return route.float64 if route.float64 is not None and dtype == torch.float64 else backend

    def run(self, stage: str, backend: str, *args: Any) -> Any:
        """Run ``stage`` on ``backend``: float64 inputs go to the route's float64 backend (the dtype of
        the first tensor argument decides), tensors are made contiguous (a no-op when they are)."""
        dtype = next((a.dtype for a in args if isinstance(a, Tensor)), None)
        route = self.routes[stage][self.routed(stage, backend, dtype)]
        return route.kernel(*(a.contiguous() if isinstance(a, Tensor) else a for a in args))

    def resolve(self, backend: str | None, device: torch.device, *, warn: bool = True) -> str:
        """The backend that runs this op on ``device``: ``backend`` if given, else
        ``$FQGAN_KERNELS_BACKEND``, else ``auto``. ``ValueError`` for an unknown name or one this op
        lacks; ``RuntimeError`` when the chosen backend cannot run here, with the reason."""
        name = backend if backend is not None else os.environ.get(ENV_VAR, "auto") or "auto"
        if not isinstance(name, str):
            raise TypeError(f"backend must be a str, got {type(name).__name__}")
        name = name.strip().lower()
        if name not in (*BACKENDS, "auto"):
            source = "backend=" if backend is not None else f"${ENV_VAR}="
            raise ValueError(f"fqgan_kernels: unknown backend {source}{name!r}; choose one of "
                             f"{', '.join(('auto', *BACKENDS))}")
        return _resolve_cached(self.name, name, device.type, triton_interpret(), warn)


@torch.compiler.assume_constant_result
def _resolve_cached(op: str, name: str, device_type: str, interpret: bool, warn: bool) -> str:
    return _resolve(op, name, device_type, interpret, warn)


@functools.cache
def _resolve(op: str, name: str, device_type: str, interpret: bool, warn: bool) -> str:
    # `interpret` is part of the cache key only: the triton backend's availability depends on it.
    table = _OPS[op]
    if name == "auto":
        return _auto(table, device_type, warn)
    if name not in table.backends:
        raise ValueError(f"fqgan_kernels: {op} has no '{name}' backend (it has: {', '.join(table.backends)})")
    info = _info(name)
    if not info.available:
        raise RuntimeError(f"fqgan_kernels: backend '{name}' cannot run {op}: {info.reason}")
    if "any" not in info.devices and device_type not in info.devices:
        raise RuntimeError(f"fqgan_kernels: backend '{name}' cannot run {op} on {device_type} tensors "
                           f"(it runs on: {', '.join(info.devices)})")
    return name


def _plain(table: Op) -> str:
    return "torch" if "torch" in table.backends else "reference"


def _auto(table: Op, device_type: str, warn: bool) -> str:
    order = [b for b in _AUTO_ORDER.get(device_type, ()) if b in table.backends]
    if not order:  # other devices (mps, xpu, meta), or an op without a compiled kernel here
        return _plain(table)
    if device_type == "cpu" and _ext.cpu_disabled():
        if warn:
            warnings.warn(f"fqgan_kernels: {table.name} uses the slow '{_plain(table)}' backend on CPU "
                          "because FQGAN_USE_CPP=0", RuntimeWarning, stacklevel=5)
        return _plain(table)
    reasons = []
    for name in order:
        info = _info(name)
        if info.available and device_type in info.devices:
            return name
        reasons.append(f"{name}: {info.reason}")
    what = "Fix the build (see README) or pass" if device_type == "cpu" else "Pass"
    raise RuntimeError(f"fqgan_kernels: no compiled backend for {table.name} on {device_type} "
                       f"({'; '.join(reasons)}). {what} backend='torch' or 'reference' explicitly.")


def clear_cache() -> None:
    """Forget resolved backends (tests that change the environment call it)."""
    _resolve.cache_clear()


def resolve_backend(op: str, backend: str | None, device: torch.device) -> str:
    """The backend that runs the registered op ``op`` (``"nearest_code"``, ``"entropy_loss"``,
    ``"vq_losses"``, ``"linear_cross_entropy"``, ``"sample"``) on ``device``; see :meth:`Op.resolve`."""
    if op not in _OPS:
        raise ValueError(f"fqgan_kernels: unknown op {op!r}; ops: {', '.join(sorted(_OPS))}")
    return _OPS[op].resolve(backend, device)
