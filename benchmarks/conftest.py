"""Shared benchmark helpers: smoke mode, peak-memory measurement, throughput in extra_info, the
machine in the session header, and the peaked/flat table.

``pytest benchmarks/ --benchmark-only`` runs the full shapes; ``--benchmark-disable`` (or
``FQGAN_BENCH_SMOKE=1``) runs every benchmark once on small shapes, as CI's smoke run.

Peaked vs flat (issue 10): every op is timed on "peaked" inputs, as real training and sampling
produce them (entropy at T = 0.01 with z near its codes, LCE logits with std 20, sampling logits
x100, the quantizer step at the FQGAN configuration), and on "flat" inputs of the same shape in the
same run (T = 1, unit-scale logits). Exponentials of very negative numbers are subnormal floats,
which cost Intel cores a microcode assist each; the ratio shows whether a provider pays for them.
Each benchmark labels itself with :func:`label`; at the end of the session the ratio of the minimum
times, peaked / flat, per group (one shape) and provider, goes into the peaked benchmark's
``extra_info["peaked/flat"]`` and into a table printed after pytest-benchmark's own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") is None:
    os.environ["TRITON_INTERPRET"] = "1"


CASE_PARAMS = ("shape", "tokens", "inputs", "setting")  # what one case (one reference result) is


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
    # Every provider of one case back to back (in the file's order of functions): the reference a
    # case is checked against is computed once and held while its providers run (checks.Memo), and
    # providers compared in a ratio are timed minutes, not a whole file, apart.
    first: dict[tuple, int] = {}
    keys = []
    for i, item in enumerate(items):
        params = getattr(getattr(item, "callspec", None), "params", {})
        case = (str(item.path), tuple((p, repr(params[p])) for p in CASE_PARAMS if p in params))
        keys.append((first.setdefault(case, i), i))
    order = sorted(range(len(items)), key=lambda i: keys[i])
    items[:] = [items[i] for i in order]


def cpu_model() -> str:
    """``lscpu``'s model name with its family/model numbers (a VM may show only a generic name),
    e.g. 'Intel(R) Xeon(R) Processor (family 6, model 167)'; /proc/cpuinfo's name without lscpu."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        name = fields.get("Model name", "").strip()
        if name:
            family, model = fields.get("CPU family", "?").strip(), fields.get("Model", "?").strip()
            return f"{name} (family {family}, model {model})"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def cpu_isa() -> str:
    """The ISA the CPU kernels run with (``fqgan_kernels._ext.cpu().isa()``), or why there is none."""
    from fqgan_kernels import _ext

    mod = _ext.cpu()
    return mod.isa() if mod is not None else f"no CPU extension ({_ext.cpu_status()})"


def machine_line() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    gpu = f", GPU {torch.cuda.get_device_name()}" if HAS_CUDA else ""
    return (f"{cpu_model()}, {os.cpu_count()} CPUs, kernels isa={cpu_isa()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads{gpu}; load average {load}")


def pytest_report_header(config) -> list[str]:
    import fqgan_kernels as fk

    lib = os.path.dirname(os.path.dirname(os.path.abspath(fk.__file__)))
    return ([f"machine: {machine_line()}", f"fqgan_kernels from {lib}"]
            + [f"  {line}" for line in str(fk.backends()).splitlines()])


def pytest_benchmark_update_machine_info(config, machine_info) -> None:
    machine_info["cpu_model"] = cpu_model()
    machine_info["fqgan_kernels_isa"] = cpu_isa()
    import fqgan_kernels as fk

    machine_info["fqgan_kernels_path"] = os.path.dirname(os.path.abspath(fk.__file__))
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["loadavg_at_save"] = os.getloadavg()


def label(benchmark, group: str, provider: str, inputs: str, note: str) -> None:
    """One shape's group (peaked and flat share it), the provider and the input kind, for the
    peaked/flat table; ``note`` says what the inputs are."""
    benchmark.group = group
    benchmark.extra_info["provider"] = provider
    benchmark.extra_info["inputs"] = inputs
    benchmark.extra_info["inputs_are"] = note


def _peaked_flat_rows(config) -> list[tuple[str, str, float, float]]:
    session = getattr(config, "_benchmarksession", None)
    pairs: dict[tuple[str, str], dict[str, object]] = defaultdict(dict)
    for bench in getattr(session, "benchmarks", []):
        info = bench.extra_info
        if bench.stats and info.get("inputs") in ("peaked", "flat") and "provider" in info:
            pairs[(bench.group, info["provider"])][info["inputs"]] = bench
    rows = []
    for (group, provider), pair in pairs.items():
        if "peaked" in pair and "flat" in pair:
            peaked, flat = pair["peaked"], pair["flat"]
            ratio = peaked.stats.min / flat.stats.min
            peaked.extra_info["peaked/flat"] = round(ratio, 3)
            rows.append((group, provider, flat.stats.min, peaked.stats.min))
    return rows


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    # before pytest-benchmark's own sessionfinish saves the JSON, so the ratios are in it
    session.config._fqgan_peaked_flat = _peaked_flat_rows(session.config)
    yield


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    rows = getattr(config, "_fqgan_peaked_flat", [])
    tr = terminalreporter
    if not any(b.stats for b in getattr(getattr(config, "_benchmarksession", None), "benchmarks", [])):
        return  # nothing was timed (--benchmark-disable): no figures to pair
    tr.write_sep("-", "peaked / flat: min time, same shape, same run (issue 10 target <= 1.3x on x86)")
    tr.write_line(f"machine at the end: {machine_line()}")
    if not rows:
        tr.write_line("no peaked/flat pairs were timed in this session")
        return
    width = max(len(g) for g, *_ in rows)
    tr.write_line(f"{'group':<{width}}  {'provider':<22} {'flat ms':>10} {'peaked ms':>10} {'peaked/flat':>11}")
    for group, provider, flat, peaked in rows:
        tr.write_line(f"{group:<{width}}  {provider:<22} {flat * 1e3:>10.2f} {peaked * 1e3:>10.2f} "
                      f"{peaked / flat:>10.2f}x")


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
