"""Tokenizer evaluation: ``fqgan eval-tokenizer`` (metrics over a data set) and ``fqgan reconstruct``
(image files in, reconstructions, token maps and per-image PSNR out).

Metrics, as FQGAN's ``tokenizer/reconstruction_vq_ddp_dual.py`` where it defines them:

* images go through ``indices = model.encode(x)``, ``x_hat = model.decode_indices(indices)``
  (``decode_code`` of the official script);
* PSNR and SSIM per image on 8-bit images (:func:`fqgan.images.to_uint8` of both the input and the
  reconstruction), then averaged over images. ``ssim`` is the standard Gaussian-window SSIM;
  ``ssim_official`` repeats the official call (7x7 box window, ``data_range=2`` on [0, 1] images);
* codebook usage (fraction of codes used) and perplexity per sub-codebook, from the code histogram
  of the whole evaluation set (the official script reports neither; its training loop shows usage
  over a sliding window of the last 65536 tokens);
* rFID = FID between the Inception features of the inputs and of the reconstructions (pytorch-fid's
  network and preprocessing, :mod:`fqgan.eval.inception`), when the weight file is available.

Under torchrun each rank evaluates every ``world_size``-th image (rank r: images r, r + W, ...) and
the sums are all-reduced, so the numbers do not depend on the number of processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fqgan.eval.fid import FeatureStats, frechet_distance, save_stats
from fqgan.eval.inception import (
    FEATURE_DIM,
    inception_features,
    load_fid_inception,
    resolve_rfid_weights,
)
from fqgan.eval.metrics import SSIM_OFFICIAL, SSIM_STANDARD, CodeUsage, MeanMeter, psnr, ssim
from fqgan.images import list_images, load_image, save_comparison_grid, save_image, to_uint8
from fqgan.tokenizer.weights import WeightsNotFoundError, load_torch_file

__all__ = [
    "add_eval_tokenizer_arguments",
    "add_reconstruct_arguments",
    "evaluate_tokenizer",
    "load_tokenizer_checkpoint",
    "reconstruct_images",
    "run_eval_tokenizer",
    "run_reconstruct",
]

# -- checkpoints ------------------------------------------------------------------------------------
def _checkpoint_file(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        what = "a directory: pass the checkpoint file inside it" if p.is_dir() else "not found"
        raise WeightsNotFoundError(f"tokenizer checkpoint {p} is {what} (looked for {p.resolve()})")
    return p


def load_tokenizer_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu",
                              weights: str = "auto", official_config: Any = None) -> nn.Module:
    """An :class:`~fqgan.tokenizer.FQTokenizer` in eval mode on ``device`` from either checkpoint kind:

    * ``fqgan train-tokenizer`` (``kind == "fqgan-tokenizer"``: ``model_config``, ``model``, ``ema``);
    * an official FQGAN-Dual/Triple file (``{"model"|"ema"|"state_dict": ...}`` or a bare state
      dict), through :func:`fqgan.tokenizer.official.from_official`.

    :param weights: ``"auto"`` (EMA weights when the file has them, as the official script),
        ``"ema"`` or ``"model"``.
    :param official_config: the :class:`~fqgan.tokenizer.TokenizerConfig` (or preset name) of an
        official checkpoint; default: inferred from its tensor shapes, with the released models'
        GroupNorm and attention-head counts. Ignored for ``train-tokenizer`` checkpoints (they store theirs).
    :raises WeightsNotFoundError: no file at ``path`` (a ``ValueError`` and a ``FileNotFoundError``).
    :raises CheckpointError: the file is unreadable or holds no tokenizer.
    """
    from fqgan.tokenizer import FQTokenizer, TokenizerConfig
    from fqgan.tokenizer.official import from_official
    from fqgan.tokenizer.weights import CheckpointError

    if weights not in ("auto", "ema", "model"):
        raise ValueError(f"weights must be 'auto', 'ema' or 'model', got {weights!r}")
    p = _checkpoint_file(path)
    ckpt = load_torch_file(p, "tokenizer checkpoint")
    if isinstance(ckpt, dict) and ckpt.get("kind") == "fqgan-tokenizer":
        if "model_config" not in ckpt or "model" not in ckpt:
            raise CheckpointError(f"tokenizer checkpoint {p} lacks its 'model_config' or 'model' entry")
        if weights == "ema" and "ema" not in ckpt:
            raise CheckpointError(f"tokenizer checkpoint {p} has no EMA weights (trained without --ema)")
        model = FQTokenizer(TokenizerConfig.from_dict(ckpt["model_config"]))
        use_ema = weights != "model" and "ema" in ckpt
        model.load_state_dict(ckpt["ema"] if use_ema else ckpt["model"])
    elif isinstance(ckpt, dict) and "kind" in ckpt:
        raise CheckpointError(f"{p} is a {ckpt['kind']!r} checkpoint, not a tokenizer")
    else:
        if isinstance(official_config, str):
            from fqgan.tokenizer import get_preset

            official_config = get_preset(official_config)
        model = from_official(ckpt, official_config, weights=weights)
    return model.to(device).eval()


# -- evaluation -------------------------------------------------------------------------------------
def _batch_images(batch: Any) -> Tensor:
    images = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(images, Tensor):
        raise TypeError(f"data must yield image tensors or (images, ...) tuples, got {type(images).__name__}")
    return images


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _codebook_shape(model: nn.Module) -> tuple[int, int, list[str]]:
    config = getattr(model, "config", None)
    k, size = getattr(config, "num_codebooks", None), getattr(config, "codebook_size", None)
    if not isinstance(k, int) or not isinstance(size, int):
        raise TypeError("model must have config.num_codebooks and config.codebook_size (an FQTokenizer)")
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
        (:func:`fqgan.images.save_comparison_grid`) to this PNG (rank 0 only).
    :param inception: the FID network (:func:`~fqgan.eval.inception.load_fid_inception`; any module
        mapping [0, 1] images to ``[B, D]`` features works); ``None`` skips rFID and reports
        ``rfid_note`` as the reason.
    :param save_dir: also write every reconstruction as ``<save_dir>/<index:06d>.png`` (index = position
        in the data set under the strided sharding above), for external FID tools.
    :param fid_stats_dir: also write the Inception statistics of the inputs and the reconstructions
        (``inputs.npz``, ``reconstructions.npz``: pytorch-fid's ``mu``/``sigma`` format), rank 0.
    :param on_batch: called with the number of images of each batch (progress bars).
    :returns: ``{"num_images", "psnr", "ssim", "ssim_official", "codebook_names", "usage" [k],
        "perplexity" [k], "rfid" (None when skipped), "rfid_note", "grid" (path or None)}``.
    """
    k, size, names = _codebook_shape(model)
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    rank, world = _dist_rank_world()
    if num_images is not None and num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if grid_images < 1:
        raise ValueError(f"grid_images must be positive, got {grid_images}")
    meters = {name: MeanMeter(device) for name in ("psnr", "ssim", "ssim_official")}
    codes = CodeUsage(k, size, device)
    stats: tuple[FeatureStats, FeatureStats] | None = None  # sized by the feature network's first output
    grid_in: list[Tensor] = []
    grid_out: list[Tensor] = []
    seen = 0
    was_training = model.training
    model.eval()
    try:
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
        raise ValueError("data yielded no images")
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
    (:func:`fqgan.images.load_image`). Folders in ``paths`` stand for the images inside them.

    :returns: one record per image: ``file``, ``name``, ``psnr`` and ``ssim`` (against the cropped
        input, 8-bit), and the paths written.
    :raises MissingFileError: an image does not exist; ``ValueError``: an unreadable image, or two
        inputs with the same name stem (their outputs would collide).
    """
    files = list_images(paths)
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise ValueError(f"two inputs share the name {f.stem!r} ({stems[f.stem]} and {f}): their outputs "
                             "would overwrite each other; rename one")
        stems[f.stem] = f
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    image_size = model.config.image_size
    images = [load_image(f, size=image_size) for f in files]  # every file checked before any output
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    records = []
    model.eval()
    for start in range(0, len(files), batch_size):
        x = torch.stack(images[start:start + batch_size]).to(device)
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
    lines.append(f"{'mean':<{width}}  {_mean([r['psnr'] for r in records]):9.3f}  "
                 f"{_mean([r['ssim'] for r in records]):6.4f}")
    return "\n".join(lines)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


# -- command line ---------------------------------------------------------------------------------
def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="tokenizer checkpoint: from `fqgan train-tokenizer`, or an official FQGAN-Dual/Triple "
                             "file")
    parser.add_argument("--weights", choices=("auto", "ema", "model"), default="auto",
                        help="which weights of the checkpoint (auto: EMA when present, as the official script)")
    parser.add_argument("--official-preset", default=None, metavar="NAME",
                        help="architecture preset of an official checkpoint (default: inferred from its shapes)")
    parser.add_argument("--device", default="auto", help="auto (cuda:<local rank> if available, else cpu), cpu, cuda:N")


def add_eval_tokenizer_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fqgan eval-tokenizer``."""
    _add_model_arguments(parser)
    parser.add_argument("--data", default="sample",
                        help="image folder (any depth), or 'sample' for the built-in sample set (default)")
    parser.add_argument("--num-images", type=int, default=None,
                        help="evaluate this many images (default: the whole folder; 512 crops of the sample set)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch and process")
    parser.add_argument("--num-workers", type=int, default=4, help="DataLoader workers per process")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sample set's fixed crops")
    parser.add_argument("--out", default="eval-tokenizer", metavar="DIR",
                        help="writes metrics.json and grid.png (originals above reconstructions) here")
    parser.add_argument("--grid-images", type=int, default=8, help="images in grid.png")
    parser.add_argument("--inception-weights", default=None, metavar="FILE",
                        help="pt_inception-2015-12-05-6726825d.pth (pytorch-fid) for rFID; default "
                             "$FQGAN_INCEPTION_WEIGHTS, else the torch hub cache; without it rFID is skipped")
    parser.add_argument("--no-rfid", action="store_true", help="skip rFID even when the weights are available")
    parser.add_argument("--save-reconstructions", default=None, metavar="DIR",
                        help="also write every reconstruction as DIR/<index>.png (for external FID tools)")
    parser.add_argument("--save-fid-stats", action="store_true",
                        help="also write the Inception mu/sigma of inputs and reconstructions (pytorch-fid .npz)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run_eval_tokenizer(args: argparse.Namespace) -> dict[str, Any]:
    """``fqgan eval-tokenizer``: evaluate a checkpoint, print the table, write ``metrics.json`` and
    ``grid.png`` under ``--out``. Runs under torchrun as well (metrics over all ranks)."""
    from torch.utils.data import DataLoader, Subset

    from fqgan.data import build_dataset, collate
    from fqgan.train.common import Progress, init_distributed, teardown_distributed

    for name in ("num_images", "batch_size", "grid_images"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")
    # Cheap checks first: a missing checkpoint or weight file fails before any data is read.
    weights_path, note = (None, "rFID skipped: --no-rfid") if args.no_rfid else resolve_rfid_weights(
        args.inception_weights)
    _checkpoint_file(args.checkpoint)
    info = init_distributed(args.device)
    try:
        model = load_tokenizer_checkpoint(args.checkpoint, info.device, args.weights, args.official_preset)
        inception = load_fid_inception(weights_path, info.device) if weights_path is not None else None
        dataset = build_dataset(args.data, model.config.image_size, augment=False, seed=args.seed,
                                sample_length=args.num_images or 512)
        n = len(dataset) if args.num_images is None else min(args.num_images, len(dataset))
        shard = Subset(dataset, range(info.rank, n, info.world_size))
        loader = DataLoader(shard, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                            collate_fn=collate, pin_memory=info.device.type == "cuda")
        out = Path(args.out)
        progress = Progress(len(loader), desc="eval-tokenizer", enabled=info.is_main and not args.quiet)
        try:
            result = evaluate_tokenizer(
                model, loader, grid_path=out / "grid.png", grid_images=args.grid_images, inception=inception,
                rfid_note=note, save_dir=args.save_reconstructions,
                fid_stats_dir=out if args.save_fid_stats else None, device=info.device,
                on_batch=lambda _: progress.update(1))  # one step per batch
        finally:
            progress.close()
        result.update(checkpoint=str(args.checkpoint), data=str(args.data), world_size=info.world_size)
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
            print(format_eval_table(result))
            print(f"metrics       {out / 'metrics.json'}")
        return result
    finally:
        teardown_distributed()


def add_reconstruct_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fqgan reconstruct``."""
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files (PNG, JPEG, ...) or folders of them; each is resized and centre-cropped "
                             "to the model's image size")
    _add_model_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="writes <name>_recon.png, <name>_input.png, <name>_indices.npy and metrics.json here")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    return parser


def run_reconstruct(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``fqgan reconstruct``: reconstruct image files, print per-image PSNR, write ``metrics.json``."""
    from fqgan.train.common import resolve_device

    list_images(args.images)  # missing inputs and checkpoint fail before anything is loaded
    _checkpoint_file(args.checkpoint)
    model = load_tokenizer_checkpoint(args.checkpoint, resolve_device(args.device), args.weights,
                                      args.official_preset)
    records = reconstruct_images(model, args.images, args.out, batch_size=args.batch_size)
    summary = {
        "checkpoint": str(args.checkpoint),
        "image_size": model.config.image_size,
        "mean_psnr": _mean([r["psnr"] for r in records]),
        "mean_ssim": _mean([r["ssim"] for r in records]),
        "images": records,
    }
    path = Path(args.out) / "metrics.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(format_reconstruct_table(records))
    print(f"wrote {len(records)} reconstructions and {path}")
    return records
