"""Codebook usage statistics of FactorizedQuantizer: per-step counts by scatter (no torch.unique, no
host sync), running usage over a window of steps, perplexity, and global statistics under
torch.distributed (2 gloo ranks on CPU against one process on the concatenated batch)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

import fqgan_kernels as fk
from fqgan_kernels import _usage, _validate, reference

WORLD = 2
B_PER_RANK, k, K, D = 3, 3, 64, 8


# (N, k, K): one token and one code, odd sizes, more codes than tokens, the real config (k=3, K=16384).
USAGE_SHAPES = [(1, 1, 1), (37, 3, 16), (500, 2, 1000), (4096, 3, 16384)]


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(17)


@pytest.mark.parametrize("n,kk,KK", USAGE_SHAPES)
def test_runtime_statistics_match_reference(n, kk, KK, gen):
    """fqgan_kernels/_usage.py (what the quantizer runs) against the ground truth in reference.py."""
    idx = torch.randint(0, KK, (n, kk), generator=gen)
    counts = _usage.code_counts(idx, KK)
    assert counts.dtype == torch.long and counts.shape == (kk, KK)
    assert torch.equal(counts, reference.code_counts(idx, KK))
    perplexity = _usage.perplexity(counts)
    assert perplexity.dtype == torch.float32 and perplexity.shape == (kk,)
    torch.testing.assert_close(perplexity, reference.perplexity(counts))
    # one step's usage over a window of one step is the fraction of codes with a count
    step = torch.tensor(5)
    last_used = torch.where(counts > 0, step, torch.full_like(counts, -(2**62)))
    torch.testing.assert_close(_usage.recent_usage(step, last_used, 1), reference.codebook_usage(counts))


def test_perplexity_of_no_counts_is_one():
    counts = torch.zeros(2, 8, dtype=torch.long)
    torch.testing.assert_close(_usage.perplexity(counts), torch.ones(2))
    torch.testing.assert_close(_usage.perplexity(counts), reference.perplexity(counts))


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_training_step_has_no_unique_and_no_host_sync():
    q = fk.FactorizedQuantizer(num_codebooks=3, codebook_size=64, codebook_dim=8, entropy_weight=0.03,
                               disentangle_weight=0.1)
    z = torch.randn(2, 24, 4, 4, requires_grad=True)
    _validate.set_check_finite(False)  # the optional NaN scan is the one (documented) sync
    try:
        with _OpRecorder() as rec:
            out = q(z, return_loss_breakdown=True)
            out.loss.backward()
    finally:
        _validate.set_check_finite(True)
    assert not [op for op in rec.ops if "unique" in op], rec.ops
    syncs = [op for op in rec.ops if "_local_scalar_dense" in op or op.startswith("aten.item")
             or "nonzero" in op]
    assert not syncs, syncs


def test_usage_window_and_perplexity():
    q = fk.FactorizedQuantizer(num_codebooks=2, codebook_size=8, codebook_dim=2, usage_window=3,
                               l2_normalize=False)
    with torch.no_grad():
        q.codebooks.copy_(torch.tensor([[float(j), 0.0] for j in range(8)]).expand(2, 8, 2))
    q.train()

    def step(codes_a, codes_b):
        z = torch.tensor([[float(a), 0.0, float(b), 0.0] for a, b in zip(codes_a, codes_b)])  # (N, k*D)
        return q(z, return_loss_breakdown=True)

    out = step([0, 0, 1], [5, 5, 5])
    assert torch.equal(out.indices, torch.tensor([[0, 5], [0, 5], [1, 5]]))
    torch.testing.assert_close(out.breakdown.usage, torch.tensor([2 / 8, 1 / 8]))
    counts = reference.code_counts(out.indices, 8)
    torch.testing.assert_close(out.breakdown.perplexity, reference.perplexity(counts))
    torch.testing.assert_close(out.breakdown.perplexity[1], torch.tensor(1.0))
    step([2], [6])
    out = step([3], [6])  # step 3: codes of step 1 are still within the window of 3
    torch.testing.assert_close(out.breakdown.usage, torch.tensor([4 / 8, 2 / 8]))
    torch.testing.assert_close(q.codebook_usage(window=1), torch.tensor([1 / 8, 1 / 8]))
    out = step([3], [6])  # step 4: step 1 is out of the window
    torch.testing.assert_close(out.breakdown.usage, torch.tensor([2 / 8, 1 / 8]))
    assert int(q.step) == 4 and int(q.last_used[0, 3]) == 4 and int(q.last_used[0, 0]) == 1
    # eval: counts and perplexity of the batch, no step, no usage update
    q.eval()
    out = step([7], [7])
    assert int(q.step) == 4 and int(q.last_used[0, 7]) < 0
    with pytest.raises(ValueError, match="window"):
        q.codebook_usage(window=0)


def _inputs():
    g = torch.Generator().manual_seed(4321)
    z = torch.randn(WORLD * B_PER_RANK, k * D, 4, 4, generator=g)
    w = torch.randn(k, K, D, generator=g)
    return z, w


def _make(w):
    q = fk.FactorizedQuantizer(num_codebooks=k, codebook_size=K, codebook_dim=D, entropy_weight=0.03,
                               disentangle_weight=0.1, usage_window=2)
    with torch.no_grad():
        q.codebooks.copy_(w)
    return q.train()


def _worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        z, w = _inputs()
        q = _make(w)
        zr = z[rank * B_PER_RANK:(rank + 1) * B_PER_RANK]
        results = []
        for shift in (0, 1):  # two steps: the second one on different rows
            res = q(torch.roll(zr, shift, dims=0) if shift else zr, return_loss_breakdown=True)
            results.append(res)
        local = _make(w)  # distributed=False: this rank's statistics only
        local.distributed = False
        res_local = local(zr, return_loss_breakdown=True)
        if rank == 0:
            torch.save({"perplexity": results[0].breakdown.perplexity, "usage": results[1].breakdown.usage,
                        "last_used": q.last_used, "step": q.step,
                        "local_perplexity": res_local.breakdown.perplexity}, out)
        else:
            torch.save({"last_used": q.last_used}, out + ".1")
    finally:
        dist.destroy_process_group()


def test_two_ranks_global_usage_equals_single_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    fk._ext.cpu()  # build (or load) the extension once here, not in both ranks at once
    out = str(tmp_path / "result.pt")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_worker, args=(str(tmp_path / "store"), out), nprocs=WORLD, join=True,
                       start_method="spawn")
    got, got1 = torch.load(out), torch.load(out + ".1")

    z, w = _inputs()
    q = _make(w)
    first = q(z, return_loss_breakdown=True)
    halves = [torch.roll(z[r * B_PER_RANK:(r + 1) * B_PER_RANK], 1, dims=0) for r in range(WORLD)]
    second = q(torch.cat(halves), return_loss_breakdown=True)
    torch.testing.assert_close(got["perplexity"], first.breakdown.perplexity)
    torch.testing.assert_close(got["usage"], second.breakdown.usage)
    assert torch.equal(got["last_used"], q.last_used) and torch.equal(got1["last_used"], q.last_used)
    assert int(got["step"]) == 2
    # per-rank statistics (distributed=False) are those of rank 0's rows alone
    alone = _make(w)
    r0 = alone(z[:B_PER_RANK], return_loss_breakdown=True)
    torch.testing.assert_close(got["local_perplexity"], r0.breakdown.perplexity)
    assert not torch.allclose(got["local_perplexity"], first.breakdown.perplexity)


def _eval_on_rank0_worker(rank: int, store: str, out: str) -> None:
    import datetime
    import time

    # A collective that only rank 0 enters would block until this timeout: the test then fails, not hangs.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    done = out + ".eval-done"
    try:
        torch.set_num_threads(1)
        z, w = _inputs()
        q = _make(w)
        zr = z[rank * B_PER_RANK:(rank + 1) * B_PER_RANK]
        q(zr).loss.backward()  # a training step on both ranks: global statistics, one all-reduce
        if rank == 0:  # evaluation on rank 0 alone, as a training script's periodic eval does
            q.eval()
            with torch.no_grad():
                res = q(zr, return_loss_breakdown=True)
            torch.save({"perplexity": res.breakdown.perplexity, "step": q.step}, out)
            open(done, "w").close()
        else:  # outside any collective until rank 0 is done
            deadline = time.monotonic() + 120
            while not os.path.exists(done):
                if time.monotonic() > deadline:
                    raise TimeoutError("rank 0's eval forward did not finish (it waits for a collective?)")
                time.sleep(0.05)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_eval_forward_on_one_rank_does_not_wait_for_the_others(tmp_path):
    """In eval mode the quantizer all-reduces nothing: a forward on rank 0 alone inside a 2-rank DDP job
    completes, with rank 0's own statistics (a training forward is the collective-safe point)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    fk._ext.cpu()
    out = str(tmp_path / "eval.pt")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_eval_on_rank0_worker, args=(str(tmp_path / "store"), out), nprocs=WORLD, join=True,
                       start_method="spawn")
    got = torch.load(out)
    z, w = _inputs()
    alone = _make(w).eval()
    with torch.no_grad():
        expected = alone(z[:B_PER_RANK], return_loss_breakdown=True).breakdown.perplexity
    torch.testing.assert_close(got["perplexity"], expected)
    assert int(got["step"]) == 1  # eval does not count as a training step
