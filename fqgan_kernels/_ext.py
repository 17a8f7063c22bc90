"""Loading of the compiled extensions.

The CPU extension ``fqgan_kernels._C`` is used when it was built ahead of time
(``pip install --no-build-isolation -e .``) and matches the current sources; otherwise it is
compiled once with ninja into a cache folder (``$FQGAN_KERNELS_CACHE``, default
``~/.cache/fqgan_kernels``), printing one line while it does. The CUDA extension
``fqgan_kernels._C_cuda`` is compiled the same way when torch is a CUDA build and nvcc exists.
Failures are kept and reported by :func:`fqgan_kernels.backends`, never swallowed silently.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
import time
from types import ModuleType

import torch

from . import _build

_lock = threading.Lock()
_cache: dict[str, tuple[ModuleType | None, str]] = {}


def cache_dir() -> str:
    root = os.environ.get("FQGAN_KERNELS_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "fqgan_kernels"
    )
    return os.path.join(root, f"torch-{torch.__version__}")


def _digest(kind: str) -> str:
    if kind == "cpu":
        return _build.sources_digest(_build.cpu_sources(), _build.cpu_cflags())
    flags = _build.cuda_cflags()
    return _build.sources_digest(_build.cuda_sources(), flags["cxx"] + flags["nvcc"])


def _try_prebuilt(module: str, digest: str) -> tuple[ModuleType | None, str]:
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        return None, f"no prebuilt {module} ({e})"
    built = getattr(mod, "sources_digest", lambda: "")()
    if built != digest:
        return None, f"prebuilt {module} is stale (sources changed since it was built)"
    return mod, f"prebuilt {module}"


STALE_LOCK_SECONDS = 45 * 60


@contextlib.contextmanager
def _build_guard(build_dir: str):
    """One builder per build folder, and no wait on a dead one. torch's build baton (a ``lock`` file)
    waits forever on a lock left by a killed build; an OS file lock (``flock``) is released by the
    kernel when its holder dies, so whoever holds it knows that a ``lock`` file there is a leftover
    and removes it. Without ``fcntl`` (Windows), a lock older than any build takes (45 min) counts as
    a leftover."""
    lock = os.path.join(build_dir, "lock")
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux/macOS
        _remove_stale_lock(lock)
        yield
        return
    with open(os.path.join(build_dir, "build.flock"), "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"fqgan_kernels: waiting for another process that is compiling the kernels in {build_dir}",
                  file=sys.stderr, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            if os.path.exists(lock):
                print(f"fqgan_kernels: removing the build lock of a build that did not finish: {lock}",
                      file=sys.stderr)
                with contextlib.suppress(OSError):
                    os.remove(lock)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_stale_lock(lock: str) -> None:
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:
        return
    if age > STALE_LOCK_SECONDS:
        print(f"fqgan_kernels: removing a stale build lock ({age / 60:.0f} min old): {lock}", file=sys.stderr)
        with contextlib.suppress(OSError):
            os.remove(lock)


def _jit(kind: str, digest: str) -> ModuleType:
    from torch.utils import cpp_extension

    name = f"fqgan_kernels_{kind}_{digest}"
    build_dir = os.path.join(cache_dir(), name)
    os.makedirs(build_dir, exist_ok=True)
    so = os.path.join(build_dir, f"{name}.so")
    if not os.path.exists(so):
        print(f"fqgan_kernels: compiling the {kind} kernels (first use, about a minute) into {build_dir}",
              file=sys.stderr, flush=True)
    define = f"-DFQGAN_SOURCES_DIGEST={digest}"
    with _build_guard(build_dir):
        if kind == "cpu":
            return cpp_extension.load(
                name=name, sources=_build.cpu_sources(), extra_cflags=[*_build.cpu_cflags(), define],
                extra_ldflags=_build.cpu_ldflags(), extra_include_paths=[_build.CSRC],
                build_directory=build_dir, verbose=False,
            )
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _build.DEFAULT_CUDA_ARCHS)
        flags = _build.cuda_cflags()
        return cpp_extension.load(
            name=name, sources=_build.cuda_sources(), extra_cflags=[*flags["cxx"], define],
            extra_cuda_cflags=[*flags["nvcc"], define], extra_include_paths=[_build.CSRC],
            build_directory=build_dir, verbose=False,
        )


def _load(kind: str) -> tuple[ModuleType | None, str]:
    with _lock:
        if kind in _cache:
            return _cache[kind]
        result = _load_uncached(kind)
        _cache[kind] = result
        return result


def _load_uncached(kind: str) -> tuple[ModuleType | None, str]:
    if not _build.env_flag("FQGAN_USE_CPP"):
        return None, "disabled by FQGAN_USE_CPP=0"
    if kind == "cuda":
        if not torch.version.cuda:
            return None, f"torch {torch.__version__} is not a CUDA build"
        if not _build.env_flag("FQGAN_USE_CUDA"):
            return None, "disabled by FQGAN_USE_CUDA=0"
    try:
        digest = _digest(kind)
    except OSError as e:  # installed without csrc/ (a wheel): only a prebuilt module can work
        digest = ""
        why_src = f"sources unavailable ({e})"
    else:
        why_src = ""
    module = _build.CPU_EXT_NAME if kind == "cpu" else _build.CUDA_EXT_NAME
    mod, why = _try_prebuilt(module, digest) if digest else _try_prebuilt(module, "")
    if mod is not None:
        return mod, why
    if why_src:
        return None, f"{why}; {why_src}"
    if kind == "cuda":
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None:
            return None, "nvcc not found (CUDA_HOME unset)"
    try:
        return _jit(kind, digest), f"compiled on first use in {cache_dir()}"
    except Exception as e:  # keep the reason; backends() shows it and a forced backend raises it
        return None, f"compile failed: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e) else ''}"


def cpu_disabled() -> bool:
    """True when ``FQGAN_USE_CPP=0`` switched the C++ extension off on purpose."""
    return not _build.env_flag("FQGAN_USE_CPP")


def cpu() -> ModuleType | None:
    """The CPU extension module, or None (see :func:`cpu_status`)."""
    return _load("cpu")[0]


def cpu_status() -> str:
    return _load("cpu")[1]


def cuda() -> ModuleType | None:
    """The CUDA extension module, or None (see :func:`cuda_status`)."""
    return _load("cuda")[0]


def cuda_status() -> str:
    return _load("cuda")[1]
