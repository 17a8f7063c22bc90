#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu with this machine's nvcc (no torch, no link) for sm_90a and sm_80.
# The .cu files include CUDA headers only, so this runs with the CPU build of torch or none at all.
# One line per file; non-zero exit if any file fails. NVCC=... overrides the compiler.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" ]]; then
  echo "check_cuda_compile: nvcc not found" >&2
  exit 2
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

shopt -s nullglob
files=("$ROOT"/csrc/cuda/*.cu)
if (( ${#files[@]} == 0 )); then
  echo "check_cuda_compile: no csrc/cuda/*.cu files" >&2
  exit 1
fi
status=0
for f in "${files[@]}"; do
  name="$(basename "$f" .cu)"
  start=$SECONDS
  if "$NVCC" -c -std=c++17 -O3 --use_fast_math --expt-relaxed-constexpr -Xcompiler -Wall \
      -gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=sm_80 \
      -I "$ROOT/csrc" -o "$TMP/$name.o" "$f" >"$TMP/$name.log" 2>&1; then
    warn=""
    grep -qi "warning" "$TMP/$name.log" && warn=" (with warnings)"
    echo "ok    csrc/cuda/$name.cu  sm_80 sm_90a  $((SECONDS - start))s$warn"
    [[ -n "$warn" ]] && sed 's/^/      /' "$TMP/$name.log"
  else
    echo "FAIL  csrc/cuda/$name.cu"
    sed 's/^/      /' "$TMP/$name.log"
    status=1
  fi
done
exit $status
