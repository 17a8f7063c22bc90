"""The ``fqgan`` command line: ``fqgan <command> --help`` documents each command.

Commands: ``demo``, ``train-tokenizer``, ``eval-tokenizer``, ``reconstruct``, ``extract-codes``,
``train-generator``, ``sample``, ``eval-generator``. Every command also runs as ``python -m fqgan <command>``,
and under torchrun (``torchrun --nproc_per_node N -m fqgan <command>``) where it trains or evaluates with one
process per device.

All argument parsing of the package is here, and only here (so this file is longer than the others: one
section per command). The training commands' flags are generated from their config dataclasses
(:func:`fqgan.runtime.options.option` fields: name, type, default and help in one place), so a new
config field is a new flag without an edit here.

Bad input (a missing file, an empty folder, a corrupted checkpoint, an unknown preset, ...) ends
with ``fqgan <command>: error: <what to fix>`` and exit status 2, without a traceback
(``FQGAN_DEBUG=1`` shows it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import linecache
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from fqgan.runtime.errors import UsageError
from fqgan.runtime.rundir import check_out_dir, check_output_file

_EPILOG = """examples:
  fqgan demo                      # a few minutes on a CPU; writes demo_out/report.md
  fqgan train-tokenizer --preset tiny --data sample --steps 300 --perceptual-weight 0 --semantic-weight 0
  torchrun --nproc_per_node 8 -m fqgan train-tokenizer --data /data/imagenet/train --teacher /ckpt/clip-vit-l14
  torchrun --nproc_per_node 8 -m fqgan train-generator --codes codes/ --preset FAR-L --parallel fsdp
  fqgan eval-tokenizer --checkpoint runs/tokenizer/last.pt --data sample
  fqgan reconstruct photo.jpg --checkpoint runs/tokenizer/last.pt --out recon/
  torchrun --nproc_per_node 8 -m fqgan sample --checkpoint far.pt --tokenizer tok.pt --npz samples.npz
