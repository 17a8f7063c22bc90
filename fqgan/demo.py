"""``fqgan demo``: the whole pipeline, small, on a fresh machine with no download.

1. train a small FQGAN tokenizer (TINY preset: 32x32 images, 8x8 tokens, k = 2 sub-codebooks) on the
   built-in sample photographs; report PSNR and codebook usage per sub-codebook on held-out crops;
2. extract its codes (each image and its flip);
3. train a tiny FAR on the codes (one class per photograph);
4. sample images per class;
5. time the fused kernels against ``fk.reference`` on this run's real shapes;
6. write ``demo_out/``: ``reconstructions.png``, ``samples.png``, ``training_curves.png``,
   ``metrics.json``, ``report.md`` (and the checkpoints, codes and metrics logs it made).

The semantic (feature-prediction) loss and LPIPS need weights from the network, and a GAN needs far
more steps than a demo has, so the demo's tokenizer trains with pixel + quantizer losses only (the
report says so). Every stage runs on the GPU when there is one; every long stage shows a progress bar.

The stages and the report stay in this one file (about 400 lines), read top to bottom as the run goes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import fqgan_kernels as fk
from fqgan.runtime.options import option


@dataclass
class DemoConfig:
    """Settings of ``fqgan demo`` (defaults: about 7 minutes on 2 shared CPU cores; see docs/training.md)."""

    out_dir: str = option("demo_out", "writes reconstructions.png, samples.png, training_curves.png, metrics.json, "
                          "report.md here")
    device: str = option("auto", "auto (CUDA when present), cpu, cuda, cuda:N")
    threads: str = option("auto", "CPU threads: auto = cores not already busy (load average), or a number")
    seed: int = option(0, "seed of every stage")
    # tokenizer
    # 22.2 dB PSNR on the held-out crops (200 steps: 18.3 dB, blurry)
    tokenizer_steps: int = option(800, "tokenizer training steps")
    tokenizer_batch: int = option(16, "tokenizer batch size")
    # 10x the official 1e-4: a few hundred steps instead of 200k
    tokenizer_lr: float = option(1e-3, "tokenizer learning rate")
    codebook_size: int = option(512, "codes per sub-codebook")
    train_crops: int = option(1024, "random crops of the sample photographs per tokenizer epoch")
    eval_images: int = option(256, "held-out crops for PSNR and codebook usage")
    # generator
    # fixed crops encoded (x2 with flips): 20 per photograph
    code_images: int = option(380, "crops encoded for the generator (each also flipped)")
    generator_steps: int = option(100, "FAR training steps")
    generator_batch: int = option(16, "FAR batch size")
    # 10x the official 1e-4: a few hundred steps
    generator_lr: float = option(1e-3, "FAR learning rate")
    generator_dim: int = option(96, "FAR width")
    generator_layers: int = option(3, "FAR trunk layers")
    # sampling
    sample_classes: int = option(8, "classes (photographs) to sample, 1..19")
    samples_per_class: int = option(4, "samples per class")
    cfg_scale: float = option(2.0, "classifier-free guidance scale (>= 1)")
    grid_scale: int = option(4, "PNG grids show each image this many times larger (nearest neighbour)")
    speed_rounds: int = option(5, "timed rounds per op in the kernel-vs-reference comparison")
    quiet: bool = option(False, "no progress bars")

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", int) and (isinstance(v, bool) or not isinstance(v, int) or v < 1) and \
                    f.name != "seed":
                raise ValueError(f"{f.name} must be a positive int, got {v!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 1 <= self.sample_classes <= 19:
            raise ValueError(f"sample_classes must be in 1..19 (the sample set's photographs), "
                             f"got {self.sample_classes}")
        if self.code_images < self.generator_batch:
            raise ValueError(f"code_images ({self.code_images}) must be at least generator_batch "
                             f"({self.generator_batch})")
        if self.train_crops < self.tokenizer_batch:
            raise ValueError(f"train_crops ({self.train_crops}) must be at least tokenizer_batch "
                             f"({self.tokenizer_batch})")
        if self.cfg_scale < 1:
            raise ValueError(f"cfg_scale must be >= 1, got {self.cfg_scale}")


def resolve_threads(threads: str) -> int:
    """``"auto"``: the CPU cores minus the current 1-minute load (at least 1); else an int."""
    cores = os.cpu_count() or 1
    if threads == "auto":
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
        return max(1, min(cores, round(cores - load)))
    try:
        n = int(threads)
    except ValueError:
        raise ValueError(f"--threads must be 'auto' or a positive int, got {threads!r}") from None
    if n < 1:
        raise ValueError(f"--threads must be positive, got {n}")
    return n


class _Stages:
    """Wall and CPU seconds per stage."""

    def __init__(self) -> None:
        self.times: dict[str, dict[str, float]] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        out = fn()
        self.times[name] = {"wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(_cpu_seconds() - cpu0, 2)}
        return out


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


# -- kernel vs reference timing -----------------------------------------------------------------------
def _time(fn: Callable[[], Any], rounds: int, device: torch.device) -> float:
    fn()  # warm-up (first-call dispatch, allocations)
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernel_speedups(tokenizer_cfg, generator_cfg, batch: int, far_batch: int, device: torch.device,
                    rounds: int, progress=None) -> list[dict[str, Any]]:
    """Median seconds of the fused ops and of ``fk.reference`` on this run's shapes, and their ratio:
    the quantizer's training step (forward + backward, entropy loss on) at the tokenizer's latent shape,
    the FAR heads' linear + cross-entropy (forward + backward) and the sampling step of generation."""
    g = torch.Generator(device="cpu").manual_seed(0)
    k, K, D = tokenizer_cfg.num_codebooks, tokenizer_cfg.codebook_size, tokenizer_cfg.codebook_dim
    grid = tokenizer_cfg.grid_size
    z = torch.randn(batch, k * D, grid, grid, generator=g).to(device)
    rows = []

    def quantizer_step(backend: str) -> Callable[[], None]:
        torch.manual_seed(0)
        q = fk.FactorizedQuantizer(num_codebooks=k, codebook_size=K, codebook_dim=D,
                                   entropy_weight=tokenizer_cfg.entropy_loss_ratio,
                                   disentangle_weight=tokenizer_cfg.disentanglement_ratio, channel_first=True,
                                   distributed=False, backend=backend).to(device).train()
        zz = z.clone().requires_grad_(True)

        def step() -> None:
            out = q(zz)
            (out.quantized.square().mean() + out.loss).backward()
        return step

    Vg, H, kg, T = generator_cfg.vocab_size, generator_cfg.dim, generator_cfg.num_factors, generator_cfg.block_size
    n = far_batch * T
    hidden = torch.randn(kg, n, H, generator=g).to(device).requires_grad_(True)
    weight = (torch.randn(kg, Vg, H, generator=g) * 0.02).to(device).requires_grad_(True)
    targets = torch.randint(0, Vg, (kg, n), generator=g).to(device)

    def lce(fn) -> Callable[[], None]:
        def step() -> None:
            fn(hidden, weight, targets).loss.backward()
        return step

    logits = torch.randn(far_batch * 2, Vg, generator=g).to(device)
    uniform = torch.rand(far_batch, generator=g).to(device)

    def sampler(fn) -> Callable[[], None]:
        cond, uncond = logits[:far_batch], logits[far_batch:]
        return lambda: fn(cond, uncond, cfg_scale=2.0, temperature=1.0, top_k=0, top_p=0.9, uniform=uniform)

    cases = [
        ("quantizer step (fwd+bwd, entropy on)", f"z [{batch}, {k}x{D}, {grid}, {grid}], K={K}",
         quantizer_step("auto"), quantizer_step("reference")),
        ("FAR heads: linear + cross-entropy (fwd+bwd)", f"hidden [{kg}, {n}, {H}], V={Vg}",
         lce(fk.linear_cross_entropy), lce(fk.reference.linear_cross_entropy)),
        ("sampling with CFG + top-p", f"logits [{far_batch}, {Vg}] x2",
         sampler(fk.sample), sampler(fk.reference.sample)),
    ]
    for name, shape, fused, ref in cases:
        t_fused = _time(fused, rounds, device)
        t_ref = _time(ref, rounds, device)
        rows.append({"op": name, "shape": shape, "fused_ms": round(t_fused * 1e3, 3),
                     "reference_ms": round(t_ref * 1e3, 3), "speedup": round(t_ref / t_fused, 2)})
        if progress is not None:
            progress.update(1)
    return rows


