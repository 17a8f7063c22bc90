"""evaluate_tokenizer under torch.distributed: 2 ranks (gloo, file:// rendezvous in tmp_path), each
on its strided shard (rank r: images r, r + 2, ...), give the metrics of one process on all images,
and the saved reconstructions are named by their index in the data set."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from fqgan.data.images import to_uint8
from fqgan.eval.tokenizer import evaluate_tokenizer
from fqgan.tokenizer import FQTokenizer
from fqgan.tokenizer.config import TINY

WORLD = 2
N_IMAGES = 7  # odd: the ranks hold 4 and 3 images


class _Features(torch.nn.Module):
    """A cheap 4-d stand-in for the FID network (the plumbing, not the network, is under test)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.proj = torch.nn.Parameter(torch.randn(4, 3, generator=g))

    def forward(self, x):  # x: uint8, the FID network's input
        return torch.einsum("dc,bchw->bd", self.proj, x.float() / 255) / x[0, 0].numel()


def _setup():
    torch.manual_seed(0)
    model = FQTokenizer(TINY).eval()
    g = torch.Generator().manual_seed(11)
    images = torch.rand(N_IMAGES, 3, TINY.image_size, TINY.image_size, generator=g) * 2 - 1
    return model, images


def _worker(rank, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model, images = _setup()
        shard = images[rank::WORLD]
        batches = [shard[i:i + 2] for i in range(0, len(shard), 2)]
        result = evaluate_tokenizer(model, batches, inception=_Features(), save_dir=f"{out}/recon")
        if rank == 0:
            torch.save(result, f"{out}/result.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ddp = torch.load(tmp_path / "result.pt", weights_only=False)
    model, images = _setup()
    single = evaluate_tokenizer(model, [images[:3], images[3:]], inception=_Features())
    assert ddp["num_images"] == single["num_images"] == N_IMAGES
    for key in ("psnr", "ssim", "ssim_official", "rfid"):
        assert ddp[key] == pytest.approx(single[key], rel=1e-9), key
    assert ddp["usage"] == single["usage"]
    np.testing.assert_allclose(ddp["perplexity"], single["perplexity"], rtol=1e-6)
    files = sorted(p.name for p in (tmp_path / "recon").iterdir())
    assert files == [f"{i:06d}.png" for i in range(N_IMAGES)]
    with torch.no_grad():
        recon = model.decode_indices(model.encode(images))
    for i in range(N_IMAGES):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "recon" / f"{i:06d}.png")),
                                      to_uint8(recon[i]).permute(1, 2, 0).numpy())
