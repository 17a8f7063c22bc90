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
# Then (issue 19) each kernel backend against `reference` in a FAR-B training step and an FQGAN-Dual-16 tokenizer
# training step under bf16 autocast, and FAR generation: the decode-step roofline of FAR-B / FAR-L on H200 and the
# time to sample 50k images, then generate() of FAR-B timed eager and compiled (CUDA graphs) at batch 1 and 64,
# in tokens/s and measured / bound.
#   GPU_CHECK_TEST_TIMEOUT / GPU_CHECK_BENCH_TIMEOUT (s): per-step limits (default 180 / 150; the build gets 240).
#   GPU_CHECK_DEADLINE (s, default 570): no step runs past it (each step's limit is cut to what is left), so the
#   whole check stays one call of under 10 minutes; a step with under 20 s left is skipped and says so.
#   GPU_CHECK_BUILD=0 / GPU_CHECK_CEILINGS=0 / GPU_CHECK_TESTS=0 / GPU_CHECK_BENCH=0 / GPU_CHECK_TRAIN=0 /
#   GPU_CHECK_DECODE=0: skip a step
#   (with GPU_CHECK_BENCH=0 and a bench.json already in $OUT, the table is made from that file:
#   tests/test_gpu_checks.py runs the script so on a CPU machine). GPU_CHECK_BENCH_K: a -k filter
#   for the benchmarks (default: the headline shapes, 88 cases; "" for all 133).
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

DEADLINE="${GPU_CHECK_DEADLINE:-570}"
step() {  # step NAME TIMEOUT_S CMD...: runs CMD with its output in $LOGS/NAME.log, records the status
  local name="$1" limit="$2"
  shift 2
  local t0=$SECONDS rc=0 left=$((DEADLINE - SECONDS))
  if (( left < 20 )); then
    echo "== $name: skipped (${left}s left before the ${DEADLINE}s deadline)"
    STATUS[$name]="skipped (deadline)"
    ORDER+=("$name")
    return 0
  fi
  (( limit > left - 5 )) && limit=$((left - 5))
  echo "== $name (limit ${limit}s): $*"
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

# 4. GPU benchmarks (autotuned Triton), JSON kept for the table. Each finished case is also appended to
#    bench_rows.jsonl (benchmarks/conftest.py, FQGAN_BENCH_ROWS): pytest-benchmark writes its JSON only at the
#    session's end, so a bench step stopped by its limit (the H200's 133 cuda cases did not fit 190 s on
#    2026-12-04) still gives the table of the cases it finished. Failures print one line each (-rfE).
if [[ "${GPU_CHECK_BENCH:-1}" != 0 ]]; then
  # The headline shapes by default (88 of the 133 cuda cases: not the second N, H or k of a family, nor plain
  # sampling); GPU_CHECK_BENCH_K="" runs them all, or give another -k expression.
  BENCH_K="${GPU_CHECK_BENCH_K-not N8192 and not H1280 and not k2 and not plain}"
  BENCH_K="${BENCH_K:-not __none__}"
  rm -f "$LOGS/bench_rows.jsonl"
  export FQGAN_BENCH_ROWS="$LOGS/bench_rows.jsonl"
  step bench "${GPU_CHECK_BENCH_TIMEOUT:-150}" "$PY" -m pytest \
    benchmarks/ --benchmark-only -m cuda -q -rfE --tb=line -p no:cacheprovider \
    --benchmark-columns=min,median,mean --benchmark-sort=name \
    -k "$BENCH_K" --benchmark-json="$LOGS/bench.json"
  if [[ ! -s "$LOGS/bench.json" && -s "$LOGS/bench_rows.jsonl" ]]; then
    "$PY" -c 'import json, sys; rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]; json.dump({"benchmarks": rows}, open(sys.argv[2], "w"))' \
      "$LOGS/bench_rows.jsonl" "$LOGS/bench.json" \
      && echo "bench: stopped early; the table has the $(wc -l <"$LOGS/bench_rows.jsonl") cases it finished"
  fi
  unset FQGAN_BENCH_ROWS
fi

# 5. Training steps with each kernel backend against `reference`, bf16 autocast (issue 19).
HAS_GPU="$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)"
if [[ "${GPU_CHECK_TRAIN:-1}" != 0 && "$HAS_GPU" == 1 ]]; then
  cat >"$LOGS/train_backends.py" <<'PYEOF'
"""One training step per kernel backend, bf16 autocast, against backend `reference`: FAR-B (k = 2, V = 16384,
B = 4, T = 256; the heads' linear_cross_entropy) and FQGAN-Dual-16 (2 x 3 x 256 x 256: the quantizer's nearest
code, entropy and VQ losses, pixel and GAN losses; LPIPS and teachers off: no weight files). Prints per backend
the median step time of 3, the loss and the largest gradient difference relative to reference's gradient norm.
--device cpu --small: the same on tiny presets (a dry run without a GPU)."""
import argparse
import time

import torch

from fqgan.generator import FAR, FARConfig
from fqgan.tokenizer import FQTokenizer, TokenizerLoss, TokenizerLossConfig, get_preset

p = argparse.ArgumentParser()
p.add_argument("--device", default="cuda")
p.add_argument("--small", action="store_true")
a = p.parse_args()
dev = torch.device(a.device)
BACKENDS = ["reference", "torch"] + (["triton", "cuda"] if dev.type == "cuda" else ["cpu"])
TOL = 5e-2  # bf16 autocast: the backends differ in summation order only


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def far():
    torch.manual_seed(0)
    c = FARConfig.from_preset("FAR-tiny" if a.small else "FAR-B", num_factors=2, num_classes=1000,
                              vocab_size=512 if a.small else 16384, block_size=16 if a.small else 256)
    model = FAR(c).to(dev).eval()  # eval: no dropout draws, gradients all the same
    with torch.no_grad():
        model.head.normal_(0.0, 2.0 / c.dim**0.5)  # the official init zeroes the heads
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, c.vocab_size, (4, 2, c.block_size), generator=g).to(dev)
    lab = torch.randint(0, c.num_classes, (4,), generator=g).to(dev)

    def step(backend):
        model.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = model(idx, lab, backend=backend).loss
        loss.backward()
        return loss, model

    return step


