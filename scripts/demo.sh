#!/usr/bin/env bash
# The main job: set up the venv (with the model extras), then run the end-to-end demo on the built-in
# sample photographs -- tokenizer, codes, FAR generator, samples, kernel-vs-reference timings -- with no
# download. Writes demo_out/ (report.md first). Extra flags go to `fqgan demo` (see `fqgan demo --help`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh model
# shellcheck disable=SC1091
. "${FQGAN_VENV:-.venv}/bin/activate"
python -m fqgan demo "$@"
