"""The benchmark suite's selection (benchmarks/selection.py): a plain `pytest benchmarks/ --benchmark-only`
collects the default cases README describes, --bench-full adds to them, the smoke run keeps every
benchmark; and the end-of-run summary (table, JSON, Markdown, chart) from synthetic timings.

Collection only (a subprocess of `pytest --collect-only`, a few seconds); nothing is timed."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
if BENCH not in sys.path:
    sys.path.append(BENCH)

import selection  # noqa: E402
import summary  # noqa: E402

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None  # bench_tokenizer.py needs it


def collect(tmp_path, *args: str, env: dict | None = None) -> dict:
    """``pytest benchmarks/ --collect-only`` in a subprocess; the cases conftest describes."""
    out = tmp_path / f"selection{len(list(tmp_path.iterdir()))}.json"
    clean = {k: v for k, v in os.environ.items()
             if k not in (selection.FULL_ENV, selection.SMOKE_ENV, "PYTEST_ADDOPTS")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "--collect-only", "-q", "-p",
                           "no:cacheprovider", f"--bench-selection-json={out}", *args],
                          cwd=ROOT, env={**clean, **(env or {})}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def expected() -> list[selection.Headline]:
    return [h for h in selection.DEFAULT if HAS_TRANSFORMERS or h.op != "tokenizer step"]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    return collect(tmp_path_factory.mktemp("default"))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return collect(tmp_path_factory.mktemp("full"), "--bench-full")


def test_default_selection_is_the_documented_one(default_run):
    assert default_run["mode"] == "default"
    cpu = [c for c in default_run["cases"] if c["device"] == "cpu"]
    per_op = Counter(c["op"] for c in cpu)
    providers = defaultdict(set)
    for c in cpu:
        providers[c["op"]].add(c["provider"])
    want = expected()
    assert set(per_op) == {h.op for h in want}, "ops in the default run differ from benchmarks/selection.py DEFAULT"
    for h in want:
        assert per_op[h.op] == h.cases, f"{h.op}: {per_op[h.op]} default cases, selection.DEFAULT says {h.cases}"
        assert providers[h.op] == set(h.providers), f"{h.op}: providers {sorted(providers[h.op])}"
    assert len(cpu) == sum(h.cases for h in want)


def test_default_selection_times_peaked_and_flat(default_run):
    """Every op with peaked/flat inputs has both kinds for each of its providers, except the documented
    flat-only ones."""
    flat_only = {(h.op, p) for h in selection.DEFAULT for p in h.flat_only}
    kinds = defaultdict(set)
    for c in default_run["cases"]:
        if c["device"] == "cpu" and c["inputs"] is not None:
            kinds[(c["op"], c["provider"])].add(c["inputs"])
    assert kinds, "no peaked/flat cases collected"
    for key, seen in kinds.items():
        assert seen == ({"flat"} if key in flat_only else {"flat", "peaked"}), f"{key}: {seen}"


def test_full_selection_adds_to_the_default(default_run, full_run):
    assert full_run["mode"] == "full"
    default_ids = {c["nodeid"] for c in default_run["cases"]}
    full_ids = {c["nodeid"] for c in full_run["cases"]}
    assert default_ids < full_ids, f"default cases missing from --bench-full: {sorted(default_ids - full_ids)[:5]}"
    gpu = lambda run: {c["nodeid"] for c in run["cases"] if c["device"] == "cuda"}
    assert gpu(default_run) == gpu(full_run) and gpu(full_run), "the GPU matrix runs whole in both"


class _Config:
    def __init__(self, **options):
        self.options = options

    def getoption(self, name, default=None):
        return self.options.get(name, default)


def test_mode_switches(monkeypatch):
    for name in (selection.FULL_ENV, selection.SMOKE_ENV):
        monkeypatch.delenv(name, raising=False)
    assert selection.mode(_Config()) == "default"
    assert selection.mode(_Config(bench_full=True)) == "full"
    assert selection.mode(_Config(bench_full=True, benchmark_disable=True)) == "smoke"
    monkeypatch.setenv(selection.FULL_ENV, "1")
    assert selection.mode(_Config()) == "full"
    monkeypatch.setenv(selection.SMOKE_ENV, "1")
    assert selection.mode(_Config()) == "smoke"


def test_smoke_run_keeps_every_benchmark(full_run, tmp_path):
    """CI's smoke run (--benchmark-disable) collects every benchmark function of the full run."""
    smoke = collect(tmp_path, "--benchmark-disable")
    assert smoke["mode"] == "smoke"
    function = lambda c: c["nodeid"].split("[")[0]
    assert {function(c) for c in smoke["cases"]} == {function(c) for c in full_run["cases"]}