def tokenizer():
    torch.manual_seed(0)
    cfg = get_preset("tiny" if a.small else "fqgan-dual-16")
    model = FQTokenizer(cfg).to(dev).train()
    loss_fn = TokenizerLoss(TokenizerLossConfig(disc_start=0, perceptual_weight=0.0, semantic_weight=0.0),
                            cfg).to(dev).train()
    x = (torch.rand(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1)) * 2 - 1).to(dev)

    def step(backend):
        model.quantizer.backend = backend
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            out = model(x)
            loss = loss_fn.generator_loss(x, out, step=1, last_layer=model.last_layer).loss
        loss.backward()
        return loss, model

    return step


failed = 0
for name, make in (("FAR-B train step" if not a.small else "FAR-tiny train step", far),
                   ("tokenizer train step" + (" (tiny)" if a.small else " (FQGAN-Dual-16)"), tokenizer)):
    step = make()
    ref_loss, module = step("reference")
    ref_grads = {n: q.grad.float().clone() for n, q in module.named_parameters() if q.grad is not None}
    print(f"{name}: backend | median ms of 3 | loss | max over parameters |grad - ref| / max(|ref grad|, 1% |all ref grads|)")
    for backend in BACKENDS:
        try:
            loss, module = step(backend)
        except Exception as e:  # a backend this machine cannot run is not a failure; other errors are
            text = str(e).splitlines()[0][:110] if str(e) else type(e).__name__
            unavailable = "cannot run" in text
            failed += not unavailable
            print(f"  {backend:9s} | {'unavailable' if unavailable else 'FAIL'}: {text}")
            continue
        times = []
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            loss, module = step(backend)
            sync()
            times.append(time.perf_counter() - t0)
        # Per parameter, relative to its reference gradient, floored at 1% of the whole gradient's norm: a
        # parameter whose true gradient is zero (an attention key bias: softmax ignores a shift) has rounding
        # noise on both sides, and noise over noise is ~1 (seen on the H200, 2026-12-04).
        floor = 1e-2 * torch.stack([g.norm() for g in ref_grads.values()]).norm()
        worst = max(((q.grad.float() - ref_grads[n]).norm() / torch.maximum(ref_grads[n].norm(), floor)).item()
                    for n, q in module.named_parameters() if n in ref_grads and q.grad is not None)
        dl = abs(loss.item() - ref_loss.item()) / max(abs(ref_loss.item()), 1e-30)
        bad = worst > TOL or dl > TOL
        failed += bad
        print(f"  {backend:9s} | {1e3 * sorted(times)[1]:9.1f} | {loss.item():.5f} (rel diff {dl:.1e}) | "
              f"{worst:.2e}{'  FAIL' if bad else ''}")
raise SystemExit(1 if failed else 0)
PYEOF
  step train_backends "${GPU_CHECK_TRAIN_TIMEOUT:-150}" "$PY" "$LOGS/train_backends.py" --device cuda
elif [[ "${GPU_CHECK_TRAIN:-1}" != 0 ]]; then
  echo "train_backends: skipped (no CUDA GPU)"
fi

# 6. FAR generation: the decode-step roofline on H200 and the 50k-image prediction (no GPU needed), then FAR-B's
#    generate() eager and compiled (CUDA graphs; the first call compiles 4 graphs) in tokens/s, measured / bound.
if [[ "${GPU_CHECK_DECODE:-1}" != 0 ]]; then
  "$PY" scripts/roofline.py --decode | tee "$LOGS/decode_bound.md" || echo "  (decode roofline failed)"
  if [[ "$HAS_GPU" == 1 ]]; then
    step decode "${GPU_CHECK_DECODE_TIMEOUT:-300}" "$PY" scripts/roofline.py --decode-measure --device cuda \
      --preset FAR-B --batches 1,64 --modes eager,compiled
  else
    echo "decode: generation not timed (no CUDA GPU)"
  fi
fi

# 7. Summary and the compact table, last.
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
