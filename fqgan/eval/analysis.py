"""What each sub-codebook has learned: the library side of ``fqgan analyze`` (and of the demo's ``analysis/``).

For a tokenizer with k sub-codebooks and labelled images from a training part and a held-out part:

* **per-sub-codebook reconstructions** (``subcodebook_reconstructions.png``): each image, its full
  reconstruction, and one reconstruction per sub-codebook from that sub-codebook's quantised map alone.
  The decoder always takes all k maps, so "alone" means the *other* maps are replaced by a constant.
  The default replacement (``fill="mean"``) is each other map's mean over the analysed images (per channel
  and position): it removes everything that map says about *this* image while keeping the decoder's input
  where it was trained to be. Zeros (``fill="zero"``, also offered) lie off the L2-normalised code sphere
  the decoder has only ever seen, so what a zero-filled decoding shows mixes the missing information with
  the decoder's response to an input it never met. (Which of the two the FQGAN paper's figure used, its
  text as available here did not say; the choice is stated with every result.)
* **per-image code features**: for sub-codebook i, the image's *bag of codes*, the frequency of each of
  the K codes among its h x w tokens (a K-vector; position-free, as the crops are). The **embedding plot**
  (``embedding.png``) shows them in 2-D (scikit-learn's t-SNE after a PCA to 50 dimensions, or PCA alone),
  coloured by class, one panel per sub-codebook.
* **class information per sub-codebook** (``metrics.json`` ``probe.<name>``): the held-out accuracy of a
  linear probe (scikit-learn: standardisation + multinomial logistic regression, C = 1, fixed before any
  result was seen) fitted on the training part's bags of codes; and the mutual information, in bits,
  between a token's code and its image's class over all analysed tokens (plug-in estimate, scikit-learn's
  ``mutual_info_score``), beside the same estimate with the image labels shuffled (its bias at this sample
  size: the part of the first number that is not information).
* **codebook usage** (``usage.png``): each sub-codebook's code counts over the analysed images, sorted.

:func:`class_information_sentence` states in one sentence which sub-codebook carries more class information
and by how much, or that the difference is within the probe's sampling error.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from fqgan.data.images import save_grid, to_uint8
from fqgan.eval.charts import figure
from fqgan.eval.metrics import CodeUsage, psnr
from fqgan.runtime.errors import UsageError

__all__ = ["FILLS", "SubcodebookCodes", "analyze_tokenizer", "class_information_sentence", "code_histograms",
           "code_mutual_information", "encode_subcodebooks", "linear_probe_accuracy", "load_analysis_data",
           "single_codebook_decodes"]

FILLS = ("mean", "zero")
METHODS = ("tsne", "pca")


class SubcodebookCodes(NamedTuple):
    """A tokenizer's codes of a set of images (CPU tensors)."""

    indices: Tensor  # [N, k, h, w] int64
    quantized: Tensor  # [N, k*D, h, w] float32 quantised (unit) code vectors; sub-codebook i: channels i*D:(i+1)*D


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[torch.device]:
    """``model`` in eval mode for the block (its mode restored after); yields its device."""
    was_training = model.training
    model.eval()
    try:
        yield next(model.parameters()).device
    finally:
        model.train(was_training)


@torch.no_grad()
def encode_subcodebooks(model: nn.Module, images: Tensor, batch_size: int = 64) -> SubcodebookCodes:
    """``model.quantize`` of ``images [N, 3, H, W]`` (in [-1, 1]), in eval mode and fp32, ``batch_size`` at a time."""
    idx, quant = [], []
    with _eval_mode(model) as device:
        for i in range(0, images.shape[0], batch_size):
            q = model.quantize(images[i:i + batch_size].to(device).float())
            idx.append(q.indices.cpu())
            quant.append(q.quantized.float().cpu())
    return SubcodebookCodes(torch.cat(idx), torch.cat(quant))


