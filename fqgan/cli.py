"""The ``fqgan`` command line: ``fqgan <command> --help`` documents each command.

Commands: ``train-tokenizer``, ``eval-tokenizer``, ``reconstruct``. Every command also runs as
``python -m fqgan <command>``, and under torchrun (``torchrun --nproc_per_node N -m fqgan <command>``)
where it trains or evaluates with one process per device.

Bad input (a missing file, an empty folder, a corrupted checkpoint, an unknown preset, ...) ends
with ``fqgan <command>: error: <what to fix>`` and exit status 2, without a traceback
(``FQGAN_DEBUG=1`` shows it).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

_EPILOG = """examples:
  fqgan demo                      # a few minutes on a CPU; writes demo_out/report.md
  fqgan train-tokenizer --preset tiny --data sample --steps 300 --perceptual-weight 0 --semantic-weight 0
  torchrun --nproc_per_node 8 -m fqgan train-tokenizer --data /data/imagenet/train --teacher /ckpt/clip-vit-l14
  fqgan eval-tokenizer --checkpoint runs/tokenizer/last.pt --data sample
  fqgan reconstruct photo.jpg --checkpoint runs/tokenizer/last.pt --out recon/
"""


def _add_run_arguments(p: argparse.ArgumentParser, run) -> None:
    """Optimisation and bookkeeping options shared by the training commands (defaults from ``run``)."""
    g = p.add_argument_group("optimisation (official defaults)")
    g.add_argument("--batch-size", type=int, default=run.global_batch_size,
                   help="global batch size, split over the processes (default: %(default)s)")
    g.add_argument("--steps", type=int, default=None, help="training steps (default: --epochs worth)")
    g.add_argument("--epochs", type=int, default=run.epochs, help="(default: %(default)s)")
    g.add_argument("--lr", type=float, default=run.lr,
                   help="learning rate (default: %(default)s)")
    g.add_argument("--beta1", type=float, default=run.beta1, help="(default: %(default)s)")
    g.add_argument("--beta2", type=float, default=run.beta2, help="(default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=run.weight_decay,
                   help="weight decay (default: %(default)s)")
    g.add_argument("--max-grad-norm", type=float, default=run.max_grad_norm,
                   help="gradient clipping, 0 disables (default: %(default)s)")
    g.add_argument("--ema", action="store_true", help="keep an EMA of the weights (saved as 'ema')")
    g.add_argument("--ema-decay", type=float, default=run.ema_decay, help="(default: %(default)s)")
    g.add_argument("--seed", type=int, default=run.seed, help="(default: %(default)s)")

    g = p.add_argument_group("run")
    g.add_argument("--out-dir", default=run.out_dir,
                   help="writes last.pt, metrics.jsonl, config.json here (default: %(default)s)")
    g.add_argument("--resume", default=None, metavar="CKPT|auto",
                   help="continue from a checkpoint; 'auto': OUT_DIR/last.pt when it exists")
    g.add_argument("--device", default=run.device, help="auto, cpu, cuda, cuda:N (default: %(default)s)")
    g.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=run.precision,
                   help="autocast dtype (default: %(default)s = bf16 on GPU, fp32 on CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--log-every", type=int, default=run.log_every,
                   help="steps per metrics.jsonl record (default: %(default)s)")
    g.add_argument("--ckpt-every", type=int, default=run.ckpt_every,
                   help="steps between rewrites of last.pt, 0: only at the end (default: %(default)s)")
    g.add_argument("--keep-every", type=int, default=run.keep_every,
                   help="also keep step_XXXXXXX.pt every this many steps (default: %(default)s = no)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


# -- train-tokenizer --------------------------------------------------------------------------------
def add_train_tokenizer_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fqgan train-tokenizer`` (defaults: the official FQGAN-Dual recipe)."""
    from fqgan.tokenizer.config import PRESETS, TokenizerLossConfig
    from fqgan.train.config import TokenizerTrainConfig

    run, loss = TokenizerTrainConfig(), TokenizerLossConfig()
    g = p.add_argument_group("model (a preset, then overrides)")
    g.add_argument("--preset", default="fqgan-dual-16", choices=sorted(PRESETS),
                   help="tokenizer architecture (default: %(default)s = FQGAN-Dual, 256 px, downsample 16; "
                        "'tiny': 32 px, for tests and the demo)")
    g.add_argument("--image-size", type=int, default=None, help="image side (default: the preset's)")
    g.add_argument("--codebook-size", type=int, default=None, help="codes per sub-codebook K (default: the preset's)")
    g.add_argument("--codebook-dim", type=int, default=None, help="code dimension D (default: the preset's, 8)")
    g.add_argument("--entropy-loss-ratio", type=float, default=None,
                   help="entropy loss weight (default: the preset's, 0.03 as the released runs)")
    g.add_argument("--disentanglement-ratio", type=float, default=None,
                   help="disentanglement loss weight (default: the preset's, 0.1; 0 disables)")
    g.add_argument("--commit-loss-beta", type=float, default=None, help="commitment weight beta (default: 0.25)")
    g.add_argument("--dropout-p", type=float, default=None, help="dropout in the encoder/decoder (default: 0)")
    g.add_argument("--quantizer-distributed", action=argparse.BooleanOptionalAction, default=None,
                   help="under torchrun, take the entropy loss's statistics over the global batch "
                        "(default: per process, as FQGAN's training)")
    g.add_argument("--quantizer-backend", default=None,
                   help="kernel backend of the quantizer: auto, reference, cpu, triton, cuda (default: auto)")

    g = p.add_argument_group("losses (official VQLoss options)")
    g.add_argument("--reconstruction-loss", choices=("l2", "l1"), default=loss.reconstruction_loss,
                   help="pixel loss (default: %(default)s)")
    g.add_argument("--reconstruction-weight", type=float, default=loss.reconstruction_weight,
                   help="(default: %(default)s)")
    g.add_argument("--perceptual-weight", type=float, default=loss.perceptual_weight,
                   help="LPIPS weight (default: %(default)s; needs --vgg16-weights and the lpips heads; 0 disables)")
    g.add_argument("--no-lpips-dropout", action="store_true",
                   help="turn off the LPIPS heads' dropout (the official loss keeps it live in training)")
    g.add_argument("--disc-loss", choices=("hinge", "vanilla", "non-saturating", "non-saturating-llamagen"),
                   default=loss.disc_loss, help="discriminator loss (default: %(default)s)")
    g.add_argument("--gen-loss", choices=("hinge", "non-saturating", "non-saturating-llamagen"),
                   default=loss.gen_loss, help="generator adversarial loss (default: %(default)s)")
    g.add_argument("--disc-weight", type=float, default=loss.disc_weight, help="GAN weight (default: %(default)s)")
    g.add_argument("--disc-start", type=int, default=loss.disc_start,
                   help="step from which the GAN terms count (default: %(default)s)")
    g.add_argument("--skip-disc-until-start", action="store_true",
                   help="skip the discriminator step before --disc-start (the official loop runs it with weight 0)")
    g.add_argument("--disc-adaptive-weight", action="store_true",
                   help="scale the GAN term by ||grad nll|| / ||grad gan|| at the decoder's last layer "
                        "(off in the official runs)")
    g.add_argument("--disc-dim", type=int, default=loss.disc_dim, help="PatchGAN width (default: %(default)s)")
    g.add_argument("--disc-num-layers", type=int, default=loss.disc_num_layers,
                   help="PatchGAN depth (default: %(default)s)")
    g.add_argument("--semantic-weight", type=float, default=loss.semantic_weight,
                   help="feature-prediction (InfoNCE) weight (default: %(default)s; needs the teachers; "
                        "0 disables)")

    g = p.add_argument_group("weight files (local only: nothing is downloaded)")
    g.add_argument("--teacher", action="append", default=None, metavar="DIR",
                   help="a teacher's save_pretrained folder, once per feature head in sub-codebook order "
                        "(default: the preset's teacher names, looked up under $FQGAN_TEACHERS_DIR and the "
                        "Hugging Face cache)")
    g.add_argument("--vgg16-weights", default=None, metavar="FILE",
                   help="torchvision vgg16-397923af.pth for LPIPS (default: $FQGAN_VGG16_WEIGHTS, torch hub cache)")
    g.add_argument("--lpips-weights", default=None, metavar="FILE",
                   help="LPIPS v0.1 vgg.pth heads (default: $FQGAN_LPIPS_WEIGHTS, the lpips wheel's copy)")

    g = p.add_argument_group("data")
    g.add_argument("--data", default=run.data,
                   help="image folder (any depth; labels from the first-level folders) or 'sample' for the "
                        "built-in photographs (default: %(default)s)")
    g.add_argument("--sample-length", type=int, default=run.sample_length,
                   help="random crops per epoch of the sample set (default: %(default)s)")
    g.add_argument("--num-workers", type=int, default=run.num_workers,
                   help="data-loading processes per training process (default: %(default)s)")

    _add_run_arguments(p, run)
    return p


