"""Test configuration: the Triton interpreter on GPU-less machines, markers, seeds, tolerances."""

import os

# Must happen before anything imports triton: Triton kernels then run on CPU tensors.
if os.environ.get("TRITON_INTERPRET") is None:
    try:
        import torch as _torch

        _has_gpu = _torch.cuda.is_available()
    except Exception:  # pragma: no cover
        _has_gpu = False
    if not _has_gpu:
        os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from tolerances import HAS_CUDA, TOLERANCES  # noqa: F401  (re-exported for old imports)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def triton_available():
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    return True


@pytest.fixture
def no_kernels(monkeypatch):
    """Every backend's kernel raises: for bad-input tests, which must fail in validation, before any
    kernel runs (the kernels are reached through the ops' dispatch tables, fqgan_kernels/_backend.py)."""
    from fqgan_kernels import _backend

    def boom(*a, **kw):
        raise AssertionError("a kernel ran before validation")

    for op in _backend._OPS.values():
        for table in op.routes.values():
            for name in table:
                monkeypatch.setitem(table, name, _backend.Route(boom))
