#!/usr/bin/env python
"""Compiles every Triton kernel of fqgan_kernels for sm_90a (H100/H200) and sm_80 (A100) on a machine
without a GPU, and checks what the interpreter cannot: that the real compiler accepts the kernel,
that no config spills registers, and that no config needs more shared memory than a block can have.

What is compiled: every kernel, for every config a GPU can run (the autotune list of its
``Tuning`` in fqgan_kernels/triton/, plus the ``FQGAN_TRITON_AUTOTUNE=0`` default) and every
constexpr combination the op front doors produce (``CASES`` below: dtypes fp32/bf16/fp16, L2,
USE_DOT, D = 8 and D >= 16, bias, CFG, the vq_losses sub-codebook counts). The launch arguments
are specialised exactly as ``JITFunction.run`` does on a GPU (Triton's own binder: 16-byte aligned
pointers, ints divisible by 16, ints equal to 1), with the integer values of the GPU benchmark
shapes.

Per compile: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90 | 80, 32))``, then
``cuobjdump --dump-resource-usage`` (from the Triton wheel) on the cubin for registers, stack and
local memory, and ``metadata.shared`` for the dynamic shared memory (Triton kernels have no static
shared memory of their own; the PTX is checked for it). Fails (exit 1) on a compile error, on
STACK or LOCAL > 0 (spills), and on shared memory above the per-block limit (227 KiB on sm_90,
163 KiB on sm_80).

Nothing is cached across runs: every run compiles into a fresh temporary ``TRITON_CACHE_DIR``
(removed at exit), so a stale cache can never hide a failure and the wall time printed is the cold
one. Within a run, compiles with equal Triton cache keys (source, specialisation, options, target)
run once. ``--jobs`` processes compile in parallel (default: the CPU count, at most 4).

    python scripts/check_triton_compile.py                  # check, print the summary
    python scripts/check_triton_compile.py --results benchmarks/RESULTS.md --json out.json
    python scripts/check_triton_compile.py --cases tests/data/bad_kernels.py   # other kernels (tests)
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: @triton.jit must build JITFunctions

import argparse
import concurrent.futures as cf
import importlib.util
import json
import multiprocessing
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
from gpu_resources import ARCHS, SM90, occupancy, parse_cuobjdump, replace_section  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.compiler.compiler import get_cache_key  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

TARGETS = {"sm_90a": 90, "sm_80": 80}
# PTX instructions whose rounding matters for docs/numerics.md (counted per compile).
PTX_OPS = {
    "ex2.approx": r"\bex2\.approx(\.ftz)?\.f32\b",
    "lg2.approx": r"\blg2\.approx(\.ftz)?\.f32\b",
    "rcp.approx": r"\brcp\.approx(\.ftz)?\.f32\b",
    "rsqrt.approx": r"\brsqrt\.approx(\.ftz)?\.f32\b",
    "sqrt.approx": r"\bsqrt\.approx(\.ftz)?\.f32\b",
    "div.full": r"\bdiv\.full(\.ftz)?\.f32\b",
    "div.approx": r"\bdiv\.approx(\.ftz)?\.f32\b",
    "div.rn": r"\bdiv\.rn(\.ftz)?\.f32\b",
    "sqrt.rn": r"\bsqrt\.rn(\.ftz)?\.f32\b",
    "fma.rn.f32": r"\bfma\.rn(\.ftz)?\.f32\b",
    "ftz": r"\.ftz\.f32\b",
    "mma": r"\b(mma\.sync|wgmma\.mma_async)\b",
}


@dataclass
class Case:
    """One kernel with one set of constexprs, as a front door launches it.

    ``args``: the positional launch arguments (a small CPU tensor of the right dtype stands in
    for each pointer; ints and floats carry GPU-benchmark values); ``meta``: the constexpr
    keyword arguments other than the config's; ``configs``: every config a GPU can run."""

    op: str
    kernel: str
    variant: str
    fn: object
    args: tuple
    meta: dict
    configs: list
    options: dict = field(default_factory=dict)  # launch options outside the config (enable_fp_fusion)


