#!/usr/bin/env bash
# Creates (or reuses) the project venv and installs the package with its compiled CPU kernels.
# Usage: bash scripts/setup_env.sh [extras]   (default extras: test,bench,model,eval)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${FQGAN_VENV:-.venv}
EXTRAS=${1:-test,bench,model,eval}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
pip install -q --disable-pip-version-check "setuptools>=64" wheel ninja
pip install -q --disable-pip-version-check torch==2.13.0 triton==3.9.0
if [[ ",$EXTRAS," == *",model,"* || ",$EXTRAS," == *",eval,"* ]]; then
    # The torchvision paired with torch 2.13.0, before the extra asks for torchvision>=0.19 (which pip
    # would otherwise meet with the newest torchvision and the torch it pins). PyPI has only its CUDA
    # build: --no-deps keeps the CPU torch above. Its C++ ops (nms, roi_align, ...) do not load beside
    # the CPU torch; fqgan imports its Python parts through fqgan/runtime/vision.py.
    pip install -q --disable-pip-version-check --no-deps torchvision==0.28.0
fi
if [[ ",$EXTRAS," == *",eval,"* ]]; then
    # torch-fidelity (the FID Inception, precision / recall) the same way: --no-deps, its requirements (numpy,
    # pillow, tqdm, torch, torchvision) are met by the lines above and the editable install below, and pip must
    # not resolve torch / torchvision again. fqgan imports it after torchvision's door (fqgan/eval/inception.py).
    pip install -q --disable-pip-version-check --no-deps torch-fidelity==0.4.0
fi
# --no-build-isolation: setup.py sees the installed torch and compiles the C++ kernels now.
pip install -q --disable-pip-version-check --no-build-isolation -e ".[$EXTRAS]"
python -c "import fqgan_kernels as fk; print(fk.backends())"