# -- plots and report ---------------------------------------------------------------------------------
def plot_curves(tokenizer_metrics: list[dict], generator_metrics: list[dict], path: str) -> str:
    """Two panels: the tokenizer's pixel loss and PSNR-equivalent, the generator's loss per sub-token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ax = axes[0]
    steps = [r["step"] for r in tokenizer_metrics]
    ax.plot(steps, [r["rec"] for r in tokenizer_metrics], label="pixel MSE (train batch)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("tokenizer")
    ax2 = ax.twinx()
    ax2.plot(steps, [10 * math.log10(4.0 / max(r["rec"], 1e-12)) for r in tokenizer_metrics], color="tab:green",
             label="PSNR of that MSE (dB)")
    ax2.set_ylabel("dB")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
    ax = axes[1]
    steps = [r["step"] for r in generator_metrics]
    ax.plot(steps, [r["loss"] for r in generator_metrics], label="loss (mean over sub-tokens)")
    for key in sorted(k for k in generator_metrics[0] if k.startswith("loss_")):
        ax.plot(steps, [r[key] for r in generator_metrics], label=key.replace("loss_", "sub-token "), alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("FAR generator")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _report(m: dict[str, Any]) -> str:
    tok, gen, cfg = m["tokenizer"], m["generator"], m["config"]
    lines = [
        "# fqgan demo",
        "",
        f"Run on {m['machine']['cpu']} ({m['machine']['device']}, {m['machine']['threads']} threads, "
        f"load average {m['machine']['load_before']:.1f} before the run), torch {m['machine']['torch']}, "
        f"{m['date']}. Kernel backend: **{m['backend']}** (`fk.backends()` below).",
        "",
        "## What ran",
        "",
        f"1. Tokenizer: FQGAN TINY preset (k = {tok['num_codebooks']} sub-codebooks of {cfg['codebook_size']} codes, "
        f"D = 8, 32x32 images, 8x8 tokens), {cfg['tokenizer_steps']} steps at batch {cfg['tokenizer_batch']} on random "
        "crops of scikit-image's bundled photographs. Losses: pixel L2 + codebook/commitment + entropy + "
        "disentanglement (LPIPS and the semantic teacher need downloaded weights; the GAN needs far more steps).",
        f"2. Evaluation on {tok['eval']['num_images']} held-out fixed crops: PSNR **{tok['eval']['psnr']:.2f} dB**, "
        f"SSIM {tok['eval']['ssim']:.3f}; codebook usage " + ", ".join(
            f"{n} {u:.1%} (perplexity {p:.0f})"
            for n, u, p in zip(tok["eval"]["codebook_names"], tok["eval"]["usage"], tok["eval"]["perplexity"])) + ".",
        f"3. Codes: {gen['codes']['num_images']} crops x 2 (with flips) -> [k, 8, 8] index maps.",
        f"4. Generator: FAR (dim {cfg['generator_dim']}, {cfg['generator_layers']} layers, factorized AR head), "
        f"{cfg['generator_steps']} steps at batch {cfg['generator_batch']}; final loss {gen['final_loss']:.3f} nats "
        f"(uniform guessing: {math.log(cfg['codebook_size']):.3f}).",
        f"5. Samples: {cfg['samples_per_class']} per class for {cfg['sample_classes']} classes, "
        f"CFG {cfg['cfg_scale']}.",
        "",
        "## Timings",
        "",
        "| stage | wall s | CPU s |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {k} | {v['wall_s']:.1f} | {v['cpu_s']:.1f} |" for k, v in m["stages"].items()]
    lines += [f"| **total** | **{m['total_wall_s']:.1f}** | {m['total_cpu_s']:.1f} |", "",
              "## Fused kernels vs reference (this run, same shapes)", "",
              f"Median of {cfg['speed_rounds']} rounds after a warm-up, on {m['machine']['device']}.", "",
              "| op | shape | fused ms | reference ms | speed-up |", "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['op']} | {r['shape']} | {r['fused_ms']:.2f} | {r['reference_ms']:.2f} | {r['speedup']:.2f}x |"
              for r in m["speedups"]]
    lines += ["", "## Files", "",
              "* `reconstructions.png`: held-out crops (top rows) above their reconstructions",
              "* `samples.png`: one row per class (its photograph's name on the left)",
              "* `training_curves.png`, `metrics.json`; `tokenizer/`, `codes/`, `generator/`: checkpoints and logs",
              "", "## Backends", "", "```", m["backends"], "```", ""]
    return "\n".join(lines)


def _enlarge(images: torch.Tensor, scale: int) -> torch.Tensor:
    """``[B, 3, H, W]`` -> ``[B, 3, sH, sW]`` on the CPU, nearest neighbour (pixels stay visible)."""
    x = images.detach().float().cpu()
    return torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest") if scale > 1 else x


# -- the demo -----------------------------------------------------------------------------------------
def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo (module docstring); returns what ``metrics.json`` holds."""
    from torch.utils.data import DataLoader

    from fqgan.data import SAMPLE_PHOTOS, SampleImages, collate
    from fqgan.data.codes import extract_codes
    from fqgan.data.images import save_comparison_grid, save_grid
    from fqgan.eval.tokenizer import evaluate_tokenizer
    from fqgan.generator import load_generator, sample_images
    from fqgan.runtime.device import resolve_device
    from fqgan.runtime.logging import Progress, read_metrics
    from fqgan.tokenizer.config import TINY, TokenizerLossConfig
    from fqgan.tokenizer.load import load_tokenizer
    from fqgan.train.config import GeneratorTrainConfig, TokenizerTrainConfig
    from fqgan.train.generator import train_generator
    from fqgan.train.tokenizer import train_tokenizer

    cfg.validate()
    try:
        load_before = os.getloadavg()[0]
    except OSError:
        load_before = float("nan")
    threads = resolve_threads(cfg.threads)
    torch.set_num_threads(threads)
    device = resolve_device(cfg.device)
    out = cfg.out_dir
    os.makedirs(out, exist_ok=True)
    show = not cfg.quiet
    stages = _Stages()
    t_start, cpu_start = time.perf_counter(), _cpu_seconds()
    dev = str(device)

    # 1. tokenizer
    tok_model = TINY.replace(codebook_size=cfg.codebook_size, feat_pred_dims=(0, 0), teachers=(None, None))
    tok_cfg = TokenizerTrainConfig(
        out_dir=os.path.join(out, "tokenizer"), model=tok_model,
        loss=TokenizerLossConfig(perceptual_weight=0.0, semantic_weight=0.0, disc_start=10 ** 9),
        skip_disc_until_start=True, data="sample", sample_length=cfg.train_crops, num_workers=0,
        global_batch_size=cfg.tokenizer_batch, max_steps=cfg.tokenizer_steps, lr=cfg.tokenizer_lr, seed=cfg.seed,
        device=dev, log_every=max(1, cfg.tokenizer_steps // 50), ckpt_every=0, quiet=not show)
    tok_result = stages.run("train tokenizer", lambda: train_tokenizer(tok_cfg))
    tokenizer = load_tokenizer(tok_result.checkpoint, device)

    eval_set = SampleImages(32, length=cfg.eval_images, augment=False, seed=cfg.seed + 1)
    bar = Progress(len(eval_set), desc="evaluate tokenizer", enabled=show, unit="img")
    try:
        ev = stages.run("evaluate tokenizer", lambda: evaluate_tokenizer(
            tokenizer, DataLoader(eval_set, batch_size=64, collate_fn=collate), device=device,
            on_batch=bar.update))
    finally:
        bar.close()
    originals = torch.stack([eval_set[i][0] for i in range(min(16, len(eval_set)))]).to(device)
    with torch.no_grad():
        recons = tokenizer.decode_indices(tokenizer.encode(originals)).clamp(-1, 1)
    save_comparison_grid(_enlarge(originals, cfg.grid_scale), _enlarge(recons, cfg.grid_scale),
                         os.path.join(out, "reconstructions.png"), nrow=8)

    # 2. codes
    code_set = SampleImages(32, length=cfg.code_images, augment=False, seed=cfg.seed)
    bar = Progress(len(code_set), desc="extract codes", enabled=show, unit="img")
    try:
        meta = stages.run("extract codes", lambda: extract_codes(
            tokenizer, code_set, os.path.join(out, "codes"), batch_size=64, device=device,
            tokenizer_path=tok_result.checkpoint, on_batch=bar.update))
    finally:
        bar.close()

    # 3. generator
    gen_cfg = GeneratorTrainConfig(
        out_dir=os.path.join(out, "generator"), codes=os.path.join(out, "codes"), preset="FAR-tiny",
        model_overrides={"dim": cfg.generator_dim, "n_layer": cfg.generator_layers}, num_workers=0,
        global_batch_size=cfg.generator_batch, max_steps=cfg.generator_steps, lr=cfg.generator_lr, seed=cfg.seed,
        device=dev, log_every=max(1, cfg.generator_steps // 50), ckpt_every=0, quiet=not show)
    gen_result = stages.run("train generator", lambda: train_generator(gen_cfg))
    generator, _ = load_generator(gen_result.checkpoint, device=device)

    # 4. samples
    labels = torch.arange(cfg.sample_classes, device=device).repeat_interleave(cfg.samples_per_class)
    bar = Progress(1, desc="sample", enabled=show, unit="grid")
    try:
        images = stages.run("sample", lambda: sample_images(generator, tokenizer, labels, batch_size=64,
                                                            cfg_scale=cfg.cfg_scale, seed=cfg.seed))
        bar.update(1)
    finally:
        bar.close()
    names = [os.path.splitext(p)[0] for p in SAMPLE_PHOTOS[: cfg.sample_classes]]
    save_grid(_enlarge(images, cfg.grid_scale), os.path.join(out, "samples.png"), nrow=cfg.samples_per_class,
              row_labels=names)

    # 5. kernels vs reference
    bar = Progress(3, desc="kernels vs reference", enabled=show, unit="op")
    try:
        speedups = stages.run("kernel timing", lambda: kernel_speedups(
            tokenizer.config, generator.config, cfg.tokenizer_batch, cfg.generator_batch, device,
            cfg.speed_rounds, bar))
    finally:
        bar.close()

    tok_log = read_metrics(tok_result.metrics_path)
    gen_log = read_metrics(gen_result.metrics_path)
    plot_curves(tok_log, gen_log, os.path.join(out, "training_curves.png"))
    backend = fk.resolve_backend("nearest_code", "auto", device)
    metrics: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "config": dataclasses.asdict(cfg),
        "machine": {"cpu": fk.backends().cpu_model, "cores": os.cpu_count(), "threads": threads, "device": str(device),
                    "load_before": load_before, "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "backend": backend,
        "backends": str(fk.backends()),
        "tokenizer": {"num_codebooks": tokenizer.config.num_codebooks, "steps": tok_result.step,
                      "final_train": tok_result.metrics, "eval": {k: v for k, v in ev.items() if k != "grid"}},
        "generator": {"steps": gen_result.step, "final_loss": gen_result.metrics.get("loss"),
                      "final_train": gen_result.metrics, "codes": meta.to_dict()},
        "speedups": speedups,
        "stages": stages.times,
    }
    metrics["total_wall_s"] = round(time.perf_counter() - t_start, 2)
    metrics["total_cpu_s"] = round(_cpu_seconds() - cpu_start, 2)
    try:
        metrics["machine"]["load_after"] = os.getloadavg()[0]
    except OSError:
        pass
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2, default=str)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(_report(metrics))
    return metrics
