#!/usr/bin/env bash
# Creates (or reuses) the project venv and installs the package with its compiled CPU kernels.
# Usage: bash scripts/setup_env.sh [extras]   (default extras: test,bench,model)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${FQGAN_VENV:-.venv}
EXTRAS=${1:-test,bench,model}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
pip install -q --disable-pip-version-check "setuptools>=64" wheel ninja
pip install -q --disable-pip-version-check torch==2.13.0 triton==3.9.0
# --no-build-isolation: setup.py sees the installed torch and compiles the C++ kernels now.
pip install -q --disable-pip-version-check --no-build-isolation -e ".[$EXTRAS]"
if [[ ",$EXTRAS," == *",model,"* ]]; then
    # LPIPS's linear heads ship in the lpips wheel; its dependencies (torchvision) are not needed (and
    # PyPI's torchvision does not import beside the CPU torch 2.13 wheel), so no-deps.
    pip install -q --disable-pip-version-check --no-deps lpips
fi
python -c "import fqgan_kernels as fk; print(fk.backends())"
