#!/usr/bin/env bash
# GPU check for a machine with a CUDA GPU (the H200 test machine: torch 2.11 + CUDA 13.0, its own
# Triton, nvcc and ninja, no network; one call of at most 10 minutes). Builds the extension in place
# (nothing is downloaded) unless prebuilt modules for this Python and these sources are already in
# fqgan_kernels/, prints fk.backends(), runs `pytest -m cuda` (in parallel with pytest-xdist when it
# is installed: Triton's compiles are CPU-bound) and the GPU benchmarks, and prints a compact
# benchmark table last. Wheels in .whl/ (peers such as liger-kernel, cut-cross-entropy) are
# installed into a temporary folder first. Logs (and the benchmark JSON) go to $OUT when it is set,
# else to a temp folder. Every step runs even if an earlier one failed; the exit status is non-zero
# if any did. The last table is the one to paste into benchmarks/RESULTS.md: per benchmark row the
# measured min / median and the ratio to the H200 roofline bound of its composition
# (scripts/roofline.py), so a kernel far from its bound shows on the first run.
#   GPU_CHECK_TEST_TIMEOUT / GPU_CHECK_BENCH_TIMEOUT (s): per-step limits (default 180 / 150; the build gets 240).
#   GPU_CHECK_BUILD=0 / GPU_CHECK_CEILINGS=0 / GPU_CHECK_TESTS=0 / GPU_CHECK_BENCH=0: skip a step
#   (with GPU_CHECK_BENCH=0 and a bench.json already in $OUT, the table is made from that file:
#   tests/test_gpu_checks.py runs the script so on a CPU machine). GPU_CHECK_BENCH_K: a -k filter
#   for the benchmarks.
#   Extra arguments go to the test step's pytest (e.g. -k nearest_code).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LOGS="${OUT:-$(mktemp -d -t fqgan_gpu_check.XXXXXX)}"
mkdir -p "$LOGS"
PY="${PYTHON:-$(command -v python || command -v python3)}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
declare -A STATUS=()
ORDER=()

step() {  # step NAME TIMEOUT_S CMD...: runs CMD with its output in $LOGS/NAME.log, records the status
  local name="$1" limit="$2"
  shift 2
  local t0=$SECONDS rc=0
  echo "== $name: $*"
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1 || rc=$?
  STATUS[$name]="rc=$rc $((SECONDS - t0))s"
  ORDER+=("$name")
  tail -n 25 "$LOGS/$name.log"
  return 0
}

{
  echo "host: $(hostname)  $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: n/a"
  "$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())' || true
  "$PY" -c 'import triton; print("triton", triton.__version__)' 2>/dev/null || echo "triton: not installed"
  command -v nvcc >/dev/null && nvcc --version | tail -n 1 || echo "nvcc: not found"
} 2>&1 | tee "$LOGS/env.log"

# 0. Carried wheels (no network there): into a temporary folder on PYTHONPATH.
if compgen -G ".whl/*.whl" >/dev/null; then
  SITE="$(mktemp -d -t fqgan_site.XXXXXX)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:$SITE" && echo "installed: $(ls .whl | tr '\n' ' ')"
fi

# torch's CUDA headers include cusparse.h etc.; a toolkit without them needs the venv's nvidia wheel headers.
CU_INC="$("$PY" - <<'PYEOF' 2>/dev/null || true
import glob, os, site
from torch.utils.cpp_extension import CUDA_HOME
if CUDA_HOME and not os.path.exists(os.path.join(CUDA_HOME, "include", "cusparse.h")):
    for d in site.getsitepackages():
        hits = sorted(glob.glob(os.path.join(d, "nvidia", "cu*", "include")))
        if hits:
            print(hits[0])
            break
PYEOF
)"
[[ -n "$CU_INC" ]] && export CPATH="$CU_INC${CPATH:+:$CPATH}" && echo "CPATH += $CU_INC"

# 1. Build in place (CPU + CUDA extensions), no network; skipped when prebuilt modules match the sources.
if [[ "${GPU_CHECK_BUILD:-1}" == 0 ]]; then
  echo "build: skipped (GPU_CHECK_BUILD=0)"
elif "$PY" - <<'PYEOF'
import importlib, sys
from fqgan_kernels import _build, _ext
for kind, name in (("cpu", _build.CPU_EXT_NAME), ("cuda", _build.CUDA_EXT_NAME)):
    try:
        built = importlib.import_module(name).sources_digest()
    except Exception as e:
        sys.exit(f"build needed: {name}: {e}")
    if built != _ext._digest(kind):
        sys.exit(f"build needed: {name} is stale")
print("prebuilt extensions match the sources: no build")
PYEOF
then :; else
  step build 240 "$PY" setup.py build_ext --inplace
fi
ls fqgan_kernels/_C*.so 2>/dev/null || echo "no compiled modules in fqgan_kernels/"

# 2. What the package sees, and the card's measured ceilings (copy bandwidth, mm rates).
step backends 60 "$PY" -c 'import fqgan_kernels as f; print(f.backends())'
if [[ "${GPU_CHECK_CEILINGS:-1}" != 0 ]]; then
  step ceilings 60 "$PY" scripts/gpu_ceilings.py
fi

# 3. GPU tests.
XDIST=()
"$PY" -c 'import xdist' 2>/dev/null && XDIST=(-n "${GPU_CHECK_WORKERS:-8}")
if [[ "${GPU_CHECK_TESTS:-1}" != 0 ]]; then
  step tests "${GPU_CHECK_TEST_TIMEOUT:-180}" "$PY" -m pytest -m cuda -q -p no:cacheprovider --tb=short -rfE \
    "${XDIST[@]}" tests/ "$@"
fi

# 4. GPU benchmarks (autotuned Triton), JSON kept for the table.
if [[ "${GPU_CHECK_BENCH:-1}" != 0 ]]; then
  step bench "${GPU_CHECK_BENCH_TIMEOUT:-150}" "$PY" -m pytest benchmarks/ --benchmark-only -m cuda -q \
    -p no:cacheprovider --benchmark-columns=min,median,mean --benchmark-sort=name \
    ${GPU_CHECK_BENCH_K:+-k "$GPU_CHECK_BENCH_K"} --benchmark-json="$LOGS/bench.json"
fi

# 5. Summary and the compact table, last.
echo
echo "== summary (logs in $LOGS)"
failed=0
for name in "${ORDER[@]}"; do
  echo "  $name: ${STATUS[$name]}"
  [[ "${STATUS[$name]}" == rc=0* ]] || failed=1
done
grep -E "passed|failed|error" "$LOGS/tests.log" 2>/dev/null | tail -n 1 | sed 's/^/  tests: /' || true
# One table to paste into benchmarks/RESULTS.md: every benchmark row with measured / roofline bound
# (scripts/roofline.py: bytes, FLOPs and exps of the same shapes on H200).
if [[ -s "$LOGS/bench.json" ]]; then
  echo
  echo "== benchmark table (min / bound: measured over the H200 roofline bound of its composition)"
  "$PY" scripts/roofline.py --bench-json "$LOGS/bench.json" | tee "$LOGS/table.md" \
    || echo "  (roofline join failed: see the JSON in $LOGS/bench.json)"
else
  echo "  (no benchmark table: see $LOGS/bench.log)"
fi
exit $failed