def _t(dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(16, dtype=dtype)


F32, BF16, F16, I64 = torch.float32, torch.bfloat16, torch.float16, torch.int64
DTYPES = {"fp32": F32, "bf16": BF16, "fp16": F16}


def _nearest_code_cases() -> list[Case]:
    from fqgan_kernels.triton import nearest_code as m

    N, K, k = 65536, 16384, 3  # bench_nearest_code.py GPU_SHAPES
    out = []
    for dname, dt in DTYPES.items():
        for D in (8, 16):  # unrolled outer products; tl.dot
            for l2 in (True, False):
                v = f"{dname} D={D} {'L2' if l2 else 'raw'}"
                out.append(Case("nearest_code", "_nearest_code_prep_kernel", v, m._nearest_code_prep_kernel,
                                (_t(dt), _t(F32), _t(F32), K, D), m.prep_meta(D, l2), [m.PREP_CONFIG],
                                {"enable_fp_fusion": True}))
                out.append(Case("nearest_code", "_nearest_code_fwd_kernel", v, m._nearest_code_fwd_kernel,
                                (_t(dt), _t(F32), _t(F32), _t(dt), _t(I64), N, K, k, m.pow2_bucket(N)),
                                m.fwd_meta(D, l2), m.FWD_TUNING.all_configs(), {"enable_fp_fusion": True}))
    return out


def _entropy_loss_cases() -> list[Case]:
    from fqgan_kernels.triton import entropy_loss as m

    N, K, k = 65536, 16384, 3  # bench_entropy_loss.py GPU_SHAPES; the kernels see float32 only
    nb = m.pow2_bucket(N)
    f = _t(F32)
    args = {
        "rows_fwd": lambda D: (f, f, f, f, f, N, K, D, nb),
        "colsum": lambda D: (f, f, f, f, f, N, K, D, nb),
        "rows_bwd": lambda D: (f, f, f, f, f, f, f, f, f, f, N, K, D, nb, k, 200.0),
        "grad_e": lambda D: (f, f, f, f, f, f, f, f, f, N, K, D, nb, 200.0),
    }
    out = []
    for name, kernel in m.KERNELS.items():
        for D in (8, 32, m.MAX_D):  # BLOCK_D 16 (any D <= 16), 32 and 64, each with its own config list
            bd = m.block_d(D)
            out.append(Case("entropy_loss", kernel.__name__, f"fp32 D={D}", kernel, args[name](D),
                            {"BLOCK_D": bd}, m.TUNING[(name, bd)].all_configs(), {"enable_fp_fusion": True}))
    return out


def _linear_cross_entropy_cases() -> list[Case]:
    from fqgan_kernels.triton import linear_cross_entropy as m

    N, H, V = 32768, 1280, 16384  # bench_linear_cross_entropy.py GPU_SHAPES (k heads: the grid only)
    strides = (N * H, H, V * H, H, V, N, N)
    out = []
    for dname, dt in DTYPES.items():
        for bias in (False, True):
            flags = m.flags(dt, bias)
            v = f"{dname}{' bias' if bias else ''}"
            x = _t(dt)
            f = _t(F32)
            fwd = (x, x, x, _t(I64), f, f, N, V, H, m.pow2_bucket(N), *strides, -100, 0.0, 0.0)
            bwd = (x, x, x, _t(I64), f, f, f, f, f, N, V, H, m.pow2_bucket(N), *strides, -100, 0.0, 0.0)
            for name, a in (("fwd", fwd), ("bwd", bwd)):
                kernel = m.KERNELS[name]
                out.append(Case("linear_cross_entropy", kernel.__name__, v, kernel, a, flags,
                                m.TUNING[(name, flags["IEEE"])].all_configs(), {"enable_fp_fusion": True}))
    return out


def _sample_cases() -> list[Case]:
    from fqgan_kernels.triton import sample as m

    B, V = 64, 16384  # bench_sample.py shapes
    out = []
    for dname, dt in DTYPES.items():
        for cfg in (True, False):
            x, f = _t(dt), _t(F32)
            a = (x, x, f, f, f, _t(I64), f, _t(torch.float64), _t(I64), V, m.pow2_bucket(B))
            out.append(Case("sample", "_sample_kernel", f"{dname}{' cfg' if cfg else ''}", m._sample_kernel, a,
                            {"HAS_UNCOND": cfg}, m.TUNING.all_configs(), {"enable_fp_fusion": False}))
    return out


def _vq_losses_cases() -> list[Case]:
    from fqgan_kernels.triton import vq_losses as m

    N = 65536
    out = []
    # k and D are run-time sizes the front door turns into constexprs (K_SUB unrolls the sub-codebooks
    # and their pairs): k = 1 (no pairs), FQGAN's k = 2 and 3 at D = 8 with and without the
    # disentanglement pass, and k = 3 at D = 16 (the widest rows).
    combos = [(8, 1, False), (8, 2, True), (8, 3, False), (8, 3, True), (16, 3, True)]
    for dname, dt in DTYPES.items():
        for D, k, dis in combos:
            v = f"{dname} D={D} k={k}{' dis' if dis else ''}"
            meta = m.meta(D, k, dis)
            slots = m.fwd_slots(k, dis)
            x = _t(dt)
            out.append(Case("vq_losses", "_vq_losses_fwd_kernel", v, m._vq_losses_fwd_kernel,
                            (x, x, _t(F32), N, m.pow2_bucket(N)),
                            {**meta, "SLOTS": slots, "BLOCK_N": m._FWD_BLOCK_N}, m.FWD_TUNING.all_configs(),
                            {"enable_fp_fusion": True}))
            out.append(Case("vq_losses", "_vq_losses_bwd_kernel", v, m._vq_losses_bwd_kernel,
                            (x, x, _t(F32), x, x, N, m.pow2_bucket(N)), meta, m.BWD_TUNING.all_configs(),
                            {"enable_fp_fusion": True}))
    return out


def project_cases() -> list[Case]:
    """Every (kernel, constexprs) the op front doors of fqgan_kernels can launch on a GPU."""
    return [*_nearest_code_cases(), *_entropy_loss_cases(), *_linear_cross_entropy_cases(), *_sample_cases(),
            *_vq_losses_cases()]


def load_cases(path: str) -> list[Case]:
    """``CASES`` (a list of :class:`Case`, or a function returning one) from a Python file."""
    spec = importlib.util.spec_from_file_location("extra_cases", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["extra_cases"] = mod
    spec.loader.exec_module(mod)
    cases = mod.CASES
    return list(cases() if callable(cases) else cases)


# -- compiling -----------------------------------------------------------------------------------
_CASES: list[Case] = []  # set before the worker processes fork


def _config_label(cfg: triton.Config) -> str:
    parts = [f"{k}={v}" for k, v in cfg.kwargs.items()]
    parts.append(f"w{cfg.num_warps}")
    parts.append(f"s{cfg.num_stages}")
    return " ".join(parts)


def _prepare(case: Case, cfg: triton.Config, arch: str):
    """(ASTSource, target, options, cache key) of one compile, specialised as ``JITFunction.run``
    does on a GPU (signature, constexprs, divisibility attributes)."""
    target = GPUTarget("cuda", TARGETS[arch], 32)
    backend = make_backend(target)
    fn = case.fn
    kwargs = {**case.meta, **cfg.all_kwargs(), **case.options}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*case.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    src = ASTSource(fn, signature, constexprs, attrs)
    # Triton's own cache key: equal keys are the same compile (same source, specialisation, options, target).
    key = get_cache_key(src, backend, backend.parse_options(options.__dict__), env_vars={})
    return src, target, options.__dict__, key


def compile_one(job: tuple[int, int, str]) -> dict:
    """Compiles case ``job[0]`` with config ``job[1]`` for arch ``job[2]``; the resources or the error."""
    ci, fi, arch = job
    case = _CASES[ci]
    cfg = case.configs[fi]
    res = {"case": ci, "config": fi, "arch": arch}
    t0 = time.perf_counter()
    try:
        src, target, options, _ = _prepare(case, cfg, arch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            k = triton.compile(src, target=target, options=options)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            dump = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                                  capture_output=True, text=True, check=True).stdout
        usage = next(iter(parse_cuobjdump(dump).values()))
        ptx = k.asm["ptx"]
        static_user = sum(int(n) for n in re.findall(r"^\s*\.shared\s+(?:\.align\s+\d+\s+)?\.b8\s+\w+\[(\d+)\]",
                                                        ptx, flags=re.M))
        res.update(regs=usage["REG"], stack=usage["STACK"], local=usage["LOCAL"], shared_cubin=usage["SHARED"],
                   shared_dyn=int(k.metadata.shared), shared_static=static_user, num_warps=k.metadata.num_warps,
                   ptx_ops={name: len(re.findall(rx, ptx)) for name, rx in PTX_OPS.items()})
    except Exception as e:  # the compile error is the finding
        # CompilationError: "at L:C:", the source lines, a caret, the reason: keep the first and last.
        msg = [line.strip() for line in str(e).strip().splitlines() if line.strip() and line.strip() != "^"]
        text = msg[0] if len(msg) <= 1 else f"{msg[0]} {msg[-1]}"
        res["error"] = f"{type(e).__name__}: {text}"[:600]
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def problems(res: dict) -> list[str]:
    """Why a compile result fails the check (empty: it passes)."""
    if "error" in res:
        return [f"compile error: {res['error']}"]
    out = []
    if res["stack"] or res["local"]:
        out.append(f"spills: STACK {res['stack']} B, LOCAL {res['local']} B per thread ({res['regs']} registers)")
    arch = ARCHS[res["arch"]]
    smem = res["shared_dyn"] + res["shared_static"]
    if smem > arch.smem_per_block:
        out.append(f"shared memory {smem} B > {arch.smem_per_block} B per block on {arch.gpu}")
    return out


def run(cases: list[Case], archs: list[str], jobs: int, progress: bool = True) -> list[dict]:
    """Every (case, config, arch) compiled once per distinct Triton cache key (identical compiles,
    e.g. a default config that is also in the list, or variants the specialisation makes equal,
    run once and share the result); one result per (case, config, arch)."""
    global _CASES
    _CASES = cases
    work = [(ci, fi, arch) for ci, c in enumerate(cases) for fi in range(len(c.configs)) for arch in archs]
    first: dict[str, tuple] = {}  # cache key -> the job that compiles it
    owner: dict[tuple, tuple] = {}  # job -> the job whose result it shares
    for w in work:
        try:
            key = _prepare(cases[w[0]], cases[w[0]].configs[w[1]], w[2])[3]
        except Exception:  # binding failed: compile_one reports the error
            key = repr(w)
        owner[w] = first.setdefault(key, w)
    unique = list(first.values())
    # Longest first (float32 IEEE dots, the entropy backward, sample's sort, many warps) so the
    # workers finish together.
    cost = {"linear_cross_entropy": 2, "entropy_loss": 3, "sample": 4}

    def expected(w):
        c = cases[w[0]]
        return cost.get(c.op, 1) * (2 if c.meta.get("IEEE") else 1) * c.configs[w[1]].num_warps

    unique.sort(key=expected, reverse=True)
    if progress:
        print(f"{len(work)} compiles requested, {len(unique)} distinct; {jobs} processes", flush=True)
    done: dict[tuple, dict] = {}
    t0 = time.time()

    def note(n: int) -> None:
        if progress and (n % 50 == 0 or n == len(unique)):
            print(f"  {n}/{len(unique)} compiled, {time.time() - t0:.0f} s", flush=True)

    if jobs <= 1:
        for n, w in enumerate(unique, 1):
            done[w] = compile_one(w)
            note(n)
    else:
        ctx = multiprocessing.get_context("fork")
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = {pool.submit(compile_one, w): w for w in unique}
            for n, fut in enumerate(cf.as_completed(futures), 1):
                done[futures[fut]] = fut.result()
                note(n)
    out = []
    for w in work:
        r = dict(done[owner[w]])
        r.update(case=w[0], config=w[1], arch=w[2])
        if owner[w] != w:
            r["seconds"] = 0.0  # shared with an identical compile
        out.append(r)
    return out


# -- reporting -----------------------------------------------------------------------------------
def summarise(cases: list[Case], results: list[dict]) -> list[dict]:
    """One row per (kernel, config, arch): the range over the kernel's variants."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        c = cases[r["case"]]
        groups[(c.op, c.kernel, _config_label(c.configs[r["config"]]), r["arch"])].append(r)
    rows = []
    for (op, kernel, cfg, arch), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        row = {"op": op, "kernel": kernel, "config": cfg, "arch": arch, "variants": len(rs),
               "failed": sum(bool(problems(r)) for r in rs)}
        if ok:
            regs = [r["regs"] for r in ok]
            smem = [r["shared_dyn"] + r["shared_static"] for r in ok]
            warps = ok[0]["num_warps"]
            occ = [occupancy(ARCHS[arch], r["regs"], 32 * r["num_warps"], r["shared_dyn"] + r["shared_static"])
                   for r in ok]
            worst = min(occ, key=lambda o: o.warps)
            row.update(regs_min=min(regs), regs_max=max(regs), smem_max=max(smem), warps=warps,
                       occ_min=worst.warps, occ_max=max(o.warps for o in occ), limiter=worst.limiter,
                       spill_max=max(r["stack"] + r["local"] for r in ok))
        rows.append(row)
    return rows


def _range(a: int, b: int) -> str:
    return f"{a}" if a == b else f"{a}-{b}"


def print_report(cases: list[Case], results: list[dict], rows: list[dict]) -> int:
    failed = [(cases[r["case"]], r) for r in results if problems(r)]
    print(f"{'':4}  {'kernel':<28} {'config':<36} {'arch':<6} {'var':>3} {'regs':>7} {'spill B':>7} "
          f"{'smem KiB':>8} {'warps/SM':>9}")
    for row in sorted(rows, key=lambda r: (r["op"], r["kernel"], r["config"], r["arch"])):
        mark = "FAIL" if row["failed"] else "ok"
        if "regs_min" in row:
            occ = _range(row["occ_min"], row["occ_max"]) if row["arch"] == SM90.name else ""
            print(f"{mark:<4}  {row['kernel']:<28} {row['config']:<36} {row['arch']:<6} {row['variants']:>3} "
                  f"{_range(row['regs_min'], row['regs_max']):>7} {row['spill_max']:>7} "
                  f"{row['smem_max'] / 1024:>8.1f} {occ:>9}")
        else:
            print(f"{mark:<4}  {row['kernel']:<28} {row['config']:<36} {row['arch']:<6} {row['variants']:>3}  "
                  "(every variant failed to compile)")
    for case, r in failed:
        cfg = _config_label(case.configs[r["config"]])
        for p in problems(r):
            print(f"FAIL  {case.kernel} [{case.variant}] {{{cfg}}} {r['arch']}: {p}")
    n = len(results)
    print(f"\n{n} compiles ({len(cases)} kernel variants x their configs x {len({r['arch'] for r in results})} "
          f"archs), {len(failed)} failed; "
          f"{sum(r['seconds'] for r in results):.0f} s of compile time")
    return 1 if failed else 0


def markdown(rows: list[dict], header: str) -> str:
    """The sm_90a rows as a markdown table (H200 occupancy), for benchmarks/RESULTS.md."""
    lines = [header, "",
             "| op | kernel | config | variants | regs | smem KiB | warps/SM (H200) | limited by |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for row in sorted(rows, key=lambda r: (r["op"], r["kernel"], r["config"])):
        if row["arch"] != SM90.name or "regs_min" not in row:
            continue
        lines.append(f"| {row['op']} | `{row['kernel']}` | {row['config']} | {row['variants']} | "
                     f"{_range(row['regs_min'], row['regs_max'])} | {row['smem_max'] / 1024:.1f} | "
                     f"{_range(row['occ_min'], row['occ_max'])} | {row['limiter']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sm_90a,sm_80", help="comma-separated targets (default: sm_90a,sm_80)")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compile processes")
    p.add_argument("--cases", help="a Python file defining CASES, checked instead of the project's kernels")
    p.add_argument("--only", help="regex on 'op kernel variant': check only the matching cases")
    p.add_argument("--skip", help="regex on 'op kernel variant': leave out the matching cases")
    p.add_argument("--json", help="write every compile result here")
    p.add_argument("--results", help="write the sm_90a resource table into this markdown file (its generated "
                                     "section; benchmarks/RESULTS.md)")
    args = p.parse_args(argv)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    unknown = [a for a in archs if a not in TARGETS]
    if unknown:
        p.error(f"unknown arch {unknown}; choose from {list(TARGETS)}")
    cases = load_cases(args.cases) if args.cases else project_cases()
    if args.only:
        cases = [c for c in cases if re.search(args.only, f"{c.op} {c.kernel} {c.variant}")]
    if args.skip:
        cases = [c for c in cases if not re.search(args.skip, f"{c.op} {c.kernel} {c.variant}")]
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="triton-check-cache-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # read by triton at compile time; the workers inherit it
        results = run(cases, archs, args.jobs)
    rows = summarise(cases, results)
    status = print_report(cases, results, rows)
    print(f"wall time {time.time() - t0:.0f} s with {args.jobs} processes; triton {triton.__version__}, "
          f"ptxas {_ptxas_versions(archs)}")
    if args.json:
        rows_out = []
        for r in results:
            c = cases[r["case"]]
            rows_out.append({**r, "op": c.op, "kernel": c.kernel, "variant": c.variant,
                             "config_label": _config_label(c.configs[r["config"]]), "problems": problems(r)})
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "results": rows_out}, f, indent=1)
    if args.results:
        header = (f"Generated by `python scripts/check_triton_compile.py --results benchmarks/RESULTS.md` "
                  f"(triton {triton.__version__}, ptxas {_ptxas_versions(['sm_90a'])}, no GPU needed). "
                  "One row per kernel and config; `variants` = the constexpr combinations compiled "
                  "(dtype, D, flags), over which regs and warps/SM are ranges. Occupancy is the "
                  "theoretical one on H200 (registers, shared memory and block size; scripts/gpu_resources.py). "
                  "No row spills (the check fails on any spill).")
        replace_section(args.results, "triton-resources", markdown(rows, header),
                        "## Triton kernels: registers, shared memory, occupancy (sm_90a)")
    return status


def _ptxas_versions(archs: list[str]) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    vs = []
    for a in archs:
        tool = get_ptxas(TARGETS[a])
        vs.append(f"{tool.version} ({a})")
    return ", ".join(vs)


if __name__ == "__main__":
    sys.exit(main())