def tokenizer_config_from_args(args: argparse.Namespace):
    """The :class:`TokenizerTrainConfig` of parsed ``train-tokenizer`` arguments."""
    from fqgan.tokenizer.config import TokenizerLossConfig, get_preset
    from fqgan.train.config import TokenizerTrainConfig

    names = ("image_size", "codebook_size", "codebook_dim", "entropy_loss_ratio", "disentanglement_ratio",
             "commit_loss_beta", "dropout_p", "quantizer_distributed", "quantizer_backend")
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    model = get_preset(args.preset, **overrides)
    loss = TokenizerLossConfig(
        reconstruction_loss=args.reconstruction_loss, reconstruction_weight=args.reconstruction_weight,
        perceptual_weight=args.perceptual_weight, lpips_dropout=not args.no_lpips_dropout,
        disc_loss=args.disc_loss, gen_loss=args.gen_loss, disc_weight=args.disc_weight, disc_start=args.disc_start,
        disc_adaptive_weight=args.disc_adaptive_weight, disc_dim=args.disc_dim,
        disc_num_layers=args.disc_num_layers, semantic_weight=args.semantic_weight)
    return TokenizerTrainConfig(
        model=model, loss=loss, teachers=tuple(args.teacher) if args.teacher else None,
        skip_disc_until_start=args.skip_disc_until_start,
        vgg16_weights=args.vgg16_weights, lpips_weights=args.lpips_weights,
        out_dir=args.out_dir, data=args.data, sample_length=args.sample_length, num_workers=args.num_workers,
        global_batch_size=args.batch_size, max_steps=args.steps, epochs=args.epochs, lr=args.lr,
        beta1=args.beta1, beta2=args.beta2, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        ema=args.ema, ema_decay=args.ema_decay, seed=args.seed, device=args.device, precision=args.precision,
        compile=args.compile, log_every=args.log_every, ckpt_every=args.ckpt_every, keep_every=args.keep_every,
        resume=args.resume, quiet=args.quiet)


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
    p.add_argument("--no-flip", action="store_true",
                   help="encode the images only (default: each image and its horizontal flip, as official)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch and process (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=4, help="data-loading processes (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sample set's fixed crops (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run_extract_codes(args: argparse.Namespace):
    """``fqgan extract-codes``: tokenizer -> k index maps per image (and its flip), with labels."""
    from torch.utils.data import Subset

    from fqgan.codes import extract_codes
    from fqgan.data import build_dataset
    from fqgan.eval.tokenizer import load_tokenizer_checkpoint
    from fqgan.train.common import Progress, init_distributed, teardown_distributed

    for name in ("num_images", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    info = init_distributed(args.device)
    try:
        tokenizer = load_tokenizer_checkpoint(args.tokenizer, info.device, args.weights)
        dataset = build_dataset(args.data, tokenizer.config.image_size, augment=False, seed=args.seed,
                                sample_length=args.num_images or 512)
        classes = list(dataset.classes)
        if args.num_images is not None and args.num_images < len(dataset):
            dataset = Subset(dataset, range(args.num_images))
        progress = Progress((len(dataset) + info.world_size - 1) // info.world_size, desc="extract-codes",
                            enabled=info.is_main and not args.quiet, unit="img")
        try:
            meta = extract_codes(tokenizer, dataset, args.out, flip=not args.no_flip, batch_size=args.batch_size,
                                 num_workers=args.num_workers, device=info.device, tokenizer_path=str(args.tokenizer),
                                 classes=classes, on_batch=lambda b: progress.update(b))
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
def add_train_generator_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fqgan train-generator`` (defaults: the official FAR recipe)."""
    from fqgan.generator import PRESETS
    from fqgan.train.config import GeneratorTrainConfig

    run = GeneratorTrainConfig()
    g = p.add_argument_group("model")
    g.add_argument("--codes", required=True, metavar="DIR",
                   help="code folder from `fqgan extract-codes` (sets k, the codebook size, the grid, the classes)")
    g.add_argument("--preset", default=run.preset, choices=sorted(PRESETS),
                   help="FAR size (default: %(default)s; FAR-tiny for CPU runs)")
    g.add_argument("--num-classes", type=int, default=None,
                   help="class count of the label table (default: the code folder's)")
    for name, kind, text in (("dim", int, "width"), ("n-layer", int, "trunk layers"), ("n-head", int, "heads"),
                             ("ar-n-layer", int, "layers of the factorized AR head"),
                             ("token-dropout-p", float, "token dropout (official 0.1)"),
                             ("dropout-p", float, "residual and FFN dropout (official 0.1)"),
                             ("drop-path-rate", float, "stochastic depth (official 0); > 0 turns residual and "
                                                       "FFN dropout off unless --dropout-p is given, as official"),
                             ("class-dropout-prob", float, "label dropout for CFG (official 0.1)")):
        g.add_argument(f"--{name}", type=kind, default=None, help=f"{text} (default: the preset's)")
    g = p.add_argument_group("data")
    g.add_argument("--num-workers", type=int, default=run.num_workers,
                   help="data-loading processes per training process (default: %(default)s)")
    _add_run_arguments(p, run)
    return p


def generator_config_from_args(args: argparse.Namespace):
    """The :class:`GeneratorTrainConfig` of parsed ``train-generator`` arguments."""
    from fqgan.train.config import GeneratorTrainConfig

    overrides = {}
    for name in ("dim", "n_layer", "n_head", "ar_n_layer", "token_dropout_p", "drop_path_rate", "class_dropout_prob"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.dropout_p is not None:
        overrides["resid_dropout_p"] = overrides["ffn_dropout_p"] = args.dropout_p
    return GeneratorTrainConfig(
        codes=args.codes, preset=args.preset, model_overrides=overrides, num_classes=args.num_classes,
        out_dir=args.out_dir, num_workers=args.num_workers, global_batch_size=args.batch_size, max_steps=args.steps,
        epochs=args.epochs, lr=args.lr, beta1=args.beta1, beta2=args.beta2, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, ema=args.ema, ema_decay=args.ema_decay, seed=args.seed, device=args.device,
        precision=args.precision, compile=args.compile, log_every=args.log_every, ckpt_every=args.ckpt_every,
        keep_every=args.keep_every, resume=args.resume, quiet=args.quiet)


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
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="generator checkpoint (from `fqgan train-generator`, or an official FAR file)")
    p.add_argument("--tokenizer", required=True, metavar="CKPT", help="the tokenizer whose codes trained it")
    p.add_argument("--class", dest="classes", action="append", required=True, metavar="ID",
                   help="class id (or a class name of the training codes); repeat for several classes")
    p.add_argument("--n", type=int, default=16, help="images per class (default: %(default)s)")
    p.add_argument("--out", default="samples.png", metavar="PNG", help="grid to write (default: %(default)s)")
    p.add_argument("--cfg-scale", type=_floats, default=[2.0],
                   help="classifier-free guidance >= 1, one value or one per sub-token, e.g. 4,2 (default: 2, "
                        "the released FAR evaluation's)")
    p.add_argument("--temperature", type=_floats, default=[1.0], help="> 0, one or one per sub-token (default: 1)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--weights", choices=("auto", "ema", "model"), default="auto",
                   help="generator weights (default: %(default)s = EMA when present)")
    p.add_argument("--tokenizer-weights", choices=("auto", "ema", "model"), default="auto",
                   help="tokenizer weights (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="images generated at once (default: %(default)s)")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: --n, at most 16)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: %(default)s)")
    return p


def run_sample(args: argparse.Namespace):
    """``fqgan sample``: class-conditional images from a generator + tokenizer, as a PNG grid."""
    import torch

    from fqgan.codes import check_generator_tokenizer, resolve_classes, sample_images
    from fqgan.eval.tokenizer import load_tokenizer_checkpoint
    from fqgan.images import save_grid
    from fqgan.train.common import resolve_device
    from fqgan.train.generator import load_generator

    if args.n < 1 or args.batch_size < 1:
        raise ValueError("--n and --batch-size must be positive")
    device = resolve_device(args.device)
    generator, meta = load_generator(args.checkpoint, args.weights, device)
    tokenizer = load_tokenizer_checkpoint(args.tokenizer, device, args.tokenizer_weights)
    check_generator_tokenizer(generator.config, tokenizer.config)
    ids = resolve_classes(args.classes, generator.config.num_classes, meta.get("classes", ()))
    labels = torch.tensor([c for c in ids for _ in range(args.n)], dtype=torch.long, device=device)
    k = generator.config.num_factors
    per = {}
    for name in ("cfg_scale", "temperature"):
        values = getattr(args, name)
        if len(values) not in (1, k):
            raise ValueError(f"--{name.replace('_', '-')} takes one value or k={k} values, got {len(values)}")
        per[name] = values[0] if len(values) == 1 else values
    images = sample_images(generator, tokenizer, labels, batch_size=args.batch_size, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed, **per)
    grid = save_grid(images.float().cpu(), args.out, nrow=args.nrow or min(args.n, 16))
    names = meta.get("classes", ())
    shown = ", ".join(f"{c} ({names[c]})" if c < len(names) else str(c) for c in ids)
    print(f"wrote {len(labels)} samples of class {shown} to {getattr(grid, 'path', args.out)}")
    return images


# -- demo -------------------------------------------------------------------------------------------
_DEMO_HELP = {
    "out_dir": "writes reconstructions.png, samples.png, training_curves.png, metrics.json, report.md here",
    "device": "auto (CUDA when present), cpu, cuda, cuda:N",
    "threads": "CPU threads: auto = cores not already busy (load average), or a number",
    "tokenizer_steps": "tokenizer training steps",
    "tokenizer_batch": "tokenizer batch size",
    "tokenizer_lr": "tokenizer learning rate",
    "codebook_size": "codes per sub-codebook",
    "train_crops": "random crops of the sample photographs per tokenizer epoch",
    "eval_images": "held-out crops for PSNR and codebook usage",
    "code_images": "crops encoded for the generator (each also flipped)",
    "generator_steps": "FAR training steps",
    "generator_batch": "FAR batch size",
    "generator_lr": "FAR learning rate",
    "generator_dim": "FAR width",
    "generator_layers": "FAR trunk layers",
    "sample_classes": "classes (photographs) to sample, 1..19",
    "samples_per_class": "samples per class",
    "cfg_scale": "classifier-free guidance scale (>= 1)",
    "speed_rounds": "timed rounds per op in the kernel-vs-reference comparison",
    "grid_scale": "PNG grids show each image this many times larger (nearest neighbour)",
    "seed": "seed of every stage",
    "quiet": "no progress bars",
}


def add_demo_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fqgan demo``: every :class:`~fqgan.demo.DemoConfig` field as a flag."""
    import dataclasses

    from fqgan.demo import DemoConfig

    for f in dataclasses.fields(DemoConfig):
        flag = "--" + f.name.replace("_", "-")
        text = _DEMO_HELP.get(f.name, f.name)
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", help=text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(flag, type=kind, default=f.default, help=f"{text} (default: %(default)s)")
    return p


def run_demo_command(args: argparse.Namespace):
    """``fqgan demo``."""
    import dataclasses

    from fqgan.demo import DemoConfig, run_demo

    cfg = DemoConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)})
    m = run_demo(cfg)
    ev = m["tokenizer"]["eval"]
    usage = ", ".join(f"{n} {u:.1%}" for n, u in zip(ev["codebook_names"], ev["usage"]))
    print(f"demo done in {m['total_wall_s']:.0f} s on {m['machine']['device']} (backend {m['backend']}): "
          f"tokenizer PSNR {ev['psnr']:.2f} dB, codebook usage {usage}; FAR loss {m['generator']['final_loss']:.3f}")
    for r in m["speedups"]:
        print(f"  {r['op']}: {r['speedup']:.2f}x vs reference ({r['fused_ms']:.2f} ms vs {r['reference_ms']:.2f} ms)")
    print(f"report        {os.path.join(cfg.out_dir, 'report.md')}")
    return m


