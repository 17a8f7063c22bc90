"""The one table at the end of a timed benchmark run, as text, JSON and Markdown, and its chart.

One row per op, shape and input kind (peaked / flat): the fused kernel's minimum time, and the
speed-up of the fused kernel over every other provider timed in the same run (provider's minimum
time / fused minimum time: > 1 means the fused kernel is faster; rows where it is slower than some
provider are marked). Peak extra memory per provider where the benchmark measures it, and on
peaked rows each provider's peaked / flat ratio (the subnormal-float slowdown on Intel CPUs).

The benchmark conftest calls :func:`write` at the end of the session; the rows are also rebuilt
from a pytest-benchmark JSON file (``--benchmark-json``) with :func:`entries_from_json`:

    python benchmarks/summary.py bench.json --out .benchmarks/summary
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from selection import DEFAULT, FUSED, REFERENCE

from fqgan.eval.charts import speedup_chart

COMPILE = "torch.compile"
FILES = {"json": "summary.json", "md": "summary.md", "png": "speedup.png"}


def entry(extra_info: dict, stats_min: float, stats_median: float, rounds: int) -> dict | None:
    """One timed case as the summary needs it, or None when the benchmark is not labelled."""
    if "provider" not in extra_info or "op" not in extra_info:
        return None
    return {"op": extra_info["op"], "shape": extra_info.get("shape", ""), "device": extra_info.get("device", "cpu"),
            "inputs": extra_info.get("inputs"), "provider": extra_info["provider"], "min_s": stats_min,
            "median_s": stats_median, "rounds": rounds, "peak_extra_MiB": extra_info.get("peak_extra_MiB"),
            "GFLOP/s": extra_info.get("GFLOP/s")}


def entries_from_session(benchmarks: Iterable) -> list[dict]:
    """From pytest-benchmark's in-memory results (``config._benchmarksession.benchmarks``)."""
    out = []
    for b in benchmarks:
        if b.stats and b.stats.rounds:
            e = entry(b.extra_info, b.stats.min, b.stats.median, b.stats.rounds)
            if e:
                out.append(e)
    return out


def entries_from_json(data: dict) -> list[dict]:
    """From a pytest-benchmark JSON file's contents."""
    out = []
    for b in data.get("benchmarks", []):
        s = b.get("stats") or {}
        if s.get("rounds"):
            e = entry(b.get("extra_info", {}), s["min"], s["median"], s["rounds"])
            if e:
                out.append(e)
    return out


def _subject(providers: Iterable[str]) -> str | None:
    present = set(providers)
    return next((p for p in FUSED if p in present), None)


def build_rows(entries: list[dict]) -> list[dict]:
    """Rows of the table (see the module docstring), in the order of selection.DEFAULT's ops, then as
    measured; flat before peaked. ``torch.mm`` and other rows without a fused provider are left out."""
    groups: dict[tuple, dict[str, dict]] = {}
    for e in entries:
        groups.setdefault((e["op"], e["shape"], e["device"], e["inputs"]), {})[e["provider"]] = e
    order = {h.op: i for i, h in enumerate(DEFAULT)}
    first_seen: dict[tuple, int] = {}
    for op, shape, device, _ in groups:
        first_seen.setdefault((op, shape, device), len(first_seen))
    keys = sorted(groups, key=lambda k: (order.get(k[0], len(order)), first_seen[k[:3]],
                                         {"flat": 0, "peaked": 1}.get(k[3], 0)))
    rows = []
    for key in keys:
        cases = groups[key]
        fused = _subject(cases)
        if fused is None:
            continue
        op, shape, device, inputs = key
        t = {p: e["min_s"] for p, e in cases.items()}
        row = {"op": op, "shape": shape, "device": device, "inputs": inputs, "fused": fused,
               "fused_ms": t[fused] * 1e3,
               "times_ms": {p: v * 1e3 for p, v in t.items()},
               "rounds": {p: e["rounds"] for p, e in cases.items()},
               "peak_extra_MiB": {p: e["peak_extra_MiB"] for p, e in cases.items() if e["peak_extra_MiB"] is not None},
               "speedup": {p: v / t[fused] for p, v in t.items() if p != fused},
               "over_reference": ({p: t[REFERENCE] / v for p, v in t.items() if p != REFERENCE}
                                  if REFERENCE in t else {}),
               "peaked_over_flat": {}}
        row["loses_to"] = [p for p, s in row["speedup"].items() if s < 1.0]
        flat = groups.get((op, shape, device, "flat")) if inputs == "peaked" else None
        if flat:
            row["peaked_over_flat"] = {p: v / flat[p]["min_s"] for p, v in t.items() if p in flat}
        rows.append(row)
    return rows


def _x(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}x" if v < 10 else (f"{v:.1f}x" if v < 100 else f"{v:.0f}x")


def _ms(v: float) -> str:
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _mib(v) -> str:
    return "-" if v is None else (f"{v:.1f}" if v < 100 else f"{v:.0f}")


