"""Shared benchmark helpers: smoke mode, peak-memory measurement, throughput in extra_info.

``pytest benchmarks/ --benchmark-only`` runs the full shapes; ``--benchmark-disable`` (or
``FQGAN_BENCH_SMOKE=1``) runs every benchmark once on small shapes, as CI's smoke run.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") is None:
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


def is_smoke(config) -> bool:
    return os.environ.get("FQGAN_BENCH_SMOKE") == "1" or bool(config.getoption("benchmark_disable", False))


@pytest.fixture
def smoke(request) -> bool:
    return is_smoke(request.config)


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def peak_extra_bytes(fn, device: torch.device | str = "cpu") -> int:
    """Peak memory ``fn()`` needs beyond what is live before it: on CUDA from the caching
    allocator's peak; on CPU from the process's peak resident set (``VmHWM``, reset through
    ``/proc/self/clear_refs``), which also sees allocations made inside C++ kernels."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return -1
    before = _proc_status("VmRSS:")
    fn()
    return max(0, _proc_status("VmHWM:") - before)


def record(benchmark, *, flops: float | None = None, bytes_moved: float | None = None,
           peak_bytes: int | None = None, **extra) -> None:
    """Put GFLOP/s, GB/s and peak memory (MiB) into ``benchmark.extra_info`` from the measured mean."""
    stats = getattr(benchmark, "stats", None)
    mean = stats.stats.mean if stats is not None and getattr(stats, "stats", None) else None
    if mean:
        if flops is not None:
            benchmark.extra_info["GFLOP/s"] = round(flops / mean / 1e9, 2)
        if bytes_moved is not None:
            benchmark.extra_info["GB/s"] = round(bytes_moved / mean / 1e9, 2)
    if peak_bytes is not None:
        benchmark.extra_info["peak_extra_MiB"] = round(peak_bytes / 2**20, 2)
    benchmark.extra_info.update(extra)