# -- the parser -------------------------------------------------------------------------------------
Command = tuple[str, str, Callable[[argparse.ArgumentParser], Any], Callable[[argparse.Namespace], Any]]


def _commands() -> list[Command]:
    from fqgan.eval.tokenizer import (
        add_eval_tokenizer_arguments,
        add_reconstruct_arguments,
        run_eval_tokenizer,
        run_reconstruct,
    )

    return [
        ("demo", "the whole pipeline, small, with no download: tokenizer, codes, FAR, samples, report",
         add_demo_arguments, run_demo_command),
        ("train-tokenizer", "train an FQGAN tokenizer (single process or torchrun DDP)",
         add_train_tokenizer_arguments, run_train_tokenizer),
        ("eval-tokenizer", "reconstruction metrics of a tokenizer checkpoint: PSNR, SSIM, codebook usage, rFID",
         add_eval_tokenizer_arguments, run_eval_tokenizer),
        ("reconstruct", "reconstruct image files with a tokenizer checkpoint (PNGs, token maps, per-image PSNR)",
         add_reconstruct_arguments, run_reconstruct),
        ("extract-codes", "encode images (and their flips) into k token maps per image for generator training",
         add_extract_codes_arguments, run_extract_codes),
        ("train-generator", "train a FAR generator on extracted codes (single process or torchrun DDP)",
         add_train_generator_arguments, run_train_generator),
        ("sample", "class-conditional samples from a generator and its tokenizer, as a PNG grid",
         add_sample_arguments, run_sample),
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


_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError, ModuleNotFoundError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fqgan`` console script and ``python -m fqgan``. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        args._run(args)
    except KeyboardInterrupt:
        print(f"fqgan {args.command}: interrupted", file=sys.stderr)
        return 130
    except _USER_ERRORS as exc:
        if os.environ.get("FQGAN_DEBUG"):
            raise
        # A user error: say what to fix, without a traceback.
        args._parser.exit(2, f"fqgan {args.command}: error: {exc}\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
