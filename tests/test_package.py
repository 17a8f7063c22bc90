"""The package imports, exposes exactly its public names, reports its backends, and chooses them as
docs/design.md section 5 says."""

import os
import subprocess
import sys
import time
import types

import pytest
import torch

import fqgan_kernels as fk


def test_import_and_backends_report():
    report = fk.backends()
    assert set(report) == set(fk.BACKENDS)
    assert report["reference"].available and report["torch"].available
    assert report["cpu"].available, report["cpu"].reason  # the compiled CPU kernels must be there
    assert report.auto["cpu"] == "cpu"
    assert report.isa == fk._ext.cpu().isa()
    assert report.cpu_model and report.cpu_model != "unknown"
    text = repr(report)
    assert "cpu" in text and "auto:" in text
    assert f"cpu model: {report.cpu_model} (kernel isa {report.isa}" in text
    if not torch.version.cuda:
        assert not report["cuda"].available and "not a CUDA build" in report["cuda"].reason


def test_cpu_extension_reports_isa():
    isa = fk._ext.cpu().isa()
    assert isa in ("avx512", "avx2", "portable")


def test_resolve_auto_and_forced():
    cpu = torch.device("cpu")
    assert fk.resolve_backend("nearest_code", None, cpu) == "cpu"
    assert fk.resolve_backend("nearest_code", "reference", cpu) == "reference"
    assert fk.resolve_backend("nearest_code", "torch", cpu) == "torch"
    assert fk.resolve_backend("nearest_code", "AUTO", cpu) == "cpu"
    with pytest.raises(ValueError, match="unknown backend"):
        fk.resolve_backend("nearest_code", "fast", cpu)
    with pytest.raises(RuntimeError, match="cuda"):
        fk.resolve_backend("nearest_code", "cuda", cpu)
    with pytest.raises(ValueError, match="sample has no 'torch' backend"):
        fk.resolve_backend("sample", "torch", cpu)
    with pytest.raises(ValueError, match="unknown op 'some_op'"):
        fk.resolve_backend("some_op", "cpu", cpu)
    # Devices without a compiled backend take the memory-safe torch path, or the reference.
    assert fk.resolve_backend("entropy_loss", None, torch.device("meta")) == "torch"
    assert fk.resolve_backend("sample", None, torch.device("meta")) == "reference"


def test_every_op_declares_its_backends():
    from fqgan_kernels import _backend

    assert set(_backend._OPS) == {"nearest_code", "entropy_loss", "vq_losses", "linear_cross_entropy", "sample"}
    for op in _backend._OPS.values():
        assert op.backends[0] == "reference" and {"cpu", "triton", "cuda"} <= set(op.backends), op
        for table in op.routes.values():
            for name, route in table.items():
                # every float64 reroute ends at a backend that takes float64 itself
                assert route.float64 is None or table[route.float64].float64 is None, (op, name)


PUBLIC = {
    "BACKENDS", "BackendInfo", "FactorizedQuantizer", "LinearCrossEntropyOutput", "LossBreakdown",
    "NearestCodeOutput", "QuantizerOutput", "QuantizerOutputWithBreakdown", "VQLossesOutput", "backends",
    "entropy_loss", "linear_cross_entropy", "nearest_code", "outputs", "reference", "resolve_backend", "sample",
    "sample_from_hidden", "set_check_finite", "vq_losses",
}


def test_all_lists_exactly_the_public_names():
    """``__all__`` is the public API: nothing else without a leading underscore is importable from the
    package but its internal modules (``quantizer``), and ``import *`` gives exactly ``__all__``."""
    assert len(fk.__all__) == len(set(fk.__all__)) and set(fk.__all__) == PUBLIC
    exported = {n for n in dir(fk) if not n.startswith("_") and not isinstance(getattr(fk, n), types.ModuleType)}
    assert exported <= PUBLIC, exported - PUBLIC
    namespace = {}
    exec("from fqgan_kernels import *", namespace)
    assert set(namespace) - {"__builtins__"} == PUBLIC


def test_reference_all_lists_exactly_its_ground_truth():
    """``reference.__all__`` is the ground truth defined in reference.py; the shared helpers
    (``_common``) and the runtime's statistics (``_usage``) are not re-exported."""
    ref = fk.reference
    defined = {n for n, v in vars(ref).items()
               if not n.startswith("_") and getattr(v, "__module__", None) == ref.__name__}
    assert set(ref.__all__) == defined
    assert {"code_counts", "perplexity", "codebook_usage"} <= defined  # fqgan/eval reads the last two
    assert not {"ENTROPY_EPS", "L2_EPS", "l2_normalize", "maybe_normalize", "straight_through"} & set(ref.__all__)


@pytest.mark.parametrize("module,names", [
    (fk, ["NearestCode", "LinearCrossEntropy", "VQLossTerms"]),
    (fk.reference, ["NearestCode", "LinearCrossEntropy", "VQLosses", "L2_EPS"]),
])
def test_pre_release_names_are_gone(module, names):
    for name in names:
        with pytest.raises(AttributeError, match=name):
            getattr(module, name)


def test_environment_variable_forces_backend(monkeypatch):
    monkeypatch.setenv("FQGAN_KERNELS_BACKEND", "reference")
    assert fk.resolve_backend("nearest_code", None, torch.device("cpu")) == "reference"
    monkeypatch.setenv("FQGAN_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"\$FQGAN_KERNELS_BACKEND='bogus'"):
        fk.nearest_code(torch.randn(2, 1, 3), torch.randn(1, 4, 3))


def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # part of the resolution cache's key
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
    assert "auto: cpu -> torch" in out.stdout  # the memory-safe path, not the N x K reference
    assert "uses the slow 'torch' backend on CPU because FQGAN_USE_CPP=0" in out.stdout.split("WARN", 1)[1]


def test_forced_cpu_backend_unavailable_raises_why():
    out = _run("import torch, fqgan_kernels as fk\n"
               "fk.nearest_code(torch.randn(3, 1, 2), torch.randn(1, 4, 2), backend='cpu')\n",
               FQGAN_USE_CPP="0")
    assert out.returncode != 0 and "cannot run nearest_code: disabled by FQGAN_USE_CPP=0" in out.stderr


def test_build_guard_removes_a_dead_builds_lock(tmp_path, capsys):
    """A torch build-baton `lock` left by a killed build would make the next first-use compile wait
    forever; the flock guard (released by the OS when its holder dies) removes it."""
    from fqgan_kernels import _ext

    (tmp_path / "lock").write_text("")
    with _ext._build_guard(str(tmp_path)):
        assert not (tmp_path / "lock").exists()
    assert "did not finish" in capsys.readouterr().err


def test_build_guard_waits_for_a_live_builder(tmp_path):
    """While another process holds the guard (a live build), the lock is not touched and we wait."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time\n"
         f"fh = open({str(tmp_path / 'build.flock')!r}, 'w'); fcntl.flock(fh, fcntl.LOCK_EX)\n"
         "print('held', flush=True); time.sleep(1.5)\n"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    (tmp_path / "lock").write_text("")
    from fqgan_kernels import _ext

    t0 = time.monotonic()
    with _ext._build_guard(str(tmp_path)):
        # entered only once the holder let go (it holds the lock 1.5 s after saying so); its exit
        # status may lag the release of the lock, so the wait is what is checked
        assert time.monotonic() - t0 > 1.0
    holder.wait(timeout=30)
