"""The package imports, reports its backends, and chooses them as DESIGN.md section 5 says."""

import os
import subprocess
import sys

import pytest
import torch

import fqgan_kernels as fk


def test_import_and_backends_report():
    report = fk.backends()
    assert set(report) == set(fk.BACKENDS)
    assert report["reference"].available
    assert report["cpu"].available, report["cpu"].reason  # the compiled CPU kernels must be there
    assert report.auto["cpu"] == "cpu"
    text = repr(report)
    assert "cpu" in text and "auto:" in text
    if not torch.version.cuda:
        assert not report["cuda"].available and "not a CUDA build" in report["cuda"].reason


def test_cpu_extension_reports_isa():
    isa = fk._ext.cpu().isa()
    assert isa in ("avx512", "avx2", "portable")


def test_resolve_auto_and_forced():
    cpu = torch.device("cpu")
    assert fk.resolve_backend("nearest_code", None, cpu) == "cpu"
    assert fk.resolve_backend("nearest_code", "reference", cpu) == "reference"
    assert fk.resolve_backend("nearest_code", "AUTO", cpu) == "cpu"
    with pytest.raises(ValueError, match="unknown backend"):
        fk.resolve_backend("nearest_code", "fast", cpu)
    with pytest.raises(RuntimeError, match="cuda"):
        fk.resolve_backend("nearest_code", "cuda", cpu)
    with pytest.raises(ValueError, match="has no 'cpu' backend"):
        fk.resolve_backend("some_op", "cpu", cpu, supported=("reference", "triton"))
    assert fk.resolve_backend("meta_op", None, torch.device("meta")) == "reference"


def test_environment_variable_forces_backend(monkeypatch):
    monkeypatch.setenv("FQGAN_KERNELS_BACKEND", "reference")
    assert fk.resolve_backend("nearest_code", None, torch.device("cpu")) == "reference"
    monkeypatch.setenv("FQGAN_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"\$FQGAN_KERNELS_BACKEND='bogus'"):
        fk.nearest_code(torch.randn(2, 1, 3), torch.randn(1, 4, 3))


def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("GPU present")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fk.resolve_backend("nearest_code", "triton", torch.device("cpu"))


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=300)


def test_use_cpp_zero_falls_back_with_warning():
    code = ("import warnings, torch, fqgan_kernels as fk\n"
            "print(fk.backends())\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    fk.nearest_code(torch.randn(3, 1, 2), torch.randn(1, 4, 2))\n"
            "print('WARN', [str(x.message) for x in w])\n")
    out = _run(code, FQGAN_USE_CPP="0")
    assert out.returncode == 0, out.stderr
    assert "disabled by FQGAN_USE_CPP=0" in out.stdout
    assert "FQGAN_USE_CPP=0" in out.stdout.split("WARN", 1)[1]


def test_forced_cpu_backend_unavailable_raises_why():
    out = _run("import torch, fqgan_kernels as fk\n"
               "fk.nearest_code(torch.randn(3, 1, 2), torch.randn(1, 4, 2), backend='cpu')\n",
               FQGAN_USE_CPP="0")
    assert out.returncode != 0 and "cannot run nearest_code: disabled by FQGAN_USE_CPP=0" in out.stderr