def test_readme_states_the_default_selection():
    """README's sentence about the default run gives the count that selection.DEFAULT has."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    m = re.search(r"runs (\d+) CPU cases by default", text)
    if m is None:
        pytest.skip("README does not describe the default benchmark run yet (python benchmarks/selection.py "
                    "prints its paragraph)")
    assert int(m.group(1)) == selection.default_cpu_cases()


# -- the summary ------------------------------------------------------------------------------
def _entries() -> list[dict]:
    def e(op, shape, inputs, provider, ms, peak=None):
        return {"op": op, "shape": shape, "device": "cpu", "inputs": inputs, "provider": provider,
                "min_s": ms / 1e3, "median_s": ms / 1e3, "rounds": 1, "peak_extra_MiB": peak, "GFLOP/s": None}

    return [e("nearest_code", "N=4096", "flat", "reference", 1000.0, 1024.0),
            e("nearest_code", "N=4096", "flat", "torch.compile", 400.0, 256.0),
            e("nearest_code", "N=4096", "flat", "fused cpu", 10.0, 0.5),
            e("nearest_code", "N=4096", "flat", "faiss IndexFlatL2", 8.0),
            e("nearest_code", "N=4096", "peaked", "reference", 3000.0),
            e("nearest_code", "N=4096", "peaked", "fused cpu", 11.0),
            {"op": "torch.mm", "shape": "4096^3", "device": "cpu", "inputs": None, "provider": "torch.mm",
             "min_s": 1.0, "median_s": 1.0, "rounds": 1, "peak_extra_MiB": None, "GFLOP/s": 137.4}]


def test_summary_rows_speedups_and_losses():
    rows = summary.build_rows(_entries())
    assert [(r["op"], r["inputs"]) for r in rows] == [("nearest_code", "flat"), ("nearest_code", "peaked")]
    flat, peaked = rows
    assert flat["fused"] == "fused cpu" and flat["fused_ms"] == pytest.approx(10.0)
    assert flat["speedup"]["reference"] == pytest.approx(100.0)
    assert flat["speedup"]["torch.compile"] == pytest.approx(40.0)
    assert flat["loses_to"] == ["faiss IndexFlatL2"]  # 8 ms against 10 ms
    assert flat["over_reference"]["fused cpu"] == pytest.approx(100.0)
    assert peaked["peaked_over_flat"]["reference"] == pytest.approx(3.0)
    assert peaked["peaked_over_flat"]["fused cpu"] == pytest.approx(1.1)
    table = summary.markdown_table(rows)
    assert table.count("\n") == 4  # header, rule, two rows
    assert "**faiss IndexFlatL2** (0.80x)" in table and "100x" in table
    assert summary.mm_gflops(_entries()) == pytest.approx(137.4)


def test_summary_writes_json_markdown_and_chart(tmp_path):
    pytest.importorskip("matplotlib")
    meta = {"command": "pytest benchmarks/ --benchmark-only", "mode": "default", "date_utc": "2026-12-04 12:00 UTC",
            "wall_s": 545.0, "machine": "test CPU", "load_start": "0.1", "load_end": "0.2"}
    paths = summary.write(_entries(), meta, tmp_path / "out")
    assert set(paths) == {"json", "md", "png"}
    data = json.loads(paths["json"].read_text())
    assert len(data["rows"]) == 2 and data["wall_s"] == 545.0 and data["mm_gflops"] == pytest.approx(137.4)
    md = paths["md"].read_text()
    assert "wall time 9 min 5 s" in md and "| nearest_code | N=4096 | flat |" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_speedup_chart_takes_plain_rows(tmp_path):
    """The chart's interface is plain dicts (reused by other reports): rows with missing or zero values."""
    pytest.importorskip("matplotlib")
    from fqgan.eval.charts import speedup_chart

    path = speedup_chart([{"label": "a", "speedups": {"fused": 8.1, "torch.compile": 0.0}},
                          {"label": "b", "speedups": {}}], tmp_path / "deep" / "x.png", title="t")
    assert path == tmp_path / "deep" / "x.png" and path.stat().st_size > 1000


def test_rows_are_written_as_each_benchmark_ends(tmp_path):
    """FQGAN_BENCH_ROWS: every finished case is one JSON line in pytest-benchmark's layout, so a run stopped by
    a time limit (scripts/gpu_check.sh) keeps its rows; the summary reads them as it reads the JSON file."""
    rows = tmp_path / "rows.jsonl"
    # Not as an xdist worker (pytest-benchmark disables timing when PYTEST_XDIST_WORKER is set, as under -n 2).
    env = {k: v for k, v in os.environ.items()
           if k not in (selection.FULL_ENV, selection.SMOKE_ENV, "PYTEST_ADDOPTS") and not k.startswith("PYTEST_XDIST")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/bench_sample.py", "--benchmark-only", "-q",
                           "-p", "no:cacheprovider", "-k", "test_fused_cpu and flat", f"--bench-out={tmp_path}"],
                          cwd=ROOT, env={**env, "FQGAN_BENCH_ROWS": str(rows)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in rows.read_text().splitlines()]
    assert len(lines) >= 1
    for row in lines:
        assert row["fullname"].startswith("benchmarks/bench_sample.py::test_fused_cpu[") and row["params"]["inputs"]
        assert row["stats"]["rounds"] >= 1 and 0 < row["stats"]["min"] <= row["stats"]["median"]
        assert row["extra_info"]["provider"] == "fused cpu"
    assert len(summary.entries_from_json({"benchmarks": lines})) == len(lines)