@torch.no_grad()
def _decode(model: nn.Module, quantized: Tensor, batch_size: int) -> Tensor:
    """``model.decode`` of ``quantized [N, k*D, h, w]`` in eval mode, ``batch_size`` at a time: ``[N, 3, H, W]``
    float32 on the CPU, clamped to [-1, 1]."""
    with _eval_mode(model) as device:
        return torch.cat([model.decode(quantized[j:j + batch_size].to(device)).float().cpu()
                          for j in range(0, quantized.shape[0], batch_size)]).clamp(-1, 1)


def code_histograms(indices: Tensor, codebook_size: int) -> Tensor:
    """Bags of codes: ``[N, k, h, w]`` indices -> ``[N, k, K]`` float32, the frequency of each code among
    each image's h*w tokens of each sub-codebook (rows sum to 1)."""
    n, k = indices.shape[:2]
    flat = indices.reshape(n, k, -1).long()
    hist = torch.zeros(n, k, codebook_size, dtype=torch.float32)
    hist.scatter_add_(2, flat, torch.ones(flat.shape, dtype=torch.float32))
    return hist / flat.shape[-1]


@torch.no_grad()
def single_codebook_decodes(model: nn.Module, quantized: Tensor, fill: str = "mean",
                            reference: Tensor | None = None, batch_size: int = 64) -> Tensor:
    """Decodings from one sub-codebook at a time: ``[k, N, 3, H, W]``, entry ``i`` = ``model.decode`` of
    ``quantized [N, k*D, h, w]`` with every sub-codebook but i replaced by ``fill``.

    :param fill: ``"mean"``: the other maps' mean over ``reference`` (default: ``quantized``), per channel
        and position; ``"zero"``: zeros (see the module docstring for why the mean is the default)
    """
    if fill not in FILLS:
        raise UsageError(f"fill must be one of {FILLS}, got {fill!r}")
    c = model.config
    k, d = c.num_codebooks, c.codebook_dim
    base = (reference if reference is not None else quantized).mean(0, keepdim=True) if fill == "mean" \
        else quantized.new_zeros(1, *quantized.shape[1:])
    out = []
    for i in range(k):
        keep = torch.zeros(1, k * d, 1, 1, dtype=torch.bool)
        keep[:, i * d:(i + 1) * d] = True
        out.append(_decode(model, torch.where(keep, quantized, base), batch_size))
    return torch.stack(out)


def linear_probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                          seed: int = 0) -> tuple[float, float]:
    """``(held-out accuracy, training accuracy)`` of a linear probe: scikit-learn's ``StandardScaler`` +
    multinomial ``LogisticRegression(C=1)`` fitted on ``train_x [N, F]``, ``train_y [N]``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(train_y)) < 2:
        # One class: a constant predictor (LogisticRegression refuses a single class).
        only = train_y[0]
        return float(np.mean(test_y == only)), 1.0
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=seed))
    probe.fit(train_x, train_y)
    return float(probe.score(test_x, test_y)), float(probe.score(train_x, train_y))


def code_mutual_information(indices: Tensor, labels: Tensor, seed: int = 0) -> tuple[float, float]:
    """``(I(code; class), the same with the image labels shuffled)`` in bits, over every token of
    ``indices [N, h, w]`` (one sub-codebook) with its image's label ``labels [N]`` (plug-in estimate,
    scikit-learn's ``mutual_info_score``; the shuffled value measures its bias at this sample size)."""
    from sklearn.metrics import mutual_info_score

    per_image = indices[0].numel()
    codes = indices.reshape(-1).numpy()
    y = labels.numpy()
    shuffled = np.random.default_rng(seed).permutation(y)
    bits = 1.0 / math.log(2.0)
    mi = mutual_info_score(np.repeat(y, per_image), codes) * bits
    mi_shuffled = mutual_info_score(np.repeat(shuffled, per_image), codes) * bits
    return float(mi), float(mi_shuffled)


