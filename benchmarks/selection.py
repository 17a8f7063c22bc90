"""Which benchmark cases a run selects, in one place: the benchmark conftest, the bench files and
tests/test_bench_selection.py read it, and ``python benchmarks/selection.py`` prints the README's
description of the default run.

Three modes:

- **smoke** (``--benchmark-disable`` or ``FQGAN_BENCH_SMOKE=1``, CI's smoke run): every case once, on
  small shapes.
- **default** (``pytest benchmarks/ --benchmark-only``): for every op, the headline shape of its
  family at full size (``DEFAULT`` below), every CPU provider, peaked and flat inputs; about 10
  minutes on 2 cores. The GPU cases (marked ``cuda``, skipped without one) run their whole matrix
  in every timed mode (133 cases: more than the 150-190 s the first H200 run gave them, 2026-12-04;
  scripts/gpu_check.sh narrows them to the headline shapes with a -k filter).
- **full** (``--bench-full`` or ``FQGAN_BENCH_FULL=1``): the whole CPU matrix as well (every shape,
  dtype and sampling setting; 188 CPU cases, 40 minutes on 2 cores, measured 2026-12-04).

Rounds follow pytest-benchmark's rule, ``rounds = max(min_rounds, ceil(max_time / duration))``,
with the suite's ``ROUNDS`` unless ``--benchmark-min-rounds`` / ``--benchmark-max-time`` are given
(benchmarks/conftest.py::timed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

FULL_ENV = "FQGAN_BENCH_FULL"
SMOKE_ENV = "FQGAN_BENCH_SMOKE"

# pytest-benchmark's min_rounds / max_time per case: a case of seconds runs once, one of
# milliseconds for max_time seconds (pytest-benchmark's default max_time; its default min_rounds, 5,
# would run a case of minutes five times). GPU cases take milliseconds: at least 5 rounds.
ROUNDS = {"cpu": {"min_rounds": 1, "max_time": 1.0}, "cuda": {"min_rounds": 5, "max_time": 0.2}}


def mode(config) -> str:
    """``"smoke"``, ``"default"`` or ``"full"`` for a pytest config."""
    if os.environ.get(SMOKE_ENV) == "1" or bool(config.getoption("benchmark_disable", False)):
        return "smoke"
    if os.environ.get(FULL_ENV) == "1" or bool(config.getoption("bench_full", False)):
        return "full"
    return "default"


# -- what a collected case is: op and provider, from its file, function and parameters ---------
OP_OF_FILE = {
    "bench_nearest_code.py": "nearest_code",
    "bench_entropy_loss.py": "entropy_loss",
    "bench_quantizer.py": "quantizer step",
    "bench_linear_cross_entropy.py": "linear_cross_entropy",
    "bench_sample.py": "sample",
    "bench_tokenizer.py": "tokenizer step",
}
OP_OF_FUNCTION = {"test_torch_mm_4096": "torch.mm", "test_train_step": "FAR train step",
                  "test_generate": "FAR generate", "test_generation": "FAR generation vs official loop"}
PROVIDER_OF_FUNCTION = {
    "test_reference_eager": "reference",
    "test_reference_eager_cuda": "reference",
    "test_reference_compiled": "torch.compile",
    "test_reference_compiled_cuda": "torch.compile",
    "test_fused_cpu": "fused cpu",
    "test_fused": "fused cpu",
    "test_fused_triton": "triton",
    "test_fused_cuda": "cuda",
    "test_cce_torch_compile": "cut-cross-entropy",
    "test_torch_mm_4096": "torch.mm",
}
PROVIDER_PARAMS = ("provider", "index_type", "heads", "sampler")  # parametrised providers
# a parametrised provider's value -> the suite's name for it (on a CUDA case the fused one is named
# by its backend; "fused" there is the quantizer on backend auto)
PROVIDER_NAMES = {"eager": "reference", "reference": "reference", "compiled": "torch.compile",
                  "fused": "fused cpu", "IndexFlatL2": "faiss IndexFlatL2", "IndexFlatIP": "faiss IndexFlatIP",
                  "liger": "liger-kernel", "cce": "cut-cross-entropy cce", "triton": "triton", "cuda": "cuda"}
FUSED = ("fused cpu", "cuda", "triton", "fused (auto)")  # the subject of a row, in this order of preference
REFERENCE = "reference"


@dataclass(frozen=True)
class Case:
    op: str
    provider: str
    inputs: str | None  # "peaked", "flat", or None where a benchmark has no such pair
    device: str  # "cpu" or "cuda"


def describe(nodeid: str, params: dict, cuda: bool) -> Case:
    """The op, provider, input kind and device of one collected benchmark case."""
    path, _, name = nodeid.partition("::")
    function = name.split("[")[0]
    file = os.path.basename(path)
    op = OP_OF_FUNCTION.get(function) or OP_OF_FILE.get(file, file)
    provider = next((str(params[p]) for p in PROVIDER_PARAMS if p in params), None)
    if provider is None:
        provider = PROVIDER_OF_FUNCTION.get(function, function)
    else:
        provider = PROVIDER_NAMES.get(provider, provider)
        if cuda and provider == "fused cpu":
            provider = "fused (auto)"
    inputs = params.get("inputs")
    return Case(op, provider, str(inputs) if inputs is not None else None, "cuda" if cuda else "cpu")


# -- the default selection: what README says a plain `pytest benchmarks/ --benchmark-only` runs --
@dataclass(frozen=True)
class Headline:
    op: str
    shape: str  # the headline shape, in words
    providers: tuple[str, ...]  # every CPU provider of the op in the default run
    cases: int  # CPU cases collected in the default run (a peer that is not installed is skipped at run time)
    note: str = ""
    flat_only: tuple[str, ...] = ()  # providers the default run times on flat inputs only


DEFAULT = (
    Headline("nearest_code", "N = 4096, K = 16384, D = 8, k = 3, fp32",
             ("reference", "torch.compile", "fused cpu", "faiss IndexFlatL2", "faiss IndexFlatIP"), 10),
    Headline("torch.mm", "4096^3 fp32 (the machine's matmul rate)", ("torch.mm",), 1),
    Headline("entropy_loss", "fwd+bwd, N = 4096, K = 16384, D = 8, k = 3",
             ("reference", "torch.compile", "fused cpu"), 6),
    Headline("quantizer step", "fwd+bwd, FQGAN-Triple, N = 4096 tokens, K = 16384",
             ("reference", "torch.compile", "fused cpu"), 6),
    Headline("linear_cross_entropy", "fwd+bwd, k = 3, N = 4096, H = 1024, V = 16384, fp32 and bf16",
             ("reference", "torch.compile", "fused cpu", "cut-cross-entropy"), 13,
             "on peaked inputs the reference runs in fp32 only, one round, and torch.compile not at all (PyTorch's "
             "GEMMs over subnormal gradients: minutes a call on Intel CPUs; --bench-full runs them)",
             flat_only=("torch.compile",)),
    Headline("sample", "B = 64 (x2 with CFG), V = 16384, fp32, k = 3 factor steps, top-k + top-p",
             ("reference", "torch.compile", "fused cpu"), 6),
    Headline("FAR train step", "FAR-B width (dim 1024, 2 + 1 layers), B = 4, T = 256, k = 2, V = 16384",
             ("fused cpu", "reference"), 2),
    Headline("tokenizer step", "FQGAN-Dual-16, 2 x 3 x 256 x 256, every loss on", ("fused cpu", "reference"), 2),
)


def default_cpu_cases() -> int:
    return sum(h.cases for h in DEFAULT)


def readme_text() -> str:
    """The paragraph README gives the default benchmark run (timings are filled in by hand)."""
    lines = [f"`pytest benchmarks/ --benchmark-only` runs {default_cpu_cases()} CPU cases by default: for every op "
             "the headline shape of its family at full size, on peaked and flat inputs, every provider checked "
             "against the reference before it is timed:"]
    for h in DEFAULT:
        lines.append(f"- {h.op}: {h.shape}; {', '.join(h.providers)} ({h.cases} case{'s' if h.cases > 1 else ''})"
                     + (f"; {h.note}" if h.note else ""))
    lines.append("`--bench-full` (or `FQGAN_BENCH_FULL=1`) adds the rest of the matrix; the GPU cases (marked "
                 "`cuda`) run whole whenever a GPU is present.")
    return "\n".join(lines)


if __name__ == "__main__":
    print(readme_text())