def markdown_table(rows: list[dict]) -> str:
    """The rows as one Markdown table (also what the terminal shows)."""
    lines = ["| op | shape | inputs | fused | fused ms | vs reference | vs torch.compile | vs others | peak extra MiB: "
             "fused / reference / compile | peaked/flat: fused / reference / compile | fused loses to |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | --- | --- | --- | --- |"]
    for r in rows:
        sp = r["speedup"]
        others = ", ".join(f"{p} {_x(v)}" for p, v in sp.items() if p not in (REFERENCE, COMPILE)) or "-"
        peak = r["peak_extra_MiB"]
        peaks = " / ".join(_mib(peak.get(p)) for p in (r["fused"], REFERENCE, COMPILE)) if peak else "-"
        pf = r["peaked_over_flat"]
        ratios = " / ".join(_x(pf.get(p)) for p in (r["fused"], REFERENCE, COMPILE)) if pf else "-"
        loses = ", ".join(f"**{p}** ({_x(sp[p])})" for p in r["loses_to"]) or ""
        lines.append(f"| {r['op']} | {r['shape']}{'' if r['device'] == 'cpu' else ' ' + r['device']} | "
                     f"{r['inputs'] or '-'} | {r['fused']} | {_ms(r['fused_ms'])} | {_x(sp.get(REFERENCE))} | "
                     f"{_x(sp.get(COMPILE))} | {others} | {peaks} | {ratios} | {loses} |")
    return "\n".join(lines) + "\n"


def chart_rows(rows: list[dict]) -> list[dict]:
    """:func:`fqgan.eval.charts.speedup_chart`'s input: speed-up over the reference per provider and row."""
    out = []
    for r in rows:
        if r["over_reference"]:
            # the fused kernel's bar first, then torch.compile's, then the peers'
            order = sorted(r["over_reference"], key=lambda p, fused=r["fused"]: (p != fused, p != COMPILE))
            speedups = {p: r["over_reference"][p] for p in order}
            label = f"{r['op']} {r['shape']}{'' if r['device'] == 'cpu' else ' ' + r['device']}"
            out.append({"label": label + (f" {r['inputs']}" if r["inputs"] else ""), "speedups": speedups})
    return out


def header(meta: dict) -> str:
    """The lines above the table: command, date, machine, load, wall time."""
    mm = f"; torch.mm 4096^3 fp32 {meta['mm_gflops']:.0f} GFLOP/s in this run" if meta.get("mm_gflops") else ""
    wall = meta.get("wall_s")
    wall_text = f"{int(wall // 60)} min {wall % 60:.0f} s" if wall is not None else "?"
    return (f"`{meta.get('command', '?')}` ({meta.get('mode', '?')} selection), {meta.get('date_utc', '?')}, "
            f"wall time {wall_text}.\n\n"
            f"Machine: {meta.get('machine', '?')}. Load average (1, 5, 15 min) at the start "
            f"{meta.get('load_start', '?')}, at the end {meta.get('load_end', '?')}{mm}.\n\n"
            "Times are the minimum over each case's rounds; speed-up = the other provider's time / the fused "
            "kernel's time (> 1: the fused kernel is faster), every provider measured in this run; peaked/flat = "
            "a provider's time on peaked inputs over its time on flat inputs of the same shape.\n")


def mm_gflops(entries: list[dict]) -> float | None:
    return next((e["GFLOP/s"] for e in entries if e["op"] == "torch.mm" and e.get("GFLOP/s")), None)


def write(entries: list[dict], meta: dict, out_dir: str | Path) -> dict[str, Path]:
    """Writes summary.json, summary.md and speedup.png into ``out_dir``; returns their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "mm_gflops": meta.get("mm_gflops") or mm_gflops(entries)}
    rows = build_rows(entries)
    paths = {kind: out / name for kind, name in FILES.items()}
    md = header(meta) + "\n" + markdown_table(rows)
    paths["md"].write_text(md)
    paths["json"].write_text(json.dumps({**meta, "rows": rows, "chart": chart_rows(rows)}, indent=1) + "\n")
    try:
        speedup_chart(chart_rows(rows), paths["png"],
                      title=f"speed-up over the reference; {meta.get('machine_short') or meta.get('machine', '')}")
    except ImportError as e:  # matplotlib is in the `model` extra
        paths.pop("png")
        print(f"no chart: {e}", file=sys.stderr)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description="The benchmark summary from a pytest-benchmark JSON file.")
    parser.add_argument("json", help="a file written by --benchmark-json")
    parser.add_argument("--out", default=".benchmarks/summary", help="folder for summary.{json,md} and speedup.png")
    args = parser.parse_args()
    with open(args.json) as f:
        data = json.load(f)
    mi = data.get("machine_info", {})
    load = mi.get("loadavg_at_save")
    meta = {"command": f"pytest benchmarks/ --benchmark-only ... --benchmark-json={os.path.basename(args.json)}",
            "mode": mi.get("bench_selection", "?"), "date_utc": data.get("datetime", "?"),
            "machine": f"{mi.get('cpu_model', '?')}, kernels isa={mi.get('fqgan_kernels_isa', '?')}, "
                       f"torch {mi.get('torch', '?')}, {mi.get('torch_threads', '?')} threads",
            "load_end": ", ".join(f"{x:.2f}" for x in load) if load else "?"}
    for path in write(entries_from_json(data), meta, args.out).values():
        print(path)


if __name__ == "__main__":
    main()
