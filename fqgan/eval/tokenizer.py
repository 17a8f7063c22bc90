"""Tokenizer evaluation, the library side of ``fqgan eval-tokenizer`` (metrics over a data set) and
``fqgan reconstruct`` (image files in, reconstructions, token maps and per-image PSNR out).

Metrics, as FQGAN's ``tokenizer/reconstruction_vq_ddp_dual.py`` where it defines them:

* images go through ``indices = model.encode(x)``, ``x_hat = model.decode_indices(indices)``
  (``decode_code`` of the official script);
* PSNR and SSIM per image on 8-bit images (:func:`fqgan.data.images.to_uint8` of both the input and the
  reconstruction), then averaged over images. ``ssim`` is the standard Gaussian-window SSIM;
  ``ssim_official`` repeats the official call (7x7 box window, ``data_range=2`` on [0, 1] images);
* codebook usage (fraction of codes used) and perplexity per sub-codebook, from the code histogram
  of the whole evaluation set (the official script reports neither; its training loop shows usage
  over a sliding window of the last 65536 tokens);
* rFID = FID between the Inception features of the inputs and of the reconstructions (torch-fidelity's
  FID Inception, TF 1.x resize, on the 8-bit images: :mod:`fqgan.eval.inception`, the network of
  ``fqgan eval-generator`` too), when the weight file is available.

Under torchrun each rank evaluates every ``world_size``-th image (rank r: images r, r + W, ...) and
the sums are all-reduced, so the numbers do not depend on the number of processes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fqgan.data.images import list_images, load_image, save_comparison_grid, save_image, to_uint8
from fqgan.data.scan import verify_image
from fqgan.eval.fid import FeatureStats, frechet_distance, save_stats
from fqgan.eval.inception import FEATURE_DIM, inception_features
from fqgan.eval.metrics import SSIM_OFFICIAL, SSIM_STANDARD, CodeUsage, MeanMeter, psnr, ssim
from fqgan.runtime.dist import rank_world
from fqgan.runtime.errors import UsageError, UsageTypeError
from fqgan.runtime.sampler import worker_errors_as_one_line

__all__ = ["evaluate_tokenizer", "format_eval_table", "format_reconstruct_table", "mean", "reconstruct_images"]

# -- evaluation -------------------------------------------------------------------------------------
def _batch_images(batch: Any) -> Tensor:
    images = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(images, Tensor):
        raise UsageTypeError(f"data must yield image tensors or (images, ...) tuples, got {type(images).__name__}")
    return images


def _codebook_shape(model: nn.Module) -> tuple[int, int, list[str]]:
    config = getattr(model, "config", None)
    k, size = getattr(config, "num_codebooks", None), getattr(config, "codebook_size", None)
    if not isinstance(k, int) or not isinstance(size, int):
        raise UsageTypeError("model must have config.num_codebooks and config.codebook_size (an FQTokenizer)")
    names = list(getattr(config, "codebook_names", [str(i) for i in range(k)]))
    return k, size, names


@torch.no_grad()
def evaluate_tokenizer(model: nn.Module, data: Iterable[Any], *, num_images: int | None = None,
                       grid_path: str | os.PathLike | None = None, grid_images: int = 8,
                       inception: nn.Module | None = None, rfid_note: str = "",
                       save_dir: str | os.PathLike | None = None, fid_stats_dir: str | os.PathLike | None = None,
                       device: torch.device | str | None = None,
                       on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Reconstruction metrics of ``model`` over ``data`` (see the module docstring).

    :param model: an :class:`~fqgan.tokenizer.FQTokenizer` (``encode``, ``decode_indices``, ``config``);
        run in eval mode (its previous mode is restored).
    :param data: batches of images ``[B, 3, H, W]`` in [-1, 1], or ``(images, labels)`` tuples (what
        a DataLoader over :mod:`fqgan.data` yields). Under torchrun, each rank's own shard.
    :param num_images: stop after this many images (on this rank); default all.
    :param grid_path: write this rank's first ``grid_images`` originals above their reconstructions
        (:func:`fqgan.data.images.save_comparison_grid`) to this PNG (rank 0 only).
    :param inception: the FID network (:func:`~fqgan.eval.inception.load_fid_inception`; any module
        mapping uint8 images ``[B, 3, H, W]`` to ``[B, D]`` features works); ``None`` skips rFID and
        reports ``rfid_note`` as the reason.
    :param save_dir: also write every reconstruction as ``<save_dir>/<index:06d>.png`` (index = position
        in the data set under the strided sharding above), for external FID tools.
    :param fid_stats_dir: also write the Inception statistics of the inputs and the reconstructions
        (``inputs.npz``, ``reconstructions.npz``: ``mu``/``sigma``, the format of pytorch-fid's stats and of
        ADM reference batches, which ``fqgan eval-generator --ref`` reads), rank 0.
    :param on_batch: called with the number of images of each batch (progress bars).
    :returns: ``{"num_images", "psnr", "ssim", "ssim_official", "codebook_names", "usage" [k],
        "perplexity" [k], "rfid" (None when skipped), "rfid_note", "grid" (path or None)}``.
    """
    k, size, names = _codebook_shape(model)
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    rank, world = rank_world()
    if num_images is not None and num_images < 1:
        raise UsageError(f"num_images must be positive, got {num_images}")
    if grid_images < 1:
        raise UsageError(f"grid_images must be positive, got {grid_images}")
    meters = {name: MeanMeter(device) for name in ("psnr", "ssim", "ssim_official")}
    codes = CodeUsage(k, size, device)
    stats: tuple[FeatureStats, FeatureStats] | None = None  # sized by the feature network's first output
    grid_in: list[Tensor] = []
    grid_out: list[Tensor] = []
    seen = 0
    was_training = model.training
    model.eval()
    try:
        with worker_errors_as_one_line():  # a DataLoader worker's error as one line naming the file
            for batch in data:
                if num_images is not None and seen >= num_images:
                    break
                x = _batch_images(batch)
                if num_images is not None:
                    x = x[: num_images - seen]
                x = x.to(device, non_blocking=True)
                indices = model.encode(x)  # [B, k, h, w]
                recon = model.decode_indices(indices)  # [B, 3, H, W]
                x8, r8 = to_uint8(x), to_uint8(recon)
                meters["psnr"].update(psnr(r8, x8))
                meters["ssim"].update(ssim(r8, x8, SSIM_STANDARD))
                meters["ssim_official"].update(ssim(r8, x8, SSIM_OFFICIAL))
                codes.update(indices)
                if inception is not None:
                    fx, fr = inception_features(inception, x), inception_features(inception, recon)
                    if stats is None:
                        stats = (FeatureStats(fx.shape[1], device), FeatureStats(fx.shape[1], device))
                    stats[0].update(fx)
                    stats[1].update(fr)
                if grid_path is not None and rank == 0 and sum(map(len, grid_in)) < grid_images:
                    need = grid_images - sum(map(len, grid_in))
                    grid_in.append(x[:need].float().cpu())
                    grid_out.append(recon[:need].float().cpu())
                if save_dir is not None:
                    for i in range(x.shape[0]):
                        save_image(recon[i].float().cpu(), Path(save_dir) / f"{(seen + i) * world + rank:06d}.png")
                seen += x.shape[0]
                if on_batch is not None:
                    on_batch(x.shape[0])
    finally:
        model.train(was_training)
    for meter in meters.values():
        meter.all_reduce()
    codes.all_reduce()
    total = meters["psnr"].count
    if total == 0:
        raise UsageError("data yielded no images")
    result: dict[str, Any] = {
        "num_images": total,
        "psnr": meters["psnr"].mean(),
        "ssim": meters["ssim"].mean(),
        "ssim_official": meters["ssim_official"].mean(),
        "codebook_names": names,
        "usage": codes.usage().tolist(),
        "perplexity": codes.perplexity().tolist(),
        "rfid": None,
        "rfid_note": rfid_note,
        "grid": None,
    }
    if inception is not None and stats is None:  # no image on this rank: still join the all-reduce
        stats = (FeatureStats(FEATURE_DIM, device), FeatureStats(FEATURE_DIM, device))
    if stats is not None:
        for s in stats:
            s.all_reduce()
        if total < 2:
            result["rfid_note"] = "rFID skipped: it needs at least 2 images"
        else:
            (mu1, sigma1), (mu2, sigma2) = stats[0].mean_cov(), stats[1].mean_cov()
            result["rfid"] = frechet_distance(mu1, sigma1, mu2, sigma2)
            dim = stats[0].dim
            result["rfid_note"] = "" if total > dim else (
                f"rFID from {total} images <= {dim} feature dimensions: rank-deficient covariances, not "
                "comparable with published (50k-image) figures")
            if fid_stats_dir is not None and rank == 0:
                save_stats(Path(fid_stats_dir) / "inputs.npz", mu1, sigma1)
                save_stats(Path(fid_stats_dir) / "reconstructions.npz", mu2, sigma2)
    if grid_path is not None and rank == 0:
        result["grid"] = str(save_comparison_grid(torch.cat(grid_in), torch.cat(grid_out), grid_path,
                                                  nrow=min(grid_images, 8)).path)
    return result