"""


# -- flags from config dataclasses ------------------------------------------------------------------
def _field_kind(f: dataclasses.Field) -> tuple[type, bool]:
    """(element type, repeatable) of an option field, from its annotation (``int | None``, ``tuple[str, ...]``)."""
    text = str(f.type).replace(" ", "").removesuffix("|None")
    if text.startswith("tuple"):
        return str, True
    return {"int": int, "float": float, "str": str, "bool": bool}[text], False


def _option_fields(cls: type, only: Iterable[str] | None, skip: Iterable[str]) -> list[dataclasses.Field]:
    keep = None if only is None else set(only)
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata and f.name not in skip
            and (keep is None or f.name in keep)]


def add_options(parser: argparse.ArgumentParser, cls: type, *, only: Iterable[str] | None = None,
                skip: Iterable[str] = (), overrides: bool = False) -> None:
    """One flag per :func:`~fqgan.runtime.options.option` field of ``cls``, in its help group.

    :param overrides: the flags override a preset: default None (= the preset's value), bools take
        ``--flag`` / ``--no-flag``
    """
    groups = {g.title: g for g in parser._action_groups}
    for f in _option_fields(cls, only, skip):
        meta = f.metadata
        title = meta["group"] or "options"
        group = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        kind, many = _field_kind(f)
        default = None if overrides else (f.default_factory() if f.default is dataclasses.MISSING else f.default)
        kw: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
        if kind is bool:
            action = (argparse.BooleanOptionalAction if overrides or (default and not flag.startswith("--no-"))
                      else "store_false" if flag.startswith("--no-") else "store_true")
            kw.update(action=action, default=default)
        else:
            kw.update(type=kind, default=None if many else default, action="append" if many else "store",
                      choices=meta["choices"], metavar=meta["metavar"] or (
                          None if meta["choices"] else flag.removeprefix("--").replace("-", "_").upper()))
            if overrides:
                kw["help"] += " (default: the preset's)"
            elif default is not None and not many:
                kw["help"] += " (default: %(default)s)"
        group.add_argument(flag, **kw)


def read_options(args: argparse.Namespace, cls: type, *, only: Iterable[str] | None = None,
                 skip: Iterable[str] = (), overrides: bool = False) -> dict[str, Any]:
    """The values of :func:`add_options`' flags, by field name (with ``overrides``: only those given)."""
    out = {}
    for f in _option_fields(cls, only, skip):
        value = getattr(args, f.name)
        if overrides and value is None:
            continue
        out[f.name] = tuple(value) if value is not None and _field_kind(f)[1] else value
    return out


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")


def _add_workers_argument(p: Any, what: str) -> None:
    p.add_argument("--num-workers", type=int, default=None,
                   help=f"{what} (default: 4, or the CPU cores this process may use when fewer)")


def _workers(args: argparse.Namespace) -> int:
    """``--num-workers``, checked; its default resolved (:func:`~fqgan.runtime.device.default_loader_workers`)."""
    from fqgan.runtime.device import default_loader_workers

    if args.num_workers is None:
        return default_loader_workers()
    if args.num_workers < 0:
        raise UsageError(f"--num-workers must be >= 0, got {args.num_workers}")
    return args.num_workers


def _add_bad_images_argument(p: Any, skipped: str) -> None:
    p.add_argument("--bad-images", choices=("error", "skip"), default="error",  # fqgan.data.scan's (needs PIL)
                   help="an image folder's files are checked before any is used: 'error' stops and lists the "
                        f"unreadable ones, 'skip' {skipped} (default: %(default)s)")


def _groups(p: argparse.ArgumentParser, *titles: str) -> dict[str, Any]:
    """Help sections in this order (add_options fills them by title)."""
    return {title: p.add_argument_group(title) for title in titles}


# -- train-tokenizer --------------------------------------------------------------------------------
def add_train_tokenizer_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fqgan train-tokenizer`` (defaults: the official FQGAN-Dual recipe)."""
    from fqgan.tokenizer.config import PRESETS, TokenizerConfig, TokenizerLossConfig
    from fqgan.train.config import TokenizerTrainConfig

    groups = _groups(p, "model (a preset, then overrides)", "losses (official VQLoss options)",
                     "weight files (local only: nothing is downloaded)", "data", "optimisation", "run")
    groups["model (a preset, then overrides)"].add_argument(
        "--preset", default="fqgan-dual-16", choices=sorted(PRESETS),
        help="tokenizer architecture (default: %(default)s = FQGAN-Dual, 256 px, downsample 16; 'tiny': 32 px, "
             "for tests and the demo)")
    add_options(p, TokenizerConfig, overrides=True)
    add_options(p, TokenizerLossConfig)
    add_options(p, TokenizerTrainConfig)
    return p


def tokenizer_config_from_args(args: argparse.Namespace):
    """The :class:`TokenizerTrainConfig` of parsed ``train-tokenizer`` arguments."""
    from fqgan.tokenizer.config import TokenizerConfig, TokenizerLossConfig, get_preset
    from fqgan.train.config import TokenizerTrainConfig

    model = get_preset(args.preset, **read_options(args, TokenizerConfig, overrides=True))
    loss = TokenizerLossConfig(**read_options(args, TokenizerLossConfig))
    return TokenizerTrainConfig(model=model, loss=loss, **read_options(args, TokenizerTrainConfig))


def run_train_tokenizer(args: argparse.Namespace):
    """``fqgan train-tokenizer``."""
    from fqgan.train.tokenizer import train_tokenizer

    result = train_tokenizer(tokenizer_config_from_args(args))
    if int(os.environ.get("RANK", "0")) == 0:
        m = result.metrics
        usage = ", ".join(f"{k[6:]} {v:.3f}" for k, v in m.items() if k.startswith("usage_"))
        print(f"trained {result.step} steps in {result.seconds:.0f} s; last loss {m.get('loss_gen', float('nan')):.4f}"
              f"{'; codebook usage ' + usage if usage else ''}")
        print(f"checkpoint    {result.checkpoint}\nmetrics       {result.metrics_path}")
    return result


# -- eval-tokenizer, reconstruct --------------------------------------------------------------------
def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The tokenizer checkpoint options of ``eval-tokenizer`` and ``reconstruct``."""
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
    _add_workers_argument(parser, "DataLoader workers per process")
    _add_bad_images_argument(parser, "evaluates the others (metrics.json lists the left-out files)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sample set's fixed crops")
    parser.add_argument("--out", default="eval-tokenizer", metavar="DIR",
                        help="writes metrics.json and grid.png (originals above reconstructions) here")
    parser.add_argument("--grid-images", type=int, default=8, help="images in grid.png")
    parser.add_argument("--inception-weights", default=None, metavar="FILE",
                        help="the FID Inception weights for rFID (torch-fidelity's "
                             "weights-inception-2015-12-05-6726825d.pth or pytorch-fid's pt_inception-...pth); default "
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
    from fqgan.eval.inception import load_fid_inception, resolve_rfid_weights
    from fqgan.eval.tokenizer import evaluate_tokenizer, format_eval_table
    from fqgan.runtime.dist import init_distributed, teardown_distributed
    from fqgan.runtime.logging import Progress
    from fqgan.tokenizer.load import checkpoint_file, load_tokenizer

    _positive(args, "num_images", "batch_size", "grid_images")
    num_workers = _workers(args)
    # Cheap checks first: a missing checkpoint or weight file fails before any data is read.
    weights_path, note = (None, "rFID skipped: --no-rfid") if args.no_rfid else resolve_rfid_weights(
        args.inception_weights)
    checkpoint_file(args.checkpoint)
    check_out_dir(args.out, "--out")  # outputs before the work: the metrics are written at the end
    if args.save_reconstructions is not None:
        check_out_dir(args.save_reconstructions, "--save-reconstructions")
    info = init_distributed(args.device)
    try:
        model = load_tokenizer(args.checkpoint, info.device, args.weights, args.official_preset)
        inception = load_fid_inception(weights_path, info.device) if weights_path is not None else None
        left_out: list[tuple[str, str]] = []
        if args.data != "sample":
            dataset, left_out = _checked_folder(args, model.config.image_size, info.is_main, command="eval-tokenizer",
                                                skip_hint="to evaluate the others",
                                                listed_in=str(Path(args.out) / "metrics.json"))
        else:
            dataset = build_dataset(args.data, model.config.image_size, augment=False, seed=args.seed,
                                    sample_length=args.num_images or 512)
        n = len(dataset) if args.num_images is None else min(args.num_images, len(dataset))
        shard = Subset(dataset, range(info.rank, n, info.world_size))
        loader = DataLoader(shard, batch_size=args.batch_size, shuffle=False, num_workers=num_workers,
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
        result.update(checkpoint=str(args.checkpoint), data=str(args.data), world_size=info.world_size,
                      left_out=[list(item) for item in left_out])
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
    from fqgan.data.images import list_images
    from fqgan.eval.tokenizer import format_reconstruct_table, mean, reconstruct_images
    from fqgan.runtime.device import resolve_device
    from fqgan.tokenizer.load import checkpoint_file, load_tokenizer

    list_images(args.images)  # missing inputs, checkpoint and an unusable --out fail before anything is loaded
    checkpoint_file(args.checkpoint)
    check_out_dir(args.out, "--out")
    model = load_tokenizer(args.checkpoint, resolve_device(args.device), args.weights, args.official_preset)
    records = reconstruct_images(model, args.images, args.out, batch_size=args.batch_size)
    summary = {
        "checkpoint": str(args.checkpoint),
        "image_size": model.config.image_size,
        "mean_psnr": mean([r["psnr"] for r in records]),
        "mean_ssim": mean([r["ssim"] for r in records]),
        "images": records,
    }
    path = Path(args.out) / "metrics.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(format_reconstruct_table(records))
    print(f"wrote {len(records)} reconstructions and {path}")
    return records


# -- extract-codes ----------------------------------------------------------------------------------
def add_extract_codes_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fqgan extract-codes``."""
    p.add_argument("--tokenizer", required=True, metavar="CKPT",
                   help="tokenizer checkpoint (from `fqgan train-tokenizer`, or an official FQGAN file)")
    p.add_argument("--weights", choices=("auto", "ema", "model"), default="auto",
                   help="which weights of the checkpoint (default: %(default)s = EMA when present)")
    p.add_argument("--data", default="sample",
                   help="image folder (labels from the first-level folders) or 'sample' (default: %(default)s)")
    p.add_argument("--num-images", type=int, default=None,
                   help="encode this many images (default: the whole folder; 512 crops of the sample set)")
    p.add_argument("--out", default="codes", metavar="DIR",
                   help="code folder to write: codes.npy, labels.npy, meta.json (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace the code folder that --out holds")
    p.add_argument("--classes", default=None, metavar="FILE",
                   help="class names, one per line, in label order: fixes the labels of an image folder (a listed "
                        "class may then be empty or missing; default: its sorted class folders)")
    p.add_argument("--no-flip", action="store_true",
                   help="encode the images only (default: each image and its horizontal flip, as official)")
    p.add_argument("--ten-crop", action="store_true",
                   help="encode the official ten crops of each image instead (the released FAR training's codes): "
                        "a centre crop of int(image_size * crop_range) px, then torchvision TenCrop(image_size), "
                        "stored as 10 augmentations")
    p.add_argument("--crop-range", type=float, default=1.1,
                   help="with --ten-crop: the centre crop's size over the image size (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch and process (default: %(default)s)")
    _add_workers_argument(p, "data-loading processes")
    _add_bad_images_argument(p, "encodes the others (the codes' meta.json lists the left-out files)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sample set's fixed crops (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _checked_folder(args: argparse.Namespace, image_size: int, is_main: bool, *, command: str, skip_hint: str,
                    listed_in: str) -> tuple[Any, list[tuple[str, str]]]:
    """``--data``'s ImageFolder (centre crops) after the check of every file (``--bad-images``; rank 0 scans,
    every rank gets its index). Returns the data set and the ``(path, reason)`` of the files left out."""
    from fqgan.data import ImageFolder
    from fqgan.data.scan import read_classes_file, scan_image_folder
    from fqgan.runtime.dist import on_main_then_shared

    root = os.path.abspath(os.path.expanduser(args.data))
    classes = read_classes_file(args.classes) if getattr(args, "classes", None) is not None else None
    index = on_main_then_shared(lambda: scan_image_folder(root, classes=classes, bad_images=args.bad_images,
                                                          progress=not args.quiet, skip_hint=skip_hint))
    if index.bad and is_main:
        print(f"{command}: {len(index.bad)} unreadable images left out (--bad-images skip), listed in {listed_in}",
              file=sys.stderr)
    return ImageFolder(root, image_size, augment=False, seed=args.seed, index=index), index.bad


def run_extract_codes(args: argparse.Namespace):
    """``fqgan extract-codes``: tokenizer -> k index maps per image (and its flip, or its ten crops), with labels."""
    from torch.utils.data import Subset

    from fqgan.data import build_dataset
    from fqgan.data.codes import extract_codes
    from fqgan.runtime.dist import init_distributed, teardown_distributed
    from fqgan.runtime.logging import Progress
    from fqgan.tokenizer.load import load_tokenizer

    _positive(args, "num_images", "batch_size")
    num_workers = _workers(args)
    if args.ten_crop and args.no_flip:
        raise UsageError("--ten-crop and --no-flip exclude each other (the ten crops include the flipped five)")
    if args.ten_crop and not args.crop_range >= 1:
        raise UsageError(f"--crop-range must be >= 1 (the crops come from a larger centre crop), got {args.crop_range}")
    out = check_out_dir(args.out, "--out")
    if (out / "meta.json").exists() and not args.overwrite:
        raise UsageError(f"--out {out} already holds a code folder: pass --overwrite to replace it, or another --out")
    info = init_distributed(args.device)
    try:
        tokenizer = load_tokenizer(args.tokenizer, info.device, args.weights)
        left_out: list[tuple[str, str]] = []
        if args.data != "sample":
            dataset, left_out = _checked_folder(args, tokenizer.config.image_size, info.is_main,
                                                command="extract-codes", skip_hint="to encode the others",
                                                listed_in=os.path.join(args.out, "meta.json"))
        else:
            dataset = build_dataset(args.data, tokenizer.config.image_size, augment=False, seed=args.seed,
                                    sample_length=args.num_images or 512)
        if args.ten_crop:
            from fqgan.data.datasets import TenCropImages

            dataset = TenCropImages(dataset, args.crop_range)
        classes = list(dataset.classes)  # stored in the code folder's meta.json
        if args.num_images is not None and args.num_images < len(dataset):
            dataset = Subset(dataset, range(args.num_images))
        progress = Progress((len(dataset) + info.world_size - 1) // info.world_size, desc="extract-codes",
                            enabled=info.is_main and not args.quiet, unit="img")
        try:
            meta = extract_codes(tokenizer, dataset, args.out, flip=not (args.no_flip or args.ten_crop),
                                 ten_crop=args.crop_range if args.ten_crop else None, batch_size=args.batch_size,
                                 num_workers=num_workers, device=info.device, tokenizer_path=str(args.tokenizer),
                                 classes=classes, left_out=left_out, on_batch=lambda b: progress.update(b))
        finally:
            progress.close()
        if info.is_main:
            print(f"wrote codes of {meta.num_images} images x {meta.num_aug} (k={meta.num_codebooks}, "
                  f"{meta.grid_size}x{meta.grid_size} tokens, K={meta.codebook_size}, {meta.num_classes} classes) "
                  f"to {args.out}")
        return meta
    finally:
        teardown_distributed()


# -- train-generator --------------------------------------------------------------------------------
_GENERATOR_SKIP = ("data", "sample_length")  # image-data fields: the generator reads a code folder


def add_train_generator_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fqgan train-generator`` (defaults: the official FAR recipe)."""
    from fqgan.generator import FARConfig
    from fqgan.train.config import GeneratorTrainConfig

    _groups(p, "model", "data", "optimisation", "run")
    add_options(p, GeneratorTrainConfig, only=("codes", "preset", "num_classes"))
    add_options(p, FARConfig, overrides=True)
    add_options(p, GeneratorTrainConfig, skip=(*_GENERATOR_SKIP, "codes", "preset", "num_classes"))
    p.set_defaults(codes=None)
    for action in p._actions:
        if action.dest == "codes":
            action.required = True
    return p


def generator_config_from_args(args: argparse.Namespace):
    """The :class:`GeneratorTrainConfig` of parsed ``train-generator`` arguments."""
    from fqgan.generator import FARConfig
    from fqgan.train.config import GeneratorTrainConfig

    overrides = read_options(args, FARConfig, overrides=True)
    if "resid_dropout_p" in overrides:  # --dropout-p: residual and FFN dropout, as the official flag
        overrides["ffn_dropout_p"] = overrides["resid_dropout_p"]
    return GeneratorTrainConfig(model_overrides=overrides, **read_options(args, GeneratorTrainConfig,
                                                                          skip=_GENERATOR_SKIP))


def run_train_generator(args: argparse.Namespace):
    """``fqgan train-generator``."""
    from fqgan.train.generator import train_generator

    result = train_generator(generator_config_from_args(args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {result.step} steps in {result.seconds:.0f} s; "
              f"last loss {result.metrics.get('loss', float('nan')):.4f}")
        print(f"checkpoint    {result.checkpoint}\nmetrics       {result.metrics_path}")
    return result


# -- sample -----------------------------------------------------------------------------------------
def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers (one per sub-token), "
                                         f"got {text!r}") from None


def add_sample_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fqgan sample``."""
    g = _groups(p, "models", "what to sample", "sampling (defaults: the released FAR evaluation's)",
                "many images for FID (--npz; resumable, runs under torchrun)", "speed")
    m = g["models"]
    m.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="generator checkpoint (from `fqgan train-generator`, or an official FAR file)")
    m.add_argument("--tokenizer", required=True, metavar="CKPT", help="the tokenizer whose codes trained it")
    m.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="decode with a tokenizer other than the one whose codes trained the generator (its "
                        "fingerprint differs: the images will not be what the generator means)")
    m.add_argument("--weights", choices=("auto", "ema", "model"), default="auto",
                   help="generator weights (default: %(default)s = EMA when present)")
    m.add_argument("--tokenizer-weights", choices=("auto", "ema", "model"), default="auto",
                   help="tokenizer weights (default: %(default)s)")
    w = g["what to sample"]
    w.add_argument("--class", dest="classes", action="append", metavar="ID",
                   help="class id (or a class name of the training codes); repeat for several classes. A grid needs "
                        "it; with --npz it limits the classes (default: all)")
    w.add_argument("--n", type=int, default=16, help="grid: images per class (default: %(default)s)")
    w.add_argument("--out", default="samples.png", metavar="PNG", help="grid to write (default: %(default)s)")
    w.add_argument("--nrow", type=int, default=None, help="grid: images per row (default: --n, at most 16)")
    sp = g["sampling (defaults: the released FAR evaluation's)"]
    sp.add_argument("--cfg-scale", type=_floats, default=[2.0],
                    help="classifier-free guidance >= 1, one value or one per sub-token, e.g. 4,2 (default: 2, "
                         "the released FAR evaluation's)")
    sp.add_argument("--temperature", type=_floats, default=[1.0], help="> 0, one or one per sub-token (default: 1)")
    sp.add_argument("--top-k", type=int, default=0, help="0 = off (default: %(default)s)")
    sp.add_argument("--top-p", type=float, default=1.0, help="1 = off (default: %(default)s)")
    sp.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    n = g["many images for FID (--npz; resumable, runs under torchrun)"]
    n.add_argument("--npz", default=None, metavar="OUT.npz",
                   help="write --num-images samples in ADM's format instead of a grid: arr_0 = uint8 [N, H, W, 3] "
                        "(and labels), what `fqgan eval-generator` and ADM's evaluator read. Under torchrun each "
                        "process samples its share into OUT.npz.shards/; a restarted run skips finished shards")
    n.add_argument("--num-images", type=int, default=None,
                   help="with --npz: how many images (default: 50000, 50 per class for ImageNet)")
    n.add_argument("--class-order", choices=("balanced", "random"), default="balanced",
                   help="with --npz: balanced = image i has class i mod C (every class equally often); random = a "
                        "uniform draw per image, the official script's distribution (default: %(default)s)")
    n.add_argument("--shard-size", type=int, default=1000,
                   help="with --npz: images per shard file, the unit a restart resumes from (default: %(default)s)")
    n.add_argument("--keep-shards", action="store_true",
                   help="with --npz: keep OUT.npz.shards/ after OUT.npz is written")
    n.add_argument("--overwrite", action="store_true", help="with --npz: replace an existing OUT.npz")
    n.add_argument("--quiet", action="store_true", help="no progress bar")
    f = g["speed"]
    f.add_argument("--batch-size", type=int, default=32,
                   help="images generated at once, per process (default: %(default)s)")
    f.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="the generator's weights: auto = bf16 on CUDA and on CPUs with AMX or AVX512-BF16 (as the "
                        "official sampling script), fp32 elsewhere (default: %(default)s)")
    f.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="run each position as one torch.compile graph (CUDA graphs on a GPU); default: on CUDA only "
                        "(compiling takes a minute or more on a CPU)")
    f.add_argument("--device", default="auto",
                   help="auto (cuda:<local rank> if available, else cpu), cpu, cuda, cuda:N (default: %(default)s)")
    return p


def check_provenance(codes_meta: dict[str, Any], tokenizer: Any, generator_path: Any, tokenizer_path: Any,
                     allow: bool) -> None:
    """Refuse a tokenizer whose fingerprint is not the one that wrote the generator's training codes."""
    want = codes_meta.get("tokenizer_fingerprint")
    if want is None:
        return  # an official FAR file, or codes from before fingerprints: nothing to compare
    got = tokenizer.fingerprint()
    if got == want:
        return
    made_by = codes_meta.get("tokenizer") or "a tokenizer"
    text = (f"the generator {generator_path} was trained on codes of {made_by} (fingerprint {want}), but "
            f"{tokenizer_path} has fingerprint {got}: its codes mean other things and the images would be garbage")
    if not allow:
        raise UsageError(f"{text}. Pass the tokenizer that wrote the codes, or --allow-tokenizer-mismatch")
    print(f"warning: {text} (--allow-tokenizer-mismatch)", file=sys.stderr)


def run_sample(args: argparse.Namespace):
    """``fqgan sample``: class-conditional images from a generator + tokenizer, as a PNG grid, or (``--npz``)
    many class-balanced images in ADM's format, sharded over torchrun's processes and resumable."""
    import torch

    from fqgan.data.codes import resolve_classes
    from fqgan.data.images import save_grid
    from fqgan.generator import sample_images
    from fqgan.runtime.device import resolve_device

    _positive(args, "n", "batch_size", "num_images", "shard_size")
    if args.npz is None:
        if not args.classes:
            raise UsageError("give the grid's classes (--class ID, repeatable), or --npz OUT.npz for many images")
        for flag, given in (("--num-images", args.num_images is not None), ("--keep-shards", args.keep_shards),
                            ("--overwrite", args.overwrite)):
            if given:
                raise UsageError(f"{flag} goes with --npz")
        check_output_file(args.out, (".png",))  # before hours of generation, not after
    else:
        npz = check_output_file(args.npz, (".npz",), "--npz")
        if npz.exists() and not args.overwrite:
            raise UsageError(f"--npz {npz} exists: pass --overwrite to replace it, or another --npz")
        return _run_sample_npz(args, npz)
    device = resolve_device(args.device)
    generator, tokenizer, meta, sampling = _load_for_sampling(args, device)
    ids = resolve_classes(args.classes, generator.config.num_classes, meta.get("classes", ()))
    labels = torch.tensor([c for c in ids for _ in range(args.n)], dtype=torch.long, device=device)
    images = sample_images(generator, tokenizer, labels, batch_size=args.batch_size, seed=args.seed, **sampling)
    grid = save_grid(images.float().cpu(), args.out, nrow=args.nrow or min(args.n, 16))
    names = meta.get("classes", ())
    shown = ", ".join(f"{c} ({names[c]})" if c < len(names) else str(c) for c in ids)
    print(f"wrote {len(labels)} samples of class {shown} to {getattr(grid, 'path', args.out)}")
    return images


def _load_for_sampling(args: argparse.Namespace, device: Any) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """(generator in --precision, tokenizer, the codes' metadata, generate()'s sampling keywords), checked
    against each other (sizes, provenance)."""
    import torch

    from fqgan.generator import check_generator_tokenizer, load_generator
    from fqgan.runtime.device import enable_tf32, resolve_precision
    from fqgan.tokenizer import load_tokenizer

    enable_tf32(device)  # the tokenizer decodes in float32 with TF32 on a GPU, as the official sampling script
    generator, meta = load_generator(args.checkpoint, args.weights, device)
    tokenizer = load_tokenizer(args.tokenizer, device, args.tokenizer_weights)
    check_generator_tokenizer(generator.config, tokenizer.config)
    check_provenance(meta, tokenizer, args.checkpoint, args.tokenizer, args.allow_tokenizer_mismatch)
    k = generator.config.num_factors
    sampling: dict[str, Any] = {"top_k": args.top_k, "top_p": args.top_p,
                                "compile": args.compile if args.compile is not None else device.type == "cuda"}
    for name in ("cfg_scale", "temperature"):
        values = getattr(args, name)
        if len(values) not in (1, k):
            raise UsageError(f"--{name.replace('_', '-')} takes one value or k={k} values, got {len(values)}")
        sampling[name] = values[0] if len(values) == 1 else values
    if resolve_precision(args.precision, device) == "bf16":
        generator = generator.to(torch.bfloat16)  # RoPE stays float32 (a plain attribute), as official
    return generator, tokenizer, meta, sampling


def _run_sample_npz(args: argparse.Namespace, npz: Path):
    """``fqgan sample --npz``: :func:`fqgan.data.samples.write_samples_npz` with this generator and tokenizer."""
    import numpy as np
    import torch

    from fqgan.data.codes import resolve_classes
    from fqgan.data.samples import to_uint8, write_samples_npz
    from fqgan.generator.generate import class_labels, image_uniforms, sample_images
    from fqgan.runtime.device import resolve_precision
    from fqgan.runtime.dist import init_distributed, teardown_distributed
    from fqgan.runtime.logging import Progress

    num_images = args.num_images or 50_000
    info = init_distributed(args.device)
    try:
        generator, tokenizer, meta, sampling = _load_for_sampling(args, info.device)
        c = generator.config
        ids = (resolve_classes(args.classes, c.num_classes, meta.get("classes", ())) if args.classes
               else list(range(c.num_classes)))
        labels = class_labels(num_images, ids, args.class_order, args.seed)

        def make(indices, batch_labels):
            n = len(indices)
            # compiled: a short last batch is padded to --batch-size (its own graphs would compile for minutes)
            pad = args.batch_size - n if sampling["compile"] else 0
            indices = np.concatenate([indices, np.repeat(indices[-1:], max(pad, 0))])
            uniform = image_uniforms(args.seed, indices, c.num_factors, c.block_size, info.device)
            y = torch.from_numpy(np.concatenate([batch_labels, np.repeat(batch_labels[-1:], max(pad, 0))]))
            images = sample_images(generator, tokenizer, y.to(info.device), batch_size=len(indices),
                                   uniform=uniform, **sampling)
            return to_uint8(images[:n])

        # What the images are: a restart with other settings is refused, not mixed in (compile and batch size
        # change float rounding only, and may differ).
        plan = {"checkpoint": str(Path(args.checkpoint).resolve()), "weights": args.weights,
                "tokenizer": str(Path(args.tokenizer).resolve()), "tokenizer_weights": args.tokenizer_weights,
                "seed": args.seed, "classes": ids, "class_order": args.class_order, "cfg_scale": args.cfg_scale,
                "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                "precision": resolve_precision(args.precision, info.device)}
        progress: list[Any] = []

        def on_start(done: int, todo: int) -> None:
            # rank 0's bar: its own images times the number of processes (they run in step)
            progress.append(Progress(num_images, initial=done, desc="sample", unit="img",
                                     enabled=info.is_main and not args.quiet))

        try:
            result = write_samples_npz(npz, labels, make, shard_size=args.shard_size, batch_size=args.batch_size,
                                       plan=plan, keep_shards=args.keep_shards, on_start=on_start,
                                       on_batch=lambda b: progress[0].update(b * info.world_size))
        finally:
            for bar in progress:
                bar.close()
        if info.is_main:
            rate = result.generated / result.seconds if result.generated else 0.0
            tokens = rate * c.num_factors * c.block_size
            print(f"wrote {num_images} samples ({len(ids)} classes, {args.class_order}) to {npz} (arr_0 uint8 "
                  f"[N, H, W, 3], labels); this process sampled {result.generated} at {rate:.2f} images/s "
                  f"({tokens:.0f} tokens/s)" + (f", {result.skipped_shards} finished shards reused"
                                                 if result.skipped_shards else ""))
        return result
    finally:
        teardown_distributed()


# -- eval-generator ---------------------------------------------------------------------------------
def add_eval_generator_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fqgan eval-generator``."""
    p.add_argument("samples", metavar="SAMPLES.npz",
                   help="samples in ADM's format: arr_0 = uint8 images [N, H, W, 3] (`fqgan sample --npz`)")
    p.add_argument("--ref", required=True, metavar="REF",
                   help="reference batch: an ADM .npz (arr_0 images and/or precomputed mu, sigma [, mu_s, sigma_s]), "
                        "or an image folder (centre-cropped to the samples' size as ADM; its statistics are cached)")
    p.add_argument("--inception-weights", default=None, metavar="FILE",
                   help="the FID Inception weights: torch-fidelity's weights-inception-2015-12-05-6726825d.pth or "
                        "pytorch-fid's pt_inception-2015-12-05-6726825d.pth; default $FQGAN_INCEPTION_WEIGHTS, "
                        "else the torch hub cache (nothing is downloaded)")
    p.add_argument("--out", default=None, metavar="JSON",
                   help="write the metrics here (default: SAMPLES with the suffix .metrics.json)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--sfid", action="store_true", help="also compute sFID (mixed_6/conv features, as ADM)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="where a folder reference's statistics are cached (default: beside the folder)")
    p.add_argument("--batch-size", type=int, default=64, help="images per Inception forward (default: %(default)s)")
    _add_workers_argument(p, "DataLoader workers reading a reference folder")
    _add_bad_images_argument(p, "leaves them out of the reference statistics (the metrics' notes count them)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run_eval_generator(args: argparse.Namespace) -> dict[str, Any]:
    """``fqgan eval-generator``: FID, IS, precision / recall (sFID) of samples; prints a table, writes ``--out``."""
    from fqgan.eval.generator import evaluate_samples, format_generator_table
    from fqgan.runtime.signals import stop_on_signals

    _positive(args, "batch_size")
    num_workers = _workers(args)
    samples = Path(args.samples)
    out = Path(args.out) if args.out is not None else samples.with_name(samples.name.removesuffix(".npz")
                                                                          + ".metrics.json")
    # The output is checked before any input is read or any network loaded (evaluate_samples checks the inputs).
    check_output_file(out, (".json",))
    if out.exists() and not args.overwrite:
        raise UsageError(f"--out {out} exists: pass --overwrite to replace it, or another --out")
    with stop_on_signals(lambda: "the metrics were not written; run the same command again (a reference folder's "
                         "statistics are cached once complete, and reused)"):  # a scheduler's SIGTERM, as Ctrl-C
        result = evaluate_samples(samples, args.ref, weights=args.inception_weights, device=args.device,
                                  batch_size=args.batch_size, sfid=args.sfid, cache_dir=args.cache,
                                  num_workers=num_workers, bad_images=args.bad_images, progress=not args.quiet)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_generator_table(result))
    print(f"metrics          {out}")
    return result


# -- demo -------------------------------------------------------------------------------------------
def add_demo_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fqgan demo``: every :class:`~fqgan.demo.DemoConfig` field as a flag."""
    from fqgan.demo import DemoConfig

    add_options(p, DemoConfig)
    return p


def run_demo_command(args: argparse.Namespace):
    """``fqgan demo``."""
    from fqgan.demo import DemoConfig, run_demo

    cfg = DemoConfig(**read_options(args, DemoConfig))
    check_out_dir(cfg.out_dir, "--out-dir")
    m = run_demo(cfg)
    ev, ev_train, cas = m["tokenizer"]["eval"], m["tokenizer"]["eval_train_region"], m["classifier"]
    usage = ", ".join(f"{n} {u:.1%}" for n, u in zip(ev["codebook_names"], ev["usage"]))
    print(f"demo done in {m['total_wall_s']:.0f} s on {m['machine']['device']} ({m['precision']}, backend "
          f"{m['backend']}): tokenizer PSNR {ev['psnr']:.2f} dB held-out ({ev_train['psnr']:.2f} dB on the training "
          f"region), codebook usage {usage}; FAR loss {m['generator']['final_loss']:.3f}")
    print(f"samples classified as their photograph: {cas['samples_accuracy']:.1%} (real held-out crops "
          f"{cas['real_heldout_accuracy']:.1%}, chance {cas['chance']:.1%})")
    print(m["analysis"]["summary"])
    for r in m["speedups"]:
        print(f"  {r['op']}: {r['speedup']:.2f}x vs reference ({r['fused_ms']:.2f} ms vs {r['reference_ms']:.2f} ms)")
    print(f"report        {os.path.join(cfg.out_dir, 'report.md')}")
    return m


# -- analyze ----------------------------------------------------------------------------------------
def add_analyze_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fqgan analyze``."""
    p.add_argument("--tokenizer", required=True, metavar="CKPT",
                   help="tokenizer checkpoint: from `fqgan train-tokenizer` (or the demo), or an official "
                        "FQGAN-Dual/Triple file")
    p.add_argument("--data", default="sample", metavar="DIR|sample",
                   help="'sample': training-region crops of the sample photographs for the probes, held-out-region "
                        "crops to measure them (one class per photograph); or an image folder (labels from its "
                        "class folders), whose every 4th image is held out (default: %(default)s)")
    p.add_argument("--out", default="analysis", metavar="DIR",
                   help="writes subcodebook_reconstructions.png, embedding.png, usage.png, metrics.json here "
                        "(default: %(default)s)")
    p.add_argument("--num-images", type=int, default=380,
                   help="images per part (training, held-out) of the sample set; at most this many of a folder "
                        "(default: %(default)s)")
    p.add_argument("--method", choices=("tsne", "pca"), default="tsne",
                   help="2-D embedding of embedding.png (default: %(default)s)")
    p.add_argument("--fill", choices=("mean", "zero"), default="mean",
                   help="what replaces the other sub-codebooks' quantised maps when decoding one alone (default: "
                        "%(default)s: their mean over the analysed images)")
    p.add_argument("--weights", choices=("auto", "ema", "model"), default="auto",
                   help="which weights of the checkpoint (default: %(default)s = EMA when present)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seeds the crops, the probe and the embedding")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: %(default)s)")
    return p


def run_analyze(args: argparse.Namespace) -> dict[str, Any]:
    """``fqgan analyze``: what each sub-codebook of a tokenizer learned (:mod:`fqgan.eval.analysis`)."""
    from fqgan.eval.analysis import analyze_tokenizer, load_analysis_data
    from fqgan.runtime.device import resolve_device
    from fqgan.tokenizer.load import checkpoint_file, load_tokenizer

    _positive(args, "num_images", "batch_size")
    checkpoint_file(args.tokenizer)  # a missing file or folder fails before anything is loaded
    check_out_dir(args.out, flag="--out")
    model = load_tokenizer(args.tokenizer, resolve_device(args.device), args.weights)
    train, heldout, classes = load_analysis_data(args.data, model.config.image_size, args.num_images, args.seed)
    result = analyze_tokenizer(model, train, heldout, args.out, class_names=classes, method=args.method,
                               fill=args.fill, seed=args.seed, batch_size=args.batch_size)
    for name, p in result["probe"].items():
        print(f"{name}: linear probe {p['accuracy']:.1%} held-out (chance {result['chance']:.1%}), mutual information "
              f"{p['mutual_information']:.3f} bits (shuffled labels {p['mutual_information_shuffled']:.3f})")
    print(result["summary"])
    print(f"analysis      {args.out}")
    return result


# -- the parser -------------------------------------------------------------------------------------
Command = tuple[str, str, Callable[[argparse.ArgumentParser], Any], Callable[[argparse.Namespace], Any]]


def _commands() -> list[Command]:
    return [
        ("demo", "the whole pipeline, small, with no download: tokenizer, codes, FAR, samples, report",
         add_demo_arguments, run_demo_command),
        ("train-tokenizer", "train an FQGAN tokenizer (one process, or torchrun with DDP or FSDP)",
         add_train_tokenizer_arguments, run_train_tokenizer),
        ("eval-tokenizer", "reconstruction metrics of a tokenizer checkpoint: PSNR, SSIM, codebook usage, rFID",
         add_eval_tokenizer_arguments, run_eval_tokenizer),
        ("reconstruct", "reconstruct image files with a tokenizer checkpoint (PNGs, token maps, per-image PSNR)",
         add_reconstruct_arguments, run_reconstruct),
        ("extract-codes", "encode images (and their flips) into k token maps per image for generator training",
         add_extract_codes_arguments, run_extract_codes),
        ("train-generator", "train a FAR generator on extracted codes (one process, or torchrun with DDP or FSDP)",
         add_train_generator_arguments, run_train_generator),
        ("sample", "class-conditional samples from a generator and its tokenizer, as a PNG grid or (--npz) many "
         "class-balanced images in ADM's format for FID, resumable and sharded under torchrun",
         add_sample_arguments, run_sample),
        ("analyze", "what each sub-codebook of a tokenizer learned: reconstructions from each alone, a t-SNE, "
         "linear probes, mutual information, code usage", add_analyze_arguments, run_analyze),
        ("eval-generator", "FID, Inception Score, precision / recall (and sFID) of generated samples against a "
         "reference batch, as OpenAI's ADM evaluator", add_eval_generator_arguments, run_eval_generator),
    ]


def build_parser() -> argparse.ArgumentParser:
    """The ``fqgan`` parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="fqgan", description="FQGAN factorized tokenizer and FAR generator on fqgan-kernels.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, help_text, add_arguments, run in _commands():
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        add_arguments(p)
        p.set_defaults(_run=run, _parser=p)
    return parser


# The user's file system: a path that is missing, not a folder, or not writable.
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
# fqgan_kernels stands alone (it cannot import fqgan's error types): its input checks raise the built-in
# ValueError / TypeError, as torch's do.
_KERNELS = str(Path(__file__).resolve().parents[1] / "fqgan_kernels")


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` reports bad input (printed as one line) rather than a fault (a traceback): the package's own
    types (:class:`fqgan.runtime.errors.FQGANError`; fqgan raises no built-in ValueError or TypeError, which
    ``tests/fqgan/test_cli.py`` checks), a path error, or a ValueError / TypeError raised by a ``raise``
    statement of fqgan_kernels (its input checks). Any other exception, a ValueError raised inside torch, NumPy
    or Python itself included, is a fault and keeps its traceback."""
    from fqgan.runtime.errors import FQGANError

    if isinstance(exc, (FQGANError, *_PATH_ERRORS)):
        return True
    if not isinstance(exc, (ValueError, TypeError)) or exc.__traceback__ is None:
        return False
    tb = exc.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    where = str(Path(tb.tb_frame.f_code.co_filename).resolve())
    line = linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno).strip()
    return where.startswith(_KERNELS) and line.startswith("raise ")
# Modules of the package's extras (pyproject.toml), by import name: (the package to install, its extra).
_EXTRAS = {"PIL": ("pillow", "model"), "skimage": ("scikit-image", "model"), "scipy": ("scipy", "model"),
           "tqdm": ("tqdm", "model"), "matplotlib": ("matplotlib", "model"), "transformers": ("transformers", "model"),
           "torchvision": ("torchvision", "model"), "lpips": ("lpips", "model"), "sklearn": ("scikit-learn", "model"),
           "torch_fidelity": ("torch-fidelity", "eval")}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fqgan`` console script and ``python -m fqgan``. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        result = args._run(args)
        if getattr(result, "preempted", False):
            from fqgan.runtime.signals import PREEMPTED_EXIT_CODE

            print(f"fqgan {args.command}: stopped by a signal at step {result.step}, checkpoint {result.checkpoint}; "
                  f"continue with the same command and --resume auto", file=sys.stderr)
            return PREEMPTED_EXIT_CODE
    except KeyboardInterrupt as exc:  # Ctrl-C outside a training loop, or the demo's stage stopped by a signal
        from fqgan.runtime.signals import Stopped

        if isinstance(exc, Stopped):  # work that a signal ended, saying what it kept (rank 0 says it for all)
            if os.environ.get("RANK", "0") == "0":
                print(f"fqgan {args.command}: {exc}", file=sys.stderr)
            return exc.exit_code
        print(f"fqgan {args.command}: interrupted" + (f": {exc}" if str(exc) else ""), file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        if os.environ.get("FQGAN_DEBUG") or exc.name is None:
            raise
        package, extra = _EXTRAS.get(exc.name.split(".")[0], (None, None))
        if package is None:
            raise
        args._parser.exit(2, f"fqgan {args.command}: error: this command needs {package} (module {exc.name!r}), "
                             f"part of the {extra} extra: pip install 'fqgan-kernels[{extra}]'\n")
    except Exception as exc:
        if os.environ.get("FQGAN_DEBUG") or not is_user_error(exc):
            raise
        # A user error: say what to fix, without a traceback (once: rank 0 says an error every rank shares).
        args._parser.exit(2, None if getattr(exc, "printed_by_rank_0", False) else
                          f"fqgan {args.command}: error: {exc}\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
