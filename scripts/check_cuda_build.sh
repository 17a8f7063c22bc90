#!/usr/bin/env bash
# Full CUDA build of the extension on a machine without a GPU: compiles and links fqgan_kernels._C_cuda
# (the .cu kernels and the torch-facing glue) against the CUDA 13.0 build of torch in its own venv,
# then imports it (import only: nothing runs on a GPU here) and prints its sources_digest().
#
# * venv: ${FQGAN_CUDA_VENV:-~/.cache/fqgan_kernels/venv-cuda}, created once with torch==2.14.1
#   (CUDA 13.0 wheel, ~5.4 GB, resolved from local disk) + ninja, setuptools, numpy.
# * build: `setup.py build_ext --inplace` in a copy of the working tree (tracked + untracked,
#   not ignored) under ${FQGAN_CUDA_BUILD_DIR:-~/.cache/fqgan_kernels/cuda-build}, never in the tree
#   itself (a CUDA .so there would be picked up by the CPU venv). The copy keeps its ninja objects,
#   so a rerun with unchanged sources relinks only.
# * CUDA_HOME: the toolkit prefix of the nvcc on the PATH (folder above its bin); CPATH: the CUDA
#   headers of the venv's nvidia wheels; TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}.
# Quiet on success (three lines); on failure prints the log's tail and exits non-zero.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FQGAN_CUDA_VENV:-$HOME/.cache/fqgan_kernels/venv-cuda}"
BUILD="${FQGAN_CUDA_BUILD_DIR:-$HOME/.cache/fqgan_kernels/cuda-build}"
TORCH_SPEC="${FQGAN_CUDA_TORCH:-torch==2.14.1}"
LOG="$(mktemp -t fqgan_cuda_build.XXXXXX.log)"
start=$SECONDS

fail() {
  echo "check_cuda_build: FAILED: $1 (log: $LOG)" >&2
  tail -n 60 "$LOG" >&2 || true
  exit 1
}

NVCC="$(command -v nvcc || true)"
[[ -n "$NVCC" ]] || fail "nvcc not found on the PATH"
# nvcc may be a wrapper script; its dry run names the real bin folder.
NVCC_BIN="$(echo '' > "$LOG.cu" && "$NVCC" --dryrun -c "$LOG.cu" -o "$LOG.o" 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n1)"
rm -f "$LOG.cu" "$LOG.o"
[[ -n "$NVCC_BIN" ]] || NVCC_BIN="$(dirname "$(readlink -f "$NVCC")")"
export CUDA_HOME="$(cd "$NVCC_BIN/.." && pwd)"
[[ -f "$CUDA_HOME/include/cuda_runtime.h" ]] || fail "CUDA_HOME=$CUDA_HOME has no include/cuda_runtime.h"

# 0. setuptools names objects by source stem: csrc/cuda/<op>.cpp next to csrc/cuda/<op>.cu both become
#    <op>.o and ninja stops with "multiple rules generate ...". Say so before a long build.
dups="$(cd "$ROOT/csrc/cuda" 2>/dev/null && ls *.cpp *.cu 2>/dev/null | sed 's/\.[^.]*$//' | sort | uniq -d | tr '\n' ' ')"
[[ -z "$dups" ]] || fail "csrc/cuda has a .cpp and a .cu with the same stem ($dups): both compile to <stem>.o; rename the glue (e.g. <op>_glue.cpp)"

# 1. The venv (reused when it already has a CUDA build of torch).
PY="$VENV/bin/python"
if ! "$PY" -c 'import torch, ninja, setuptools, numpy; assert torch.version.cuda' >>"$LOG" 2>&1; then
  echo "check_cuda_build: creating $VENV ($TORCH_SPEC, CUDA build; a few minutes)"
  python3 -m venv "$VENV" >>"$LOG" 2>&1 || fail "python3 -m venv $VENV"
  "$VENV/bin/pip" install -q "$TORCH_SPEC" ninja setuptools wheel numpy >>"$LOG" 2>&1 || fail "pip install $TORCH_SPEC"
  "$PY" -c 'import torch; assert torch.version.cuda, "torch is a CPU build"' >>"$LOG" 2>&1 || fail "torch in $VENV"
fi
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
CU_INC="$SITE/nvidia/cu13/include"
[[ -d "$CU_INC" ]] || CU_INC="$(ls -d "$SITE"/nvidia/cu*/include 2>/dev/null | head -n1 || true)"
[[ -d "$CU_INC" ]] || fail "no nvidia/cu*/include under $SITE"
export CPATH="$CU_INC${CPATH:+:$CPATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# The CPU extension is built and tested by the other CI steps: build only the CUDA one here.
export FQGAN_USE_CUDA=1 FQGAN_USE_CPP=1 FQGAN_CUDA_ONLY=1

# 2. A fresh copy of the working tree; the ninja build folder of the last run is kept. One run at a
#    time per build folder (a second run would delete the sources under the first one's compiler).
mkdir -p "$BUILD/src"
exec 9>"$BUILD/.lock"
flock 9 || fail "locking $BUILD"
find "$BUILD/src" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
  | xargs -0 -r sh -c 'for f; do [ -f "$f" ] && printf "%s\0" "$f"; done' sh \
  | tar --null -T - -cf -) | tar -xf - -C "$BUILD/src"
[[ -f "$BUILD/src/setup.py" ]] || fail "copying the working tree to $BUILD/src"

# 3. Build, then load the module by path (not through the package, which may need triton).
(cd "$BUILD/src" && "$PY" setup.py build_ext --inplace) >>"$LOG" 2>&1 || fail "setup.py build_ext"
SO="$(ls "$BUILD"/src/fqgan_kernels/_C_cuda*.so 2>/dev/null | head -n1 || true)"
[[ -n "$SO" ]] || fail "no fqgan_kernels/_C_cuda*.so was built (is the CUDA extension enabled in setup.py?)"
OUT="$(cd "$BUILD/src" && "$PY" - "$SO" <<'PYEOF' 2>>"$LOG"
import importlib.util, sys
import torch  # loads libc10/libtorch for the extension
sys.path.insert(0, ".")
from fqgan_kernels import _build as b  # noqa: E402  (the pure-Python build description)
spec = importlib.util.spec_from_file_location("fqgan_kernels._C_cuda", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
flags = b.cuda_cflags()
want = b.sources_digest(b.cuda_sources(), flags["cxx"] + flags["nvcc"])
got = m.sources_digest()
missing = [n for n in ("nearest_code",) if not hasattr(m, n)]
print(f"{got} {want} torch {torch.__version__} {' '.join(sorted(n for n in dir(m) if not n.startswith('_')))}")
sys.exit(1 if got != want or missing else 0)
PYEOF
)" || fail "importing $SO: $OUT"
read -r digest _want torch_word torch_ver names <<<"$OUT"
echo "check_cuda_build: ok in $((SECONDS - start)) s: fqgan_kernels._C_cuda (${torch_word} ${torch_ver}, sm ${TORCH_CUDA_ARCH_LIST}, CUDA_HOME=$CUDA_HOME)"
echo "sources_digest() = $digest"
echo "functions: $names"
rm -f "$LOG"