def _embed(features: np.ndarray, method: str, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n, f = features.shape
    dims = max(1, min(50, n - 1, f))
    reduced = PCA(n_components=dims, random_state=seed).fit_transform(features)
    if method == "pca" or n < 5:
        return reduced[:, :2] if dims >= 2 else np.concatenate([reduced, np.zeros_like(reduced)], axis=1)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(reduced)


def _plot_embeddings(points: list[np.ndarray], labels: np.ndarray, names: Sequence[str],
                     class_names: Sequence[str], method: str, path: Path) -> None:
    from matplotlib import colormaps

    k = len(points)
    fig = figure((4.6 * k + 1.8, 4.4))
    axes = fig.subplots(1, k, squeeze=False)
    cmap = colormaps["tab20"]
    classes = sorted(set(labels.tolist()))
    for ax, xy, name in zip(axes[0], points, names):
        for c in classes:
            sel = labels == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=9, color=cmap(c % 20), alpha=0.8,
                       label=class_names[c] if c < len(class_names) else str(c))
        ax.set_title(f"sub-codebook '{name}'")
        ax.set_xticks([])
        ax.set_yticks([])
    title = "t-SNE" if method == "tsne" else "PCA"
    if len(classes) <= 20:  # one colour per class; more would repeat colours and drown the plot in legend
        axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7, markerscale=1.5, frameon=False)
        fig.suptitle(f"{title} of each image's bag of codes, coloured by class", fontsize=10)
    else:
        fig.suptitle(f"{title} of each image's bag of codes, coloured by class ({len(classes)} classes: "
                     "colours repeat every 20, no legend)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_usage(usage: CodeUsage, names: Sequence[str], path: Path) -> None:
    k, size = usage.counts.shape
    fig = figure((4.6 * k, 3.4))
    axes = fig.subplots(1, k, squeeze=False)
    used, perp = usage.usage().tolist(), usage.perplexity().tolist()
    for i, (ax, name) in enumerate(zip(axes[0], names)):
        sorted_counts = torch.sort(usage.counts[i], descending=True).values.numpy()
        ax.bar(np.arange(size), sorted_counts, width=1.0, color="tab:blue")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xlabel("codes, most used first")
        ax.set_ylabel("tokens")
        ax.set_title(f"'{name}': {used[i]:.0%} of {size} codes used, perplexity {perp[i]:.0f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _grid_picks(labels: Tensor, count: int) -> list[int]:
    """Up to ``count`` image positions, one per class in class order first, then the next ones."""
    picks, seen = [], set()
    for i, y in enumerate(labels.tolist()):
        if y not in seen:
            picks.append(i)
            seen.add(y)
    picks = sorted(picks, key=lambda i: int(labels[i]))[:count]
    rest = [i for i in range(len(labels)) if i not in picks]
    return picks + rest[: max(0, count - len(picks))]


@torch.no_grad()
def analyze_tokenizer(model: nn.Module, train: tuple[Tensor, Tensor], heldout: tuple[Tensor, Tensor],
                      out_dir: str | os.PathLike, *, class_names: Sequence[str] = (), method: str = "tsne",
                      fill: str = "mean", grid_images: int = 8, grid_scale: int = 4, seed: int = 0,
                      batch_size: int = 64) -> dict[str, Any]:
    """Write the analysis of ``model`` (module docstring) into ``out_dir`` and return its metrics.

    :param model: an :class:`~fqgan.tokenizer.FQTokenizer` (``quantize``, ``decode``, ``config``)
    :param train: ``(images [N, 3, H, W] in [-1, 1], labels [N])``: where the probes are fitted
    :param heldout: the same for the images the probes are measured on (and the reconstruction grid shows)
    :param class_names: label -> name, for the plot legend
    :param method: ``"tsne"`` or ``"pca"`` (the embedding plot)
    :param fill: what replaces the other sub-codebooks in the single-sub-codebook decodings (``"mean"``, ``"zero"``)
    :returns: ``{"codebook_names", "num_train_images", "num_heldout_images", "num_classes", "chance", "fill",
        "method", "probe": {name: {"accuracy", "train_accuracy", "mutual_information",
        "mutual_information_shuffled"}}, "reconstruction": {"full_psnr", "<name>_only_psnr", ...},
        "usage": {name: {"usage", "perplexity"}}, "summary", "files"}`` (also written to ``metrics.json``)
    """
    if method not in METHODS:
        raise UsageError(f"method must be one of {METHODS}, got {method!r}")
    if fill not in FILLS:
        raise UsageError(f"fill must be one of {FILLS}, got {fill!r}")
    for part, (x, y) in (("train", train), ("heldout", heldout)):
        if x.dim() != 4 or y.dim() != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise UsageError(f"{part} must be (images [N, 3, H, W], labels [N]) with N > 0, got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
    import matplotlib  # noqa: F401  (before any work: the plots need it, and scikit-learn the probes)
    import sklearn  # noqa: F401
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c = model.config
    k, size = c.num_codebooks, c.codebook_size
    names = list(c.codebook_names)
    (x_tr, y_tr), (x_ho, y_ho) = train, heldout
    y_tr, y_ho = y_tr.long().cpu(), y_ho.long().cpu()
    codes_tr = encode_subcodebooks(model, x_tr, batch_size)
    codes_ho = encode_subcodebooks(model, x_ho, batch_size)
    hist_tr, hist_ho = code_histograms(codes_tr.indices, size), code_histograms(codes_ho.indices, size)
    all_idx = torch.cat([codes_tr.indices, codes_ho.indices])
    all_y = torch.cat([y_tr, y_ho])
    num_classes = len(set(all_y.tolist()))

    probe: dict[str, dict[str, float]] = {}
    points = []
    all_hist = torch.cat([hist_tr, hist_ho])
    for i, name in enumerate(names):
        acc, train_acc = linear_probe_accuracy(hist_tr[:, i].numpy(), y_tr.numpy(), hist_ho[:, i].numpy(),
                                               y_ho.numpy(), seed)
        mi, mi_shuffled = code_mutual_information(all_idx[:, i], all_y, seed)
        probe[name] = {"accuracy": acc, "train_accuracy": train_acc, "mutual_information": mi,
                       "mutual_information_shuffled": mi_shuffled}
        points.append(_embed(all_hist[:, i].numpy(), method, seed))
    files = {"embedding": str(out / "embedding.png"), "usage": str(out / "usage.png"),
             "reconstructions": str(out / "subcodebook_reconstructions.png"), "metrics": str(out / "metrics.json")}
    _plot_embeddings(points, all_y.numpy(), names, list(class_names), method, Path(files["embedding"]))

    counts = CodeUsage(k, size)
    counts.update(all_idx)
    _plot_usage(counts, names, Path(files["usage"]))
    usage = {name: {"usage": u, "perplexity": p}
             for name, u, p in zip(names, counts.usage().tolist(), counts.perplexity().tolist())}

    # Reconstructions: the full one and one per sub-codebook, PSNR over every held-out image.
    full = _decode(model, codes_ho.quantized, batch_size)
    singles = single_codebook_decodes(model, codes_ho.quantized, fill,
                                      reference=torch.cat([codes_tr.quantized, codes_ho.quantized]),
                                      batch_size=batch_size)
    x8 = to_uint8(x_ho.float().cpu())
    recon = {"full_psnr": float(psnr(to_uint8(full), x8).mean())}
    recon.update({f"{name}_only_psnr": float(psnr(to_uint8(singles[i]), x8).mean()) for i, name in enumerate(names)})
    picks = _grid_picks(y_ho, grid_images)
    rows = [x_ho[picks].float().cpu(), full[picks], *(singles[i][picks] for i in range(k))]
    labels = ["input", "all codes", *(f"'{n}' only" for n in names)]
    save_grid(torch.cat(rows), files["reconstructions"], nrow=len(picks), row_labels=labels, scale=grid_scale)

    result: dict[str, Any] = {
        "codebook_names": names, "num_train_images": int(x_tr.shape[0]), "num_heldout_images": int(x_ho.shape[0]),
        "num_classes": num_classes, "chance": 1.0 / max(num_classes, 1), "fill": fill, "method": method,
        "feature": "bag of codes (frequency of each code among the image's tokens)",
        "probe": probe, "reconstruction": recon, "usage": usage, "files": files,
    }
    result["summary"] = class_information_sentence(probe, result["chance"], int(x_ho.shape[0]))
    Path(files["metrics"]).write_text(json.dumps(result, indent=2) + "\n")
    return result


def load_analysis_data(source: str, image_size: int, num_images: int = 380, seed: int = 0
                       ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], list[str]]:
    """``(train, heldout, class_names)`` for :func:`analyze_tokenizer`, each part ``(images, labels)``.

    ``source == "sample"``: ``num_images`` fixed crops of the training region of the sample photographs and
    ``num_images`` of their held-out region (:class:`~fqgan.data.SampleImages`, one class per photograph).
    Otherwise an image folder (centre crops, labels from its class folders): up to ``num_images`` images
    evenly spread over it (so over its classes), of which every 4th is held out (the last one
    when there are fewer than 4)."""
    from fqgan.data.datasets import ImageFolder, SampleImages, collate

    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise UsageError(f"num_images must be a positive int, got {num_images!r}")
    if source == "sample":
        parts = [SampleImages(image_size, length=num_images, augment=False, seed=seed + i, region=region)
                 for i, region in enumerate(("train", "heldout"))]
        train, heldout = (collate([part[i] for i in range(num_images)]) for part in parts)
        return train, heldout, list(parts[0].classes)
    folder = ImageFolder(source, image_size, augment=False, seed=seed)
    n = len(folder)
    m = min(num_images, n)
    positions = sorted({round(i * (n - 1) / max(m - 1, 1)) for i in range(m)})  # m positions spread over all n
    if len(positions) < 2:
        raise UsageError(f"image folder {source!r} has {n} image(s): the analysis needs at least 2 (one to fit the "
                         "probes on, one to measure them)")
    if len(positions) < 4:  # too few for every 4th: the last one is held out (never also trained on)
        train, heldout = positions[:-1], positions[-1:]
    else:
        train = [p for j, p in enumerate(positions) if j % 4 != 3]
        heldout = [p for j, p in enumerate(positions) if j % 4 == 3]
    return collate([folder[i] for i in train]), collate([folder[i] for i in heldout]), list(folder.classes)


def class_information_sentence(probe: dict[str, dict[str, float]], chance: float, num_heldout: int) -> str:
    """One sentence: which sub-codebook's codes carry more class information (linear-probe accuracy on
    held-out images first, mutual information beside it), by how much, or that the difference is within
    twice the probes' sampling error (binomial, ``num_heldout`` images)."""
    ranked = sorted(probe.items(), key=lambda kv: kv[1]["accuracy"], reverse=True)
    if len(ranked) < 2:
        name, p = ranked[0]
        return (f"The only sub-codebook, '{name}', predicts the class at {p['accuracy']:.1%} held-out accuracy "
                f"(chance {chance:.1%}).")
    (a, pa), (b, pb) = ranked[0], ranked[1]
    se = math.sqrt(sum(p * (1 - p) for p in (pa["accuracy"], pb["accuracy"])) / max(num_heldout, 1))
    diff = pa["accuracy"] - pb["accuracy"]
    mi = (f"mutual information with the class {pa['mutual_information']:.3f} vs {pb['mutual_information']:.3f} bits "
          f"(shuffled-label baseline {pa['mutual_information_shuffled']:.3f} / "
          f"{pb['mutual_information_shuffled']:.3f})")
    if diff <= 2 * se:
        return (f"Neither sub-codebook carries clearly more class information: a linear probe on '{a}' reaches "
                f"{pa['accuracy']:.1%} and on '{b}' {pb['accuracy']:.1%} held-out accuracy (chance {chance:.1%}), a "
                f"gap within twice its sampling error ({2 * se:.1%}); {mi}.")
    agree = pa["mutual_information"] >= pb["mutual_information"]
    return (f"The '{a}' sub-codebook carries more class information than '{b}': a linear probe on its codes reaches "
            f"{pa['accuracy']:.1%} held-out accuracy against {pb['accuracy']:.1%} ({diff * 100:+.1f} points; chance "
            f"{chance:.1%}), and its {mi}" + ("" if agree else ", which ranks them the other way") + ".")
