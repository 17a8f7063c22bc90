#!/usr/bin/env bash
# The benchmark report: set up, then run the default benchmark selection (for every op the headline
# shape at full size, every provider, peaked and flat inputs; see benchmarks/selection.py), which ends
# with one table (the fused kernels' time and their speed-up over every other provider of the run)
# and writes it as summary.md / summary.json with a speed-up chart, speedup.png, into
# $FQGAN_BENCH_OUT (default .benchmarks/summary). Arguments go to pytest: e.g. --bench-full for the
# whole matrix, -k fused for the fused kernels only. Times: benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh test,bench,model
# shellcheck disable=SC1091
. "${FQGAN_VENV:-.venv}/bin/activate"
OUT=${FQGAN_BENCH_OUT:-.benchmarks/summary}
status=0
python -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider --benchmark-sort=name \
    --benchmark-group-by=group --bench-out "$OUT" "$@" || status=$?
if [[ -f "$OUT/speedup.png" ]]; then
    echo "chart: $OUT/speedup.png (speed-up over the reference per op, one bar per provider, log scale)"
    if [[ -n "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ]] && command -v xdg-open >/dev/null 2>&1; then
        xdg-open "$OUT/speedup.png" >/dev/null 2>&1 || true
    fi
fi
exit "$status"
