"""Shared benchmark helpers: the selection (smoke / default / full), the timing protocol, peak-memory
measurement, throughput in extra_info, the machine in the session header, and the summary table,
JSON, Markdown and chart at the end of a timed run.

``pytest benchmarks/ --benchmark-only`` runs the default selection (benchmarks/selection.py: for every
op the headline shape of its family at full size, every provider, peaked and flat inputs; about 10
minutes on 2 cores). ``--bench-full`` (or ``FQGAN_BENCH_FULL=1``) adds the rest of the CPU matrix.
``--benchmark-disable`` (or ``FQGAN_BENCH_SMOKE=1``) runs every benchmark once on small shapes, as CI's
smoke run.

Timing (:func:`timed`): each case's first call is a warm-up whose result is checked against the
reference (benchmarks/checks.py) before anything is timed; then pytest-benchmark's rule gives the
rounds, ``max(min_rounds, ceil(max_time / first call))`` (a second warm-up call is the estimate when the
first one compiled), with ``min_rounds`` and ``max_time`` from ``--benchmark-min-rounds`` /
``--benchmark-max-time`` or, when those are not given, the suite's ``selection.ROUNDS``. The checked
first call stands in for pytest-benchmark's calibration call: its own ``benchmark(fn)`` would add a
calibration call and a result call, two more calls of a case that takes seconds. Peak extra memory
is measured inside the timed rounds of cases that take more than a second (a ``malloc_trim`` and two
counters: milliseconds), in a separate call otherwise. Cases declared ``cold`` (the references on
peaked linear cross-entropy inputs, minutes a call on Intel CPUs) are timed on their first call on
those inputs, after a warm-up on flat inputs of the same shape, and checked after the timing.

Peaked vs flat (issue 10): every op is timed on "peaked" inputs, as real training and sampling
produce them (entropy at T = 0.01 with z near its codes, LCE logits with std 20, sampling logits
x100, the quantizer step at the FQGAN configuration), and on "flat" inputs of the same shape in the
same run (T = 1, unit-scale logits). Exponentials of very negative numbers are subnormal floats,
which cost Intel cores a microcode assist each; the ratio shows whether a provider pays for them.
The ratio of the minimum times, peaked / flat, per shape and provider, goes into the peaked
benchmark's ``extra_info["peaked/flat"]`` and into the summary table.

The summary (benchmarks/summary.py): one row per op, shape and input kind, the fused kernel's time
and its speed-up over every other provider of the run, printed last and written as
``summary.json``, ``summary.md`` and ``speedup.png`` into ``--bench-out`` (default
``.benchmarks/summary`` under the repository root, ignored by git).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections import defaultdict

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import selection
import summary

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") is None:
    os.environ["TRITON_INTERPRET"] = "1"


CASE_PARAMS = ("shape", "tokens", "inputs", "setting")  # what one case (one reference result) is
CASE_KEY = pytest.StashKey[selection.Case]()
INLINE_PEAK_S = 1.0  # cases at least this long measure their peak memory inside the timed rounds
DEFAULT_OUT = os.path.join(".benchmarks", "summary")


def pytest_addoption(parser):
    group = parser.getgroup("fqgan benchmarks")
    group.addoption("--bench-full", action="store_true", default=False,
                    help="run the whole CPU benchmark matrix, not only each op's headline shape "
                         f"(also {selection.FULL_ENV}=1); 40 minutes on 2 cores")
    group.addoption("--bench-selection-json", default=None, metavar="PATH",
                    help="write the collected cases (node id, op, provider, inputs, device) as JSON; with "
                         "--collect-only, what a run would time (tests/test_bench_selection.py)")
    group.addoption("--bench-out", default=None, metavar="DIR",
                    help=f"folder for summary.json, summary.md and speedup.png (default {DEFAULT_OUT} under "
                         "the repository root)")


def pytest_configure(config):
    config.addinivalue_line("markers", "bench_full: a benchmark that only --bench-full (and the smoke run) runs")
    if not _given(config, "--benchmark-columns") and hasattr(config.option, "benchmark_columns"):
        # pytest-benchmark's own tables, printed before the summary: the columns the summary uses
        config.option.benchmark_columns = ["min", "median", "rounds"]
    config._fqgan_start = (time.perf_counter(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), _load())


def _given(config, option: str) -> bool:
    """Whether the command line (or PYTEST_ADDOPTS) names a pytest-benchmark option."""
    args = [*config.invocation_params.args, *shlex.split(os.environ.get("PYTEST_ADDOPTS", ""))]
    return any(str(a) == option or str(a).startswith(option + "=") for a in args)


def pytest_collection_modifyitems(config, items):
    if selection.mode(config) == "default":
        dropped = [item for item in items if item.get_closest_marker("bench_full") is not None]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = [item for item in items if item.get_closest_marker("bench_full") is None]
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    rounds_given = {"min_rounds": _given(config, "--benchmark-min-rounds"),
                    "max_time": _given(config, "--benchmark-max-time")}
    for item in items:
        cuda = "cuda" in item.keywords
        if cuda and not HAS_CUDA:
            item.add_marker(skip_cuda)
        params = getattr(getattr(item, "callspec", None), "params", {})
        item.stash[CASE_KEY] = selection.describe(item.nodeid, params, cuda)
        if item.get_closest_marker("benchmark") is None:
            suite = {k: v for k, v in selection.ROUNDS["cuda" if cuda else "cpu"].items() if not rounds_given[k]}
            if suite:
                item.add_marker(pytest.mark.benchmark(**suite))
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


def pytest_collection_finish(session):
    path = session.config.getoption("bench_selection_json", None)
    if path:
        cases = [{"nodeid": item.nodeid, **dataclasses.asdict(item.stash[CASE_KEY])}
                 for item in session.items if CASE_KEY in item.stash]
        with open(path, "w") as f:
            json.dump({"mode": selection.mode(session.config), "cases": cases}, f, indent=1)


@pytest.fixture(autouse=True)
def _case_info(request):
    """Op, provider, input kind and device of the case into its benchmark's extra_info (from the
    collection: benchmarks/selection.py::describe), for the summary."""
    if "benchmark" in request.fixturenames:
        case = request.node.stash.get(CASE_KEY, None)
        if case is not None:
            b = request.getfixturevalue("benchmark")
            b.extra_info.update(op=case.op, provider=case.provider, device=case.device)
            if case.inputs is not None:
                b.extra_info["inputs"] = case.inputs
    yield


_FAILED: set[str] = set()  # node ids of failed cases: their timings are left out of the summary


def pytest_runtest_logreport(report):
    if report.failed:
        _FAILED.add(report.nodeid)


ROWS_ENV = "FQGAN_BENCH_ROWS"


def pytest_runtest_teardown(item):
    """With ``FQGAN_BENCH_ROWS=PATH``: each benchmark that passed is appended to PATH as one JSON line in
    pytest-benchmark's JSON layout (name, fullname, group, params, stats, extra_info) as soon as it ends.
    ``--benchmark-json`` is written only when the session ends, so a run stopped by a time limit (the GPU
    check's) would keep nothing; ``scripts/gpu_check.sh`` makes its table from these lines then."""
    path = os.environ.get(ROWS_ENV)
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    if not path or fixture is None or item.nodeid in _FAILED:
        return
    stats = getattr(getattr(fixture, "stats", None), "stats", None)
    if stats is None or not getattr(stats, "rounds", 0):
        return
    callspec = getattr(item, "callspec", None)
    row = {"name": item.name, "fullname": item.nodeid, "group": fixture.group,
           "params": dict(callspec.params) if callspec is not None else None,
           "stats": {"min": stats.min, "median": stats.median, "mean": stats.mean, "rounds": stats.rounds},
           "extra_info": dict(fixture.extra_info)}
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


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


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    """CPU model, core count, the kernels' ISA, torch and its threads (and the GPU, if any)."""
    gpu = f", GPU {torch.cuda.get_device_name()}" if HAS_CUDA else ""
    return (f"{cpu_model()}, {os.cpu_count()} CPUs, kernels isa={cpu_isa()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads{gpu}")


def machine_line() -> str:
    return f"{machine()}; load average {_load()}"


def pytest_report_header(config) -> list[str]:
    import fqgan_kernels as fk

    lib = os.path.dirname(os.path.dirname(os.path.abspath(fk.__file__)))
    mode = selection.mode(config)
    return ([f"machine: {machine_line()}", f"fqgan_kernels from {lib}",
             f"benchmark selection: {mode}" + (" (--bench-full: the whole CPU matrix)" if mode == "default" else "")]
            + [f"  {line}" for line in str(fk.backends()).splitlines()])


def pytest_benchmark_update_machine_info(config, machine_info) -> None:
    machine_info["cpu_model"] = cpu_model()
    machine_info["fqgan_kernels_isa"] = cpu_isa()
    import fqgan_kernels as fk

    machine_info["fqgan_kernels_path"] = os.path.dirname(os.path.abspath(fk.__file__))
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["loadavg_at_save"] = os.getloadavg()
    machine_info["bench_selection"] = selection.mode(config)


def label(benchmark, shape: str, note: str | None = None) -> None:
    """The case's shape (its group is op + shape + device; peaked and flat share it) and what its
    inputs are. Op, provider, input kind and device come from the collection (:func:`_case_info`).
    Call it before :func:`timed`: pytest-benchmark reads the group when the timing starts."""
    info = benchmark.extra_info
    benchmark.group = f"{info.get('op', '?')} {shape} {info.get('device', 'cpu')}"
    info["shape"] = shape
    if note:
        info["inputs_are"] = note


def _peaked_flat_ratios(config) -> None:
    """``extra_info["peaked/flat"]`` of every peaked benchmark with a flat twin (same group, provider)."""
    session = getattr(config, "_benchmarksession", None)
    pairs: dict[tuple[str, str], dict[str, object]] = defaultdict(dict)
    for bench in getattr(session, "benchmarks", []):
        info = bench.extra_info
        if bench.stats and info.get("inputs") in ("peaked", "flat") and "provider" in info:
            pairs[(bench.group, info["provider"])][info["inputs"]] = bench
    for pair in pairs.values():
        if "peaked" in pair and "flat" in pair:
            pair["peaked"].extra_info["peaked/flat"] = round(pair["peaked"].stats.min / pair["flat"].stats.min, 3)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    # before pytest-benchmark's own sessionfinish saves the JSON, so the ratios are in it
    _peaked_flat_ratios(session.config)
    yield


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    session = getattr(config, "_benchmarksession", None)
    benchmarks = [b for b in getattr(session, "benchmarks", []) if b.stats and b.fullname not in _FAILED
                  and not b.has_error]
    if not benchmarks:
        return  # nothing was timed (--benchmark-disable): no table
    start, date, load_start = getattr(config, "_fqgan_start", (None, "?", "?"))
    args = " ".join(shlex.quote(str(a)) for a in config.invocation_params.args)
    meta = {"command": f"pytest {args}".strip(), "mode": selection.mode(config), "date_utc": date,
            "wall_s": round(time.perf_counter() - start, 1) if start is not None else None,
            "machine": machine(), "machine_short": f"{cpu_model()}, isa={cpu_isa()}, {torch.get_num_threads()} threads",
            "load_start": load_start, "load_end": _load(), "failed": sorted(_FAILED)}
    out = config.getoption("bench_out", None) or os.path.join(str(config.rootpath), DEFAULT_OUT)
    entries = summary.entries_from_session(benchmarks)
    paths = summary.write(entries, meta, out)
    tr = terminalreporter
    tr.write_sep("-", "summary: the fused kernels against every provider of this run")
    tr.write_line(summary.header({**meta, "mm_gflops": summary.mm_gflops(entries)}))
    tr.write_line(summary.markdown_table(summary.build_rows(entries)))
    for kind, path in paths.items():
        tr.write_line(f"{kind:>4}: {path}")


def timed(benchmark, fn, *, check=None, device: str | torch.device = "cpu", compiles: bool = False,
          cold: bool = False, warm=None, after_warmup=None):
    """Times ``fn()`` (see the module docstring) and returns its result; ``check(result)`` raises when
    the result is wrong (outside the timing, except for ``cold`` cases, checked after it). The peak
    extra memory goes into ``extra_info["peak_extra_MiB"]``.

    :param compiles: the first call compiles (torch.compile): a second warm-up call gives the
        duration that sets the rounds (always on CUDA, where Triton autotunes in the first call).
    :param cold: time the first call on these inputs (one round), after ``warm()`` (e.g. the same
        provider on flat inputs of the same shape, so that nothing compiles inside the timing).
    :param after_warmup: called after the warm-up calls, before the timed rounds (e.g. to reset counters).
    """
    if benchmark.disabled:  # smoke run: one call, checked
        result = benchmark.pedantic(fn, rounds=1, iterations=1)
        if check is not None:
            check(result)
        return result
    peaks: list[int] = []

    def with_peak():
        box = []
        peaks.append(peak_extra_bytes(lambda: box.append(fn()), device))
        return box[0]

    try:
        if cold:
            if warm is not None:
                warm()
            if after_warmup is not None:
                after_warmup()
            result = benchmark.pedantic(with_peak, rounds=1, iterations=1, warmup_rounds=0)
            if check is not None:
                check(result)
        else:
            t0 = time.perf_counter()
            result = fn()
            first = time.perf_counter() - t0
            if check is not None:
                check(result)
            if compiles or torch.device(device).type == "cuda":  # GPU: Triton autotunes in the first call
                t0 = time.perf_counter()
                fn()
                first = time.perf_counter() - t0
            min_rounds, max_time = _rounds_rule(benchmark, device)
            rounds = max(min_rounds, math.ceil(max_time / max(first, 1e-9)))
            if first < INLINE_PEAK_S:
                peaks.append(peak_extra_bytes(fn, device))
            if after_warmup is not None:
                after_warmup()
            result = benchmark.pedantic(fn if first < INLINE_PEAK_S else with_peak, rounds=rounds, iterations=1,
                                        warmup_rounds=0)
    except Exception:
        benchmark.has_error = True  # pytest-benchmark then leaves it out of its tables and JSON
        raise
    if peaks and min(peaks) >= 0:
        benchmark.extra_info["peak_extra_MiB"] = round(max(peaks) / 2**20, 2)
    return result


def _rounds_rule(benchmark, device) -> tuple[int, float]:
    """(min_rounds, max_time) as pytest-benchmark resolved them for this case (its marker over the
    command line); the suite's ``selection.ROUNDS`` where the fixture does not expose them."""
    suite = selection.ROUNDS["cuda" if torch.device(device).type == "cuda" else "cpu"]
    min_rounds = getattr(benchmark, "_min_rounds", None)
    max_time = getattr(benchmark, "_max_time", None)
    return (int(min_rounds) if min_rounds is not None else suite["min_rounds"],
            float(max_time) if max_time is not None else suite["max_time"])


def is_smoke(config) -> bool:
    return selection.mode(config) == "smoke"


def is_full(config) -> bool:
    return selection.mode(config) == "full"


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


def _trim() -> None:
    """Return freed heap pages to the OS so that the RSS high-water mark sees a call's allocations again
    (glibc keeps freed large blocks mapped: without this, a repeated call can measure 0 extra)."""
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def peak_extra_bytes(fn, device: torch.device | str = "cpu") -> int:
    """Peak memory ``fn()`` needs beyond what is live before it: on CUDA from the caching
    allocator's peak; on CPU from the process's peak resident set (``VmHWM``, reset through
    ``/proc/self/clear_refs`` after a ``malloc_trim``), which also sees allocations made inside C++
    kernels. Expect +-20 % between runs on CPU (pages the allocator reuses)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    _trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        fn()
        return -1
    before = _proc_status("VmRSS:")
    fn()
    return max(0, _proc_status("VmHWM:") - before)


def record(benchmark, *, flops: float | None = None, bytes_moved: float | None = None,
           peak_bytes: int | None = None, **extra) -> None:
    """Put GFLOP/s, GB/s (from the measured mean) and, when given, a peak (MiB) into ``benchmark.extra_info``."""
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


def peak_mib(benchmark) -> float | None:
    """The peak extra memory :func:`timed` measured, in MiB (None when not measured)."""
    return benchmark.extra_info.get("peak_extra_MiB")
