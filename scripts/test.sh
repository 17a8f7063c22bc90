#!/usr/bin/env bash
# Sets up the venv (scripts/setup_env.sh) and runs lint + the test suite. Triton kernels run under
# TRITON_INTERPRET=1 on machines without a GPU (tests/conftest.py sets it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh test,bench,model
# shellcheck disable=SC1091
. "${FQGAN_VENV:-.venv}/bin/activate"
ruff check .
python -m pytest tests/ -q -p no:cacheprovider "$@"
