"""Sources and compiler flags of the C++/CUDA extensions, shared by ``setup.py`` (ahead of time)
and :mod:`fqgan_kernels._ext` (compile on first use). Imports nothing from torch at module level,
so ``setup.py`` can read it before torch is importable.

Switches (environment variables):

* ``FQGAN_USE_CPP=0``   build no C++ extension at all (the ``cpu`` backend is then unavailable).
* ``FQGAN_USE_CUDA=0``  skip the CUDA extension even when torch is a CUDA build and nvcc exists.
* ``FQGAN_CUDA_ONLY=1`` build only the CUDA extension (scripts/check_cuda_build.sh; the CPU
  kernels then compile on first use).
* ``DEBUG=1``           ``-O0 -g`` instead of ``-O3``.
* ``TORCH_CUDA_ARCH_LIST`` the CUDA archs (default here: ``8.0;9.0a``).
"""

from __future__ import annotations

import glob
import hashlib
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

CPU_EXT_NAME = "fqgan_kernels._C"
CUDA_EXT_NAME = "fqgan_kernels._C_cuda"
DEFAULT_CUDA_ARCHS = "8.0;9.0a"


def env_flag(name: str, default: bool = True) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def debug() -> bool:
    return env_flag("DEBUG", default=False)


def cpu_sources() -> list[str]:
    """``csrc/bindings_cpu.cpp`` plus one ``csrc/cpu/<op>.cpp`` per op family."""
    return [os.path.join(CSRC, "bindings_cpu.cpp"), *sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))]


def cuda_sources() -> list[str]:
    """``csrc/bindings_cuda.cpp``, the torch-facing glue ``csrc/cuda/<op>_glue.cpp`` and the kernels
    ``csrc/cuda/<op>.cu`` (which include CUDA headers only)."""
    return [
        os.path.join(CSRC, "bindings_cuda.cpp"),
        *sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cpp"))),
        *sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu"))),
    ]


def headers() -> list[str]:
    """Every header under csrc/ (C++ ``.h`` and CUDA ``.cuh``): part of the sources digest."""
    return sorted(p for ext in ("h", "cuh") for p in glob.glob(os.path.join(CSRC, "**", f"*.{ext}"), recursive=True))


def cxx_std() -> str:
    """``-std=c++20`` when the installed torch is 2.14 or newer (its headers require C++20, e.g. the
    CUDA 13.0 build used by scripts/check_cuda_build.sh), else ``-std=c++17``. Reads the installed
    version without importing torch."""
    try:
        from importlib.metadata import version

        major, minor = (int(x) for x in version("torch").split("+")[0].split(".")[:2])
    except Exception:
        return "-std=c++17"
    return "-std=c++20" if (major, minor) >= (2, 14) else "-std=c++17"


def _opt() -> list[str]:
    # -g0: setuptools passes the Python build's CFLAGS, which hold -g; debug info on these
    # torch-header-heavy units makes every compile ~1.6x slower and is not needed unless DEBUG=1.
    return ["-O0", "-g"] if debug() else ["-O3", "-g0"]


def cpu_cflags() -> list[str]:
    # No -march=native: the kernels pick AVX-512 / AVX2 / portable code at run time
    # (function-level target attributes in csrc/cpu/*.cpp), so one build runs on any x86-64.
    opt = _opt()
    return [*opt, cxx_std(), "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]


def cpu_ldflags() -> list[str]:
    return ["-fopenmp"]


def cuda_cflags() -> dict[str, list[str]]:
    opt = _opt()
    nvcc_opt = ["-O0", "-g"] if debug() else ["-O3"]
    nvcc = [*nvcc_opt, cxx_std(), "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
    return {"cxx": [*opt, cxx_std()], "nvcc": nvcc}


def sources_digest(paths: list[str], flags: list[str]) -> str:
    """Hash of sources, headers and flags: the cache key of a compile-on-first-use build."""
    h = hashlib.sha256()
    for path in sorted(set(paths + headers())):
        h.update(os.path.relpath(path, ROOT).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(" ".join(flags).encode())
    return h.hexdigest()[:16]
