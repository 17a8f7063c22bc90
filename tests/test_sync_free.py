"""No check of the library synchronises with a GPU (issue 10, section 2).

Value checks (NaN/Inf scans, index ranges, sampling parameters) read data on the host only for CPU
tensors; for device tensors they are device-side asserts (``torch._assert_async``). On this GPU-less
machine the device path is exercised by making ``_validate.on_host`` answer False ("these tensors
live on a GPU") while a dispatch mode fails the test on any op that would read a tensor on the host
(``.item()``, ``bool()``, ``nonzero``, ...). The ``cuda`` test does the same on a real GPU with
``torch.cuda.set_sync_debug_mode("error")``.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fqgan_kernels as fk
from fqgan_kernels import _validate

# aten ops that copy a value to the host (each one a device sync on CUDA)
_HOST_READS = ("aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.nonzero", "aten.equal",
               "aten.allclose", "aten.tolist", "aten.unique", "aten._unique")


class NoHostReads(TorchDispatchMode):
    """Fails on any op that reads tensor values on the host; records the device-side asserts."""

    def __init__(self):
        super().__init__()
        self.asserts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(_HOST_READS):
            raise AssertionError(f"host read (a device sync on CUDA): {name}")
        self.asserts += name.startswith("aten._assert_async")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def as_if_on_gpu(monkeypatch):
    monkeypatch.setattr(_validate, "on_host", lambda x: False)


def _step(check_finite: bool):
    """Every public op, forward and backward, with every value check on."""
    k, N, K, D, V, H = 3, 40, 64, 8, 50, 16
    z = torch.randn(N, k, D, requires_grad=True)
    cb = torch.randn(k, K, D, requires_grad=True)
    codes, _ = fk.nearest_code(z, cb, check_finite=check_finite)
    ent = fk.entropy_loss(z, cb, check_finite=check_finite)
    vq = fk.vq_losses(z, codes, disentangle_weight=0.1, check_finite=check_finite)
    hidden = torch.randn(k, N, H, requires_grad=True)
    weight = torch.randn(k, V, H, requires_grad=True)
    targets = torch.randint(0, V, (k, N))
    targets[0, 0] = -100
    lce = fk.linear_cross_entropy(hidden, weight, targets)
    (ent.sum() + vq.codebook.sum() + vq.disentangle + lce.loss).backward()
    fk.sample(torch.randn(4, V), torch.randn(4, V), cfg_scale=torch.full((4,), 2.0), temperature=torch.ones(4),
              top_k=torch.full((4,), 5), top_p=torch.full((4,), 0.9), uniform=torch.rand(4, dtype=torch.float64),
              check_finite=check_finite)
    q = fk.FactorizedQuantizer(num_codebooks=3, codebook_size=K, codebook_dim=D, entropy_weight=0.03,
                               disentangle_weight=0.1)
    _, indices, loss = q(torch.randn(2, k * D, 3, 3, requires_grad=True))
    loss.backward()
    q.decode_indices(indices)


@pytest.mark.parametrize("check_finite", [True, False], ids=["scan-on", "scan-off"])
def test_checks_never_read_device_tensors_on_the_host(as_if_on_gpu, check_finite):
    _validate.set_check_finite(check_finite)
    try:
        with NoHostReads() as mode:
            _step(check_finite)
    finally:
        _validate.set_check_finite(True)
    # index ranges (targets, decode_indices) and the sample's parameters and result are checked either way
    assert mode.asserts >= (4 if not check_finite else 8), mode.asserts


def test_the_host_path_does_read_cpu_tensors():
    """The detector works: on CPU (host checks), the same step reads values on the host."""
    with pytest.raises(AssertionError, match="host read"), NoHostReads():
        _step(True)


@pytest.mark.parametrize("case", ["targets", "indices", "nan", "top_p"])
def test_device_checks_still_fire(as_if_on_gpu, case):
    """On the device path a bad value is still caught (here on CPU, _assert_async raises at once;
    on a GPU it stops the process at the next sync with the same message)."""
    with pytest.raises(RuntimeError, match="fqgan_kernels: "):
        if case == "targets":
            fk.linear_cross_entropy(torch.randn(1, 3, 4), torch.randn(1, 5, 4), torch.tensor([[0, 5, 1]]))
        elif case == "indices":
            q = fk.FactorizedQuantizer(num_codebooks=2, codebook_size=8, codebook_dim=2)
            q.decode_indices(torch.tensor([[[[8]], [[0]]]]))
        elif case == "nan":
            fk.nearest_code(torch.full((2, 1, 3), float("nan")), torch.randn(1, 4, 3))
        else:
            fk.sample(torch.randn(2, 5), top_p=torch.tensor([0.5, 1.5]))


@pytest.mark.cuda
def test_cuda_training_step_has_no_sync():
    """On a GPU: a quantizer training step, the LCE heads and a sampling step under
    torch.cuda.set_sync_debug_mode("error") (any synchronising CUDA call raises)."""
    dev = torch.device("cuda")
    q = fk.FactorizedQuantizer(num_codebooks=3, codebook_size=16384, codebook_dim=8, entropy_weight=0.03,
                               disentangle_weight=0.1).to(dev).train()
    z = torch.randn(4, 24, 16, 16, device=dev, requires_grad=True)
    hidden = torch.randn(3, 512, 64, device=dev, requires_grad=True)
    weight = torch.randn(3, 16384, 64, device=dev, requires_grad=True)
    targets = torch.randint(0, 16384, (3, 512), device=dev)
    logits = torch.randn(8, 16384, device=dev)
    cfg = torch.full((8,), 1.5, device=dev)

    def step():
        _, indices, loss = q(z)
        loss.backward()
        q.decode_indices(indices)
        fk.linear_cross_entropy(hidden, weight, targets).loss.backward()
        fk.sample(logits, logits.flip(0), cfg_scale=cfg, top_k=50, top_p=0.9)

    step()  # the first step loads and autotunes kernels, which may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
