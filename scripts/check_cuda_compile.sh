#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu (or the .cu files given as arguments) with this machine's nvcc for
# sm_90a and sm_80, with the nvcc flags of the real build (fqgan_kernels/_build.py cuda_cflags) plus
# -Xptxas -v, no torch and no link: the .cu files include CUDA headers only, so this runs with the
# CPU build of torch or none at all. Then scripts/gpu_resources.py reads the ptxas reports and prints
# registers, stack, spills, static and dynamic shared memory per kernel and arch, with the
# theoretical occupancy on H200.
# Fails (exit 1) if a file does not compile, if any kernel spills registers or uses a stack frame
# (local memory) not explicitly allowed, or if its shared memory exceeds the arch's per-block limit.
#   NVCC=...                        the compiler (default: nvcc on PATH)
#   CUDA_CHECK_RESULTS=path         also write the sm_90a resource table into that markdown file
#                                   (its generated section; benchmarks/RESULTS.md)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-$(command -v nvcc || true)}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
if [[ -z "$NVCC" ]]; then
  echo "check_cuda_compile: nvcc not found" >&2
  exit 2
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

shopt -s nullglob
if (( $# > 0 )); then files=("$@"); else files=("$ROOT"/csrc/cuda/*.cu); fi
if (( ${#files[@]} == 0 )); then
  echo "check_cuda_compile: no csrc/cuda/*.cu files" >&2
  exit 1
fi

# The build's nvcc flags, read from _build.py by path (importing the package would need torch).
mapfile -t FLAGS < <("$PY" - "$ROOT" <<'PYEOF'
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("_build", os.path.join(sys.argv[1], "fqgan_kernels", "_build.py"))
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)
print("\n".join(build.cuda_cflags()["nvcc"]))
PYEOF
)
if (( ${#FLAGS[@]} == 0 )); then
  echo "check_cuda_compile: could not read the nvcc flags from fqgan_kernels/_build.py" >&2
  exit 1
fi
echo "nvcc: $("$NVCC" --version | tail -n 1)"
echo "flags: ${FLAGS[*]} -Xptxas -v -Xcompiler -Wall"

status=0
logs=()
for f in "${files[@]}"; do
  name="$(basename "$f" .cu)"
  start=$SECONDS
  if "$NVCC" -c "${FLAGS[@]}" -Xptxas -v -Xcompiler -Wall \
      -gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=sm_80 \
      -I "$ROOT/csrc" -o "$TMP/$name.o" "$f" >"$TMP/$name.log" 2>&1; then
    warn=""
    grep -v "^ptxas info" "$TMP/$name.log" | grep -qi "warning" && warn=" (with warnings)"
    echo "ok    ${f#"$ROOT"/}  sm_80 sm_90a  $((SECONDS - start))s$warn"
    [[ -n "$warn" ]] && grep -v "^ptxas info\|^    [0-9]* bytes stack" "$TMP/$name.log" | sed 's/^/      /'
    logs+=("$TMP/$name.log")
  else
    echo "FAIL  ${f#"$ROOT"/}"
    sed 's/^/      /' "$TMP/$name.log"
    status=1
  fi
done

echo
if (( ${#logs[@]} > 0 )); then
  "$PY" "$ROOT/scripts/gpu_resources.py" cuda ${CUDA_CHECK_RESULTS:+--results "$CUDA_CHECK_RESULTS"} "${logs[@]}" \
    || status=1
fi
exit $status
