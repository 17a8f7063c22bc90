#!/usr/bin/env bash
# The benchmark report: set up, then run the benchmark suites
# (full shapes, a few minutes on 2 cores) and print the comparison table.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh test,bench,model
# shellcheck disable=SC1091
. "${FQGAN_VENV:-.venv}/bin/activate"
python -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
    --benchmark-columns=min,median,mean,rounds --benchmark-sort=name \
    --benchmark-group-by=group "$@"
