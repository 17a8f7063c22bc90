"""entropy_loss under DDP: 2 ranks (torch.multiprocessing + gloo on CPU, file:// rendezvous in
tmp_path) against one process on the concatenated batch.

Identity checked. Each rank r holds rows B_r (equal sizes) and computes, with ``distributed``
auto-on, ``L_r = mean_{n in B_r} H_n - H(avg_global)``. DDP averages parameter gradients over the
W = 2 ranks, i.e. it trains ``mean_r L_r``; for the single process ``L`` on the concatenated batch:

* value:     ``mean_r L_r == L``
* codebooks: ``mean_r dL_r/de == dL/de``       (what DDP's gradient averaging produces)
* z:         ``(1/W) dL_r/dz_r == dL/dz[B_r]`` (rank r's z-gradient carries W times the weight of
  the global loss; DDP's 1/W on the encoder parameters turns it into dL/dtheta)

and that the per-rank (official FQGAN, ``distributed=False``) loss really differs from it.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fqgan_kernels as fk

WORLD = 2
N_PER_RANK, K, D, k = 48, 300, 8, 3
TEMPERATURE = 0.05


def _inputs():
    g = torch.Generator().manual_seed(1234)
    z = torch.randn(WORLD * N_PER_RANK, k, D, generator=g)
    e = torch.randn(k, K, D, generator=g)
    w = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
    return z, e, w


def _worker(rank: int, store: str, out: str, backend: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        z, e, w = _inputs()
        zr = z[rank * N_PER_RANK:(rank + 1) * N_PER_RANK].clone().requires_grad_()
        er = e.clone().requires_grad_()
        loss = fk.entropy_loss(zr, er, TEMPERATURE, backend=backend)  # distributed=None: auto, on
        (loss.double() * w).sum().backward()
        local = fk.entropy_loss(zr.detach(), er.detach(), TEMPERATURE, backend=backend, distributed=False)
        # what DDP does with the parameter (codebook) gradient: average over ranks
        grad_e = er.grad.clone()
        dist.all_reduce(grad_e)
        grad_e /= WORLD
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= WORLD
        grads_z = [torch.empty_like(zr.grad) for _ in range(WORLD)]
        dist.all_gather(grads_z, zr.grad.contiguous())
        locals_ = [torch.empty_like(local) for _ in range(WORLD)]
        dist.all_gather(locals_, local)
        if rank == 0:
            torch.save({"loss": mean_loss, "grad_e": grad_e, "grad_z": torch.cat(grads_z),
                        "per_rank_official": torch.stack(locals_)}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_two_ranks_match_single_process_on_global_batch(tmp_path, backend):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if backend == "cpu":
        fk._ext.cpu()  # build (or load) the extension once here, not in both ranks at once
    out = str(tmp_path / "result.pt")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_worker, args=(str(tmp_path / "store"), out, backend), nprocs=WORLD, join=True,
                       start_method="spawn")
    got = torch.load(out)

    z, e, w = _inputs()
    z.requires_grad_()
    e.requires_grad_()
    loss = fk.entropy_loss(z, e, TEMPERATURE, backend=backend, distributed=False)
    (loss.double() * w).sum().backward()

    torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["grad_e"], e.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["grad_z"] / WORLD, z.grad, rtol=1e-4, atol=1e-6)
    # the official per-rank form (local avg) is a different loss
    assert (got["per_rank_official"].mean(0) - loss.detach()).abs().max() > 1e-4
