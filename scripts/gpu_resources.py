"""Kernel resources without a GPU: limits of the target GPUs, theoretical occupancy, parsers for
``cuobjdump --dump-resource-usage`` and ``ptxas -v``, and the generated sections of
benchmarks/RESULTS.md. Standard library only (scripts/check_cuda_compile.sh runs it without torch).

Used by scripts/check_triton_compile.py and scripts/check_cuda_compile.sh. As a script it parses the
``ptxas -v`` logs of the CUDA check (``python scripts/gpu_resources.py cuda LOG...``), prints one line
per kernel and arch, fails (exit 1) on spills / local memory and on shared memory over the limit.

Occupancy follows NVIDIA's occupancy calculator (CUDA C Programming Guide, "Compute Capabilities",
table "Technical Specifications per Compute Capability"; CUDA_Occupancy_Calculator.xls):
registers are allocated per warp in units of 256, shared memory per block in units of 128 bytes
plus 1 KiB reserved by the system per block (``cudaDevAttrReservedSharedMemoryPerBlock``).
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    """Per-SM and per-block limits of one GPU generation (CUDA C Programming Guide, table 21/24)."""

    name: str  # the -arch / --gpu-name value
    capability: int
    gpu: str
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    reg_alloc_unit: int = 256  # registers per warp, allocation granularity
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    smem_per_sm: int = 0  # bytes, largest carve-out
    smem_per_block: int = 0  # bytes, largest opt-in dynamic + static per block
    smem_reserved_per_block: int = 1024
    smem_alloc_unit: int = 128


# H100/H200 (sm_90): 228 KiB shared per SM, 227 KiB per block. A100 (sm_80): 164 KiB / 163 KiB.
SM90 = Arch("sm_90a", 90, "H200", smem_per_sm=228 * 1024, smem_per_block=227 * 1024)
SM80 = Arch("sm_80", 80, "A100", smem_per_sm=164 * 1024, smem_per_block=163 * 1024)
ARCHS = {a.name: a for a in (SM90, SM80)}


@dataclass(frozen=True)
class Occupancy:
    blocks: int  # resident blocks per SM
    warps: int  # resident warps per SM
    limiter: str  # what bounds it: regs, smem, warps or blocks

    @property
    def fraction(self) -> float:
        return self.warps / SM90.max_warps_per_sm


def occupancy(arch: Arch, regs: int, threads: int, smem_bytes: int) -> Occupancy:
    """Theoretical occupancy of a kernel using ``regs`` registers per thread, ``threads`` per block and
    ``smem_bytes`` of shared memory per block (static + dynamic, without the system's 1 KiB)."""
    warps_per_block = math.ceil(threads / 32)
    limits = {"warps": arch.max_warps_per_sm // warps_per_block, "blocks": arch.max_blocks_per_sm}
    if regs > 0:
        per_warp = math.ceil(regs * 32 / arch.reg_alloc_unit) * arch.reg_alloc_unit
        limits["regs"] = (arch.regs_per_sm // per_warp) // warps_per_block
    if smem_bytes > 0:
        per_block = math.ceil((smem_bytes + arch.smem_reserved_per_block) / arch.smem_alloc_unit) * arch.smem_alloc_unit
        limits["smem"] = arch.smem_per_sm // per_block
    order = ["regs", "smem", "warps", "blocks"]  # on a tie, name the resource a kernel controls
    limiter = min(limits, key=lambda k: (limits[k], order.index(k)))
    blocks = limits[limiter]
    if blocks * warps_per_block == arch.max_warps_per_sm:
        limiter = "-"  # full occupancy
    return Occupancy(blocks, blocks * warps_per_block, limiter)


# -- cuobjdump --dump-resource-usage ---------------------------------------------------------------
_RES_FUNC = re.compile(r"^\s*Function (\S+):\s*$")
_RES_FIELDS = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")


def parse_cuobjdump(text: str) -> dict[str, dict[str, int]]:
    """``{kernel: {"REG", "STACK", "SHARED", "LOCAL"}}`` from ``cuobjdump --dump-resource-usage``.
    On sm_90 cubins SHARED includes the 1 KiB system reserve whenever the kernel uses shared memory."""
    out: dict[str, dict[str, int]] = {}
    name = None
    for line in text.splitlines():
        m = _RES_FUNC.match(line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            out[name] = {k: int(v) for k, v in _RES_FIELDS.findall(line)}
            name = None
    return out


# -- ptxas -v --------------------------------------------------------------------------------------
@dataclass
class PtxasEntry:
    kernel: str  # mangled name
    arch: str
    regs: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0  # static shared memory, bytes (no system reserve)
    lmem: int = 0  # local memory other than the stack frame, bytes


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_PTXAS_LMEM = re.compile(r"(\d+) bytes lmem")


def parse_ptxas(text: str) -> list[PtxasEntry]:
    """Every entry function of a ``ptxas -v`` (or ``nvcc -Xptxas -v``) log."""
    entries: list[PtxasEntry] = []
    cur: PtxasEntry | None = None
    for line in text.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            cur = PtxasEntry(m.group(1), m.group(2))
            entries.append(cur)
            continue
        if cur is None:
            continue
        if m := _PTXAS_FRAME.search(line):
            cur.stack, cur.spill_stores, cur.spill_loads = (int(g) for g in m.groups())
        if m := _PTXAS_USED.search(line):
            cur.regs = int(m.group(1))
            if s := _PTXAS_SMEM.search(line):
                cur.smem = int(s.group(1))
            if s := _PTXAS_LMEM.search(line):
                cur.lmem = int(s.group(1))
    return entries


def demangle(names: list[str]) -> list[str]:
    """Readable kernel names (``nearest_code_search_kernel<float, 8, 4>``): ``c++filt`` (binutils),
    then namespaces and the parameter list dropped. Names stay mangled where c++filt is missing."""
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return list(names)
    result = []
    for full in out.splitlines():
        full = re.sub(r"^void ", "", full)
        depth, cut = 0, len(full)
        for pos, ch in enumerate(full):  # the parameter list: the first '(' outside template brackets
            depth += ch == "<"
            depth -= ch == ">"
            if ch == "(" and depth == 0 and not full[pos:].startswith("(anonymous"):
                cut = pos
                break
        name = full[:cut]
        name = re.sub(r"^.*::(?=[^:<]*(<|$))", "", name)
        name = name.replace("__nv_bfloat16", "bf16").replace("__half", "half")
        result.append(name)
    return result


# -- the CUDA kernels' launch shapes (not in the cubin: read from csrc/cuda/*.cu) ----------------------
# (regex on the demangled name, threads per block, dynamic shared memory in bytes as a function of
# the template arguments); the .cu line each figure comes from is named.
def _nearest_search_smem(args: list[str]) -> int:
    dp = int(args[1])
    tile_k = 2048 // dp  # kTileFloats / DP
    return (2 * tile_k * dp + 2 * tile_k) * 4  # launch_search: (2 * TILE_K * DP + 2 * TILE_K) * sizeof(float)


CUDA_LAUNCH = [
    (r"^nearest_code_search_kernel", 256, _nearest_search_smem),  # nearest_code.cu kThreads
    (r"^nearest_code_(prep|generic)_kernel", 256, None),  # nearest_code.cu kThreads
    (r"^entropy_", 128, None),  # entropy_loss.cu kThreads
    (r"^lce_epilogue_kernel", 512, None),  # linear_cross_entropy.cu kThreads
    (r"^vq_losses_sum_kernel", 128, None),  # vq_losses.cu: <<<(slots + 127) / 128, 128>>>
    (r"^vq_losses_", 256, None),  # vq_losses.cu kThreads
    (r"^sample_kernel", 512, None),  # sample.cu kThreads
]


# Kernels allowed a stack frame without spills: a per-thread array indexed at run time, which ptxas
# must place in local memory. Every other stack frame fails the check. (name prefix, why)
LOCAL_ARRAYS_OK = {
    "vq_losses_backward_kernel": "float w[kVQLossMaxK] (32 floats, 128 B): the disentanglement weight of "
                                 "each sub-codebook b < k, k known at run time only",
}


def cuda_launch(demangled: str) -> tuple[int | None, int]:
    """(threads per block, dynamic shared bytes) of a CUDA kernel, or (None, 0) if unknown."""
    m = re.match(r"([^<]+)(?:<(.*)>)?", demangled)
    base, args = m.group(1), [a.strip() for a in (m.group(2) or "").split(",") if a.strip()]
    for pattern, threads, smem in CUDA_LAUNCH:
        if re.search(pattern, base):
            return threads, smem(args) if smem else 0
    return None, 0


def check_cuda(logs: list[str], results: str | None = None) -> int:
    """Prints registers, stack, spills and shared memory of every kernel in the ``ptxas -v`` logs,
    with the H200 occupancy; returns 1 if any kernel spills, uses local memory or exceeds the
    shared-memory limit of its arch, or has no known launch shape, else 0."""
    rows = []
    failed = 0
    for path in logs:
        with open(path) as f:
            entries = parse_ptxas(f.read())
        for e, name in zip(entries, demangle([e.kernel for e in entries])):
            arch = ARCHS.get(e.arch)
            threads, dyn = cuda_launch(name)
            problems, notes = [], []
            local_ok = next((why for prefix, why in LOCAL_ARRAYS_OK.items() if name.startswith(prefix)), None)
            if e.spill_stores or e.spill_loads or e.lmem:
                problems.append(f"spills (spill stores {e.spill_stores} B, loads {e.spill_loads} B, "
                                f"stack {e.stack} B, lmem {e.lmem} B)")
            elif e.stack and not local_ok:
                problems.append(f"stack frame of {e.stack} B without spills (a local array): remove it or "
                                "list the kernel in LOCAL_ARRAYS_OK (scripts/gpu_resources.py) with the reason")
            elif e.stack:
                notes.append(f"stack {e.stack} B, allowed: {local_ok}")
            if arch and e.smem + dyn > arch.smem_per_block:
                problems.append(f"shared memory {e.smem + dyn} B > {arch.smem_per_block} B per block on {arch.gpu}")
            if threads is None:
                problems.append("unknown block size: add it to CUDA_LAUNCH in scripts/gpu_resources.py")
            occ = occupancy(arch, e.regs, threads, e.smem + dyn) if arch and threads else None
            failed |= bool(problems)
            rows.append((path.rsplit("/", 1)[-1].removesuffix(".log"), name, e.arch, e.regs, e.stack,
                         e.spill_stores + e.spill_loads, e.smem, dyn, threads, occ, problems, notes))
    w = max([len(r[1]) for r in rows] + [6])
    print(f"{'':4}  {'kernel':<{w}}  {'arch':<6}  {'regs':>4}  {'stack':>5}  {'spill':>5}  {'smem':>6}  "
          f"{'dyn':>6}  {'thr':>4}  {'warps/SM (H200)':>15}")
    for _, name, arch, regs, stack, spill, smem, dyn, threads, occ, problems, notes in rows:
        occ_s = f"{occ.warps} ({occ.limiter})" if occ and arch == SM90.name else ""
        mark = "FAIL" if problems else "ok"
        print(f"{mark:<4}  {name:<{w}}  {arch:<6}  {regs:>4}  {stack:>5}  {spill:>5}  {smem:>6}  {dyn:>6}  "
              f"{threads or '?':>4}  {occ_s:>15}")
        for p in problems + notes:
            print(f"      {p}")
    if results:
        header = ("Generated by `CUDA_CHECK_RESULTS=benchmarks/RESULTS.md bash scripts/check_cuda_compile.sh` "
                  "(nvcc with the build's flags plus `-Xptxas -v`; no GPU needed). sm_90a; registers, stack "
                  "frame / spilled bytes, static and dynamic shared memory, block size from the launch in the "
                  ".cu file, theoretical occupancy on H200.")
        replace_section(results, "cuda-resources", header + "\n\n" + cuda_markdown(rows),
                        "## CUDA kernels: registers, shared memory, occupancy (sm_90a)")
    n_fail = sum(bool(r[-2]) for r in rows)
    print(f"{len(rows)} kernel builds checked, {n_fail} failed")
    return 1 if failed else 0


def cuda_markdown(rows) -> str:
    """The CUDA part of the resource table: sm_90a rows, the dtype instantiations of a template
    merged into one row (ranges), H200 occupancy."""
    groups: dict[tuple, list] = {}
    for file, name, arch, regs, stack, spill, smem, dyn, threads, occ, _, _ in rows:
        if arch != SM90.name:
            continue
        generic = re.sub(r"(?<=[<, ])(float|half|bf16)(?=[,>])", "T", name)
        groups.setdefault((file, generic), []).append((regs, stack, spill, smem, dyn, threads, occ))

    def rng(vals):
        lo, hi = min(vals), max(vals)
        return f"{lo}" if lo == hi else f"{lo}-{hi}"

    lines = ["| file | kernel | instances | regs | stack / spill B | static smem B | dynamic smem B | threads | "
             "warps/SM (H200) | limited by |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for (file, name), g in groups.items():
        occs = [o for *_, o in g if o]
        lines.append(f"| {file} | `{name}` | {len(g)} | {rng([x[0] for x in g])} | {rng([x[1] for x in g])} / "
                     f"{rng([x[2] for x in g])} | {rng([x[3] for x in g])} | {rng([x[4] for x in g])} | "
                     f"{g[0][5]} | {rng([o.warps for o in occs]) if occs else '?'} | "
                     f"{'/'.join(sorted({o.limiter for o in occs})) if occs else '?'} |")
    return "\n".join(lines) + "\n"


# -- generated sections of benchmarks/RESULTS.md -----------------------------------------------------
def replace_section(path: str, tag: str, body: str, title: str) -> None:
    """Writes ``body`` between ``<!-- BEGIN tag -->`` and ``<!-- END tag -->`` in ``path``; appends
    the section (with ``title``) if the markers are not there yet."""
    begin, end = f"<!-- BEGIN {tag} -->", f"<!-- END {tag} -->"
    with open(path) as f:
        text = f.read()
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + f"\n\n{title}\n\n{block}\n"
    with open(path, "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cuda", help="check ptxas -v logs of the CUDA kernels")
    c.add_argument("logs", nargs="+")
    c.add_argument("--results", help="write the sm_90a resource table into this markdown file (its generated "
                                      "section; benchmarks/RESULTS.md)")
    args = p.parse_args(argv)
    return check_cuda(args.logs, args.results)


if __name__ == "__main__":
    sys.exit(main())
