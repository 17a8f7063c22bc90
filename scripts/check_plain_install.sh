#!/usr/bin/env bash
# Plain `pip install -e .` (with build isolation, so torch is not importable in setup.py) in a fresh
# venv and a clean copy of the tree: the first use must compile the CPU kernels (one printed line)
# and `fqgan_kernels.backends()` must report the compiled `cpu` backend.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git ls-files -z | xargs -0 -I{} cp --parents {} "$work/" 2>/dev/null || cp -r . "$work/src"
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
pip install -q --disable-pip-version-check torch==2.13.0
pip install -q --disable-pip-version-check -e "$work"
cd "$work"
FQGAN_KERNELS_CACHE="$work/cache" python - <<'PY'
import fqgan_kernels as fk
report = fk.backends()
print(report)
assert report["cpu"].available, report["cpu"].reason
assert "compiled on first use" in report["cpu"].reason, report["cpu"].reason
assert report.auto["cpu"] == "cpu"
print("plain install OK: compiled cpu backend")
PY
# Without the [model] extra (no pillow, torchvision, ...): every --help works, and a command that needs the
# extra says which package to install, in one line (exit 2).
for cmd in "" demo train-tokenizer eval-tokenizer reconstruct extract-codes train-generator sample; do
    fqgan $cmd --help >/dev/null
done
set +e
out=$(fqgan train-generator --codes nowhere 2>&1); code=$?
set -e
echo "$out"
[[ $code == 2 && "$out" == *"pip install 'fqgan-kernels[model]'"* && "$out" != *Traceback* ]]
echo "plain install OK: --help of every command, and the [model] hint"