def format_eval_table(result: dict[str, Any]) -> str:
    """The metrics of :func:`evaluate_tokenizer` as a short plain-text table."""
    lines = [f"images         {result['num_images']}",
             f"PSNR           {result['psnr']:.4f} dB",
             f"SSIM           {result['ssim']:.4f}   (official script's settings: {result['ssim_official']:.4f})",
             "rFID           " + (f"{result['rfid']:.4f}" if result["rfid"] is not None else "-")]
    if result["rfid_note"]:
        lines.append(f"               {result['rfid_note']}")
    lines.append("sub-codebook   usage      perplexity")
    for name, u, p in zip(result["codebook_names"], result["usage"], result["perplexity"]):
        lines.append(f"{name:<14} {u:8.4f}   {p:10.2f}")
    if result["grid"]:
        lines.append(f"grid           {result['grid']}")
    return "\n".join(lines)


# -- reconstruct ------------------------------------------------------------------------------------
@torch.no_grad()
def reconstruct_images(model: nn.Module, paths: Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                       batch_size: int = 16) -> list[dict[str, Any]]:
    """Reconstruct image files with ``model`` and write, per input ``<name>.<ext>``:
    ``<name>_input.png`` (the input as the model saw it, after the centre crop), ``<name>_recon.png``,
    ``<name>_indices.npy`` (int64 ``[k, h, w]``, sub-codebook order of the config).

    Inputs are resized and centre-cropped to the model's ``config.image_size``
    (:func:`fqgan.data.images.load_image`). Folders in ``paths`` stand for the images inside them.

    :returns: one record per image: ``file``, ``name``, ``psnr`` and ``ssim`` (against the cropped
        input, 8-bit), and the paths written.
    :raises MissingFileError: an image does not exist; ``ValueError``: an unreadable image, or two
        inputs with the same name stem (their outputs would collide).
    """
    files = list_images(paths)
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise UsageError(f"two inputs share the name {f.stem!r} ({stems[f.stem]} and {f}): their outputs "
                             "would overwrite each other; rename one")
        stems[f.stem] = f
    if batch_size < 1:
        raise UsageError(f"batch_size must be positive, got {batch_size}")
    image_size = model.config.image_size
    # Every file's header checked before any output, each image read only with its batch (bounded memory).
    bad = [(f, reason) for f in files if (reason := verify_image(str(f))) is not None]
    if bad:
        more = f" (and {len(bad) - 1} more: {', '.join(str(f) for f, _ in bad[1:5])})" if len(bad) > 1 else ""
        raise UsageError(f"cannot read image {bad[0][0]}: {bad[0][1]}{more}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    records = []
    model.eval()
    for start in range(0, len(files), batch_size):
        x = torch.stack([load_image(f, size=image_size) for f in files[start:start + batch_size]]).to(device)
        indices = model.encode(x)
        recon = model.decode_indices(indices)
        x8, r8 = to_uint8(x), to_uint8(recon)
        values, ssims = psnr(r8, x8).tolist(), ssim(r8, x8).tolist()
        for i, f in enumerate(files[start:start + batch_size]):
            rec = {"file": str(f), "name": f.stem, "psnr": values[i], "ssim": ssims[i],
                   "input": str(save_image(x[i].cpu(), out / f"{f.stem}_input.png")),
                   "recon": str(save_image(recon[i].float().cpu(), out / f"{f.stem}_recon.png")),
                   "indices": str(out / f"{f.stem}_indices.npy")}
            np.save(rec["indices"], indices[i].cpu().numpy().astype(np.int64))
            records.append(rec)
    return records


def format_reconstruct_table(records: list[dict[str, Any]]) -> str:
    """Per-image PSNR / SSIM and their means as a plain-text table."""
    width = max(4, *(len(r["name"]) for r in records))
    lines = [f"{'image':<{width}}  {'PSNR (dB)':>9}  {'SSIM':>6}"]
    lines += [f"{r['name']:<{width}}  {r['psnr']:9.3f}  {r['ssim']:6.4f}" for r in records]
    lines.append(f"{'mean':<{width}}  {mean([r['psnr'] for r in records]):9.3f}  "
                 f"{mean([r['ssim'] for r in records]):6.4f}")
    return "\n".join(lines)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
