#!/usr/bin/env bash
# Sets up the venv (scripts/setup_env.sh) and runs lint + the test suite. Triton kernels run under
# TRITON_INTERPRET=1 on machines without a GPU (tests/conftest.py sets it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh test,bench,model,eval
# shellcheck disable=SC1091
. "${FQGAN_VENV:-.venv}/bin/activate"
ruff check .
# Two worker processes (FQGAN_TEST_WORKERS; 0 runs in this process): the Triton interpreter and the
# small-model tests are single-threaded Python, so the 2-core CI machine runs the suite in ~60 % of
# the time of one process.
python -m pytest tests/ -q -p no:cacheprovider -n "${FQGAN_TEST_WORKERS:-2}" "$@"
