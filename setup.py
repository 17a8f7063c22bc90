"""Build of fqgan-kernels.

* ``pip install --no-build-isolation -e .`` compiles the CPU extension ahead of time, and the CUDA
  extension too when torch is a CUDA build and nvcc is found (``torch.version.cuda and CUDA_HOME``).
* Plain ``pip install -e .`` (build isolation: torch is not importable here) installs the Python
  package only; the C++ kernels then compile on first use with ninja (see fqgan_kernels/_ext.py).

Switches: ``FQGAN_USE_CPP=0``, ``FQGAN_USE_CUDA=0``, ``FQGAN_CUDA_ONLY=1``, ``DEBUG=1``,
``TORCH_CUDA_ARCH_LIST`` (see fqgan_kernels/_build.py).
"""

import importlib.util
import os
import sys

from setuptools import setup

_spec = importlib.util.spec_from_file_location(
    "_fqgan_build", os.path.join(os.path.dirname(os.path.abspath(__file__)), "fqgan_kernels", "_build.py")
)
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


def extensions():
    if not build.env_flag("FQGAN_USE_CPP"):
        print("fqgan-kernels: FQGAN_USE_CPP=0, building no C++ extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "fqgan-kernels: torch is not importable in this build environment (build isolation); "
            "the C++ kernels will compile on first use. Use --no-build-isolation to build them now.",
            file=sys.stderr,
        )
        return [], {}

    rel = lambda paths: [os.path.relpath(p, build.ROOT) for p in paths]
    include_dirs = [build.CSRC]
    # The digest lets the package notice a prebuilt module that is older than the sources.
    cpu_define = f"-DFQGAN_SOURCES_DIGEST={build.sources_digest(build.cpu_sources(), build.cpu_cflags())}"
    exts = []
    if not build.env_flag("FQGAN_CUDA_ONLY", default=False):
        exts.append(
            CppExtension(
                build.CPU_EXT_NAME,
                rel(build.cpu_sources()),
                include_dirs=include_dirs,
                extra_compile_args=[*build.cpu_cflags(), cpu_define],
                extra_link_args=build.cpu_ldflags(),
            )
        )
    use_cuda = bool(torch.version.cuda) and CUDA_HOME is not None and build.env_flag("FQGAN_USE_CUDA")
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build.DEFAULT_CUDA_ARCHS)
        flags = build.cuda_cflags()
        digest = build.sources_digest(build.cuda_sources(), flags["cxx"] + flags["nvcc"])
        cuda_define = f"-DFQGAN_SOURCES_DIGEST={digest}"
        cuda_flags = {"cxx": [*flags["cxx"], cuda_define], "nvcc": [*flags["nvcc"], cuda_define]}
        exts.append(
            CUDAExtension(
                build.CUDA_EXT_NAME,
                rel(build.cuda_sources()),
                include_dirs=include_dirs,
                extra_compile_args=cuda_flags,
            )
        )
        print(f"fqgan-kernels: building CUDA extension for {os.environ['TORCH_CUDA_ARCH_LIST']}", file=sys.stderr)
    else:
        why = (
            "torch is a CPU build" if not torch.version.cuda
            else "nvcc/CUDA_HOME not found" if CUDA_HOME is None
            else "FQGAN_USE_CUDA=0"
        )
        print(f"fqgan-kernels: CPU extension only ({why})", file=sys.stderr)
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
