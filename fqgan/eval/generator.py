"""Generator evaluation, the library side of ``fqgan eval-generator``: FID, Inception Score, precision and
recall (and optionally sFID) of a batch of samples against a reference batch, as OpenAI's ADM evaluator
(guided-diffusion ``evaluations/evaluator.py``) defines them, which is what FQGAN / LlamaGen / VAR report.

Samples: an ``.npz`` whose ``arr_0`` is uint8 ``[N, H, W, 3]`` (``fqgan sample --npz``, ADM's sample
format), read in batches straight from the archive (:class:`NpzImages`), or such an array.

Reference (``ref``):

* an ADM reference ``.npz``: ``arr_0`` images and/or precomputed ``mu`` / ``sigma`` (and ``mu_s`` /
  ``sigma_s`` for sFID). As in ADM, precomputed statistics are used for FID when present, and the images
  give the activations for precision / recall (and the statistics when there are none);
* an image folder (``fqgan.data.datasets.ImageFolder`` semantics): every image is centre-cropped to the
  samples' size with ADM's ``center_crop_arr``; the statistics of all images plus the pool3 activations
  (float16, 4 KiB per image) of at most 10 000 of them (:func:`prc_subset`, the size of ADM's reference
  batch) are cached in ``<cache dir>/<folder name>-ref<size>.npz``. The cache is keyed by the folder listing
  (paths, sizes, mtimes), the size, the subset, ``bad_images`` and the weights' fingerprint, and reused when
  all match. Before the statistics are computed every file is checked (:func:`fqgan.data.scan.scan_image_folder`):
  unreadable ones stop the run with their list (``bad_images="error"``) or are left out (``"skip"``, noted).

Metrics (features from :class:`fqgan.eval.inception.FIDInception`, torch-fidelity's network):

* FID: :func:`fqgan.eval.fid.frechet_distance` (``scipy.linalg.sqrtm``, as ADM) of pool3 mean / covariance
  (float64 streaming sums, :class:`~fqgan.eval.fid.FeatureStats`);
* Inception Score: :func:`inception_score`, ADM's ``compute_inception_score``: softmax of the bias-free
  logits, splits of 5000 samples in order (10 splits for 50 000 samples), mean of ``exp(KL)`` over splits;
* precision / recall (Kynkaenniemi et al. 2019, k = 3): :func:`precision_recall`, torch-fidelity's
  ``prc_features_to_metric`` in its chunked form (``save_cpu_ram``): distance blocks of
  ``batch_size x N``, never ``N x N``. Its definitions are ADM's ``ManifoldEstimator``'s (radius = distance to
  the k-th nearest neighbour other than the point itself, membership by ``<=``), checked against a
  brute-force k-NN in ``tests/fqgan/test_eval_generator.py``;
* sFID (optional): FID of ``mixed_6/conv[..., :7]`` (17 x 17 x 7 = 2023 dimensions).

Memory: the pool3 activations of the samples and of the reference images used for precision / recall (8 KiB
per image: 400 MB for 50 000) and the samples' logits (4 KiB per image) are kept; images stream batch by batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fqgan.data.images import to_uint8
from fqgan.eval.fid import FeatureStats, frechet_distance
from fqgan.eval.inception import (
    FEATURE_DIM,
    SPATIAL_DIM,
    FIDInception,
    find_inception_weights,
    import_torch_fidelity,
    load_fid_inception,
)
from fqgan.runtime.checkpoint import MissingFileError
from fqgan.runtime.device import resolve_device
from fqgan.runtime.errors import UsageError
from fqgan.runtime.logging import Progress
from fqgan.runtime.rundir import check_out_dir

__all__ = ["NpzImages", "Reference", "evaluate_samples", "format_generator_table", "inception_score",
           "prc_subset", "precision_recall", "reference_cache_path"]

IS_SPLIT_SIZE = 5000  # ADM's compute_inception_score(activations, split_size=5000)
PRC_NEIGHBOURHOOD = 3  # ADM's ManifoldEstimator(nhood_sizes=(3,))
CACHE_FORMAT = 2  # 2: the key holds bad_images; the cache lists the files left out
PUBLISHED_SAMPLES = 50_000
PRC_REFERENCE_IMAGES = 10_000  # folder references: images kept for precision / recall (ADM's reference batch size)


# -- the .npz image batches -------------------------------------------------------------------------
def _read_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    return None  # a newer header version: read the whole array through np.load instead


class NpzImages:
    """The uint8 images ``[N, H, W, 3]`` stored as ``key`` (``arr_0``) in an ``.npz``, read batch by batch.

    ``np.savez`` and ``np.savez_compressed`` archives alike: the member is decompressed as a stream, so memory
    is one batch, whatever N (the approach of ADM's ``StreamingNpzArrayReader``). The constructor reads only
    the header and checks it.

    :raises MissingFileError: no such file.
    :raises ValueError: not an ``.npz``, no ``key`` in it (the keys found are listed), or not uint8 ``[N, H, W, 3]``.
    """

    def __init__(self, path: str | os.PathLike, key: str = "arr_0", what: str = "samples") -> None:
        self.path = Path(path).expanduser()
        self.key = key
        if not self.path.is_file():
            raise MissingFileError(f"{what}: no such file {self.path}")
        try:
            with zipfile.ZipFile(self.path) as z:
                names = z.namelist()
                if f"{key}.npy" not in names:
                    found = sorted(n.removesuffix(".npy") for n in names)
                    raise UsageError(f"{what}: {self.path} has no array {key!r} (found {found}); expected ADM's "
                                     f"format: uint8 images [N, H, W, 3] under {key!r}")
                with z.open(f"{key}.npy") as f:
                    header = _read_header(f)
        except zipfile.BadZipFile as e:
            raise UsageError(f"{what}: {self.path} is not an .npz archive ({e})") from e
        if header is None:
            with np.load(self.path, allow_pickle=False) as data:
                arr = data[key]
            header = (arr.shape, False, arr.dtype)
        shape, fortran, dtype = header
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or shape[0] < 1 or fortran:
            raise UsageError(f"{what}: {self.path}:{key} must be uint8 images [N, H, W, 3] with N >= 1 (C order), got "
                             f"{dtype} {list(shape)}{' (Fortran order)' if fortran else ''}")
        self.shape: tuple[int, int, int, int] = tuple(int(s) for s in shape)  # type: ignore[assignment]

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 ``[b, H, W, 3]`` arrays of ``batch_size`` images (the last one shorter), in order."""
        n, h, w, c = self.shape
        per_image = h * w * c
        with zipfile.ZipFile(self.path) as z, z.open(f"{self.key}.npy") as f:
            if _read_header(f) is None:
                with np.load(self.path, allow_pickle=False) as data:
                    arr = data[self.key]
                yield from (arr[i:i + batch_size] for i in range(0, n, batch_size))
                return
            for start in range(0, n, batch_size):
                b = min(batch_size, n - start)
                data = f.read(b * per_image)
                if len(data) != b * per_image:
                    raise UsageError(f"{self.path}:{self.key} is truncated: image {start + len(data) // per_image} of "
                                     f"{n} missing")
                yield np.frombuffer(data, dtype=np.uint8).reshape(b, h, w, c)


def _npz_keys(path: Path, what: str) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return sorted(n.removesuffix(".npy") for n in z.namelist())
    except zipfile.BadZipFile as e:
        raise UsageError(f"{what}: {path} is not an .npz archive ({e})") from e


# -- metrics ----------------------------------------------------------------------------------------
def inception_score(logits: Tensor | np.ndarray, split_size: int = IS_SPLIT_SIZE) -> tuple[float, float]:
    """``(mean, std)`` over splits of ``exp(mean_i KL(p_i || mean_split p))``, ``p_i = softmax(logits_i)``.

    ADM's ``compute_inception_score(activations, split_size=5000)``: consecutive splits of ``split_size``
    samples in their order (the last one may be shorter; 50 000 samples give 10 splits of 5000), no shuffle,
    computed here in float64. ADM reports the mean; the std over splits is torch-fidelity's companion value.
    (torch-fidelity's own ``isc_features_to_metric`` shuffles and cuts 10 equal splits: equal to this for
    N = 10 x ``split_size`` without its shuffle only.)

    :param logits: ``[N, C]`` bias-free logits (:attr:`~fqgan.eval.inception.InceptionFeatures.logits`).
    """
    x = torch.as_tensor(logits).double()
    if x.dim() != 2 or x.shape[0] < 1:
        raise UsageError(f"logits must have shape [N, C] with N >= 1, got {list(x.shape)}")
    if split_size < 1:
        raise UsageError(f"split_size must be positive, got {split_size}")
    if not bool(torch.isfinite(x).all()):
        raise UsageError("logits contain NaN or Inf values")
    log_p = torch.log_softmax(x, dim=1)
    scores = []
    for start in range(0, x.shape[0], split_size):
        lp = log_p[start:start + split_size]
        p = lp.exp()
        log_marginal = torch.log(p.mean(0, keepdim=True))
        scores.append(math.exp(float((p * (lp - log_marginal)).sum(1).mean())))
    return float(np.mean(scores)), float(np.std(scores))


def precision_recall(samples: Tensor | np.ndarray, reference: Tensor | np.ndarray, k: int = PRC_NEIGHBOURHOOD,
                     batch_size: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019) of ``samples`` against ``reference`` features.

    precision = fraction of samples within ``d_k`` of some reference point, recall = fraction of reference
    points within ``d_k`` of some sample, ``d_k(x)`` = distance from ``x`` to its k-th nearest neighbour in its
    own set, itself excluded (ADM's ``ManifoldEstimator.manifold_radii`` / ``evaluate_pr``, ``nhood_sizes=(3,)``).
    Computed by torch-fidelity's ``prc_features_to_metric`` with ``save_cpu_ram=True``: pairwise distances in
    ``batch_size x N`` blocks (on the features' device, moved to the CPU block by block), never ``N x N``.

    :param samples: ``[N1, D]`` float; :param reference: ``[N2, D]`` float; each set needs more than ``k`` points.
    """
    a = torch.as_tensor(samples)
    b = torch.as_tensor(reference)
    for name, t in (("samples", a), ("reference", b)):
        if t.dim() != 2 or not t.is_floating_point():
            raise UsageError(f"{name} features must be a float [N, D] array, got {t.dtype} {list(t.shape)}")
        if t.shape[0] <= k:
            raise UsageError(f"precision / recall with k = {k} need more than {k} {name} features, got {t.shape[0]}")
    if a.shape[1] != b.shape[1]:
        raise UsageError(f"samples have {a.shape[1]}-d features, reference {b.shape[1]}-d")
    if k < 1 or batch_size < 1:
        raise UsageError(f"k and batch_size must be positive, got {k}, {batch_size}")
    import_torch_fidelity()  # torchvision through its door first
    from torch_fidelity.metric_prc import prc_features_to_metric

    out = prc_features_to_metric(a.float(), b.to(a.device).float(), prc_neighborhood=k, prc_batch_size=batch_size,
                                 save_cpu_ram=True, verbose=False)
    return float(out["precision"]), float(out["recall"])


# -- feature extraction -----------------------------------------------------------------------------
@dataclass
class _Activations:
    pool: Tensor  # [N, 2048] float32, CPU
    stats: FeatureStats
    logits: Tensor | None = None  # [N, 1008]
    spatial: FeatureStats | None = None


def _activations(batches: Iterator[Tensor], inception: FIDInception, device: torch.device, *, logits: bool,
                 spatial: bool, on_batch: Callable[[int], None] | None = None,
                 keep: np.ndarray | None = None) -> _Activations:
    """Stream uint8 ``[b, 3, H, W]`` batches through the network; keep pool3 (of the images ``keep`` lists, sorted;
    default all) and the logits, sum the statistics of all."""
    pools, all_logits = [], []
    stats = FeatureStats(FEATURE_DIM, device)
    spatial_stats = FeatureStats(SPATIAL_DIM, device) if spatial else None
    seen = 0
    for x in batches:
        f = inception.extract(x.to(device))
        stats.update(f.pool)
        if keep is None:
            pools.append(f.pool.cpu())
        else:
            rows = keep[np.searchsorted(keep, seen):np.searchsorted(keep, seen + x.shape[0])] - seen
            pools.append(f.pool[torch.from_numpy(rows).to(f.pool.device)].cpu())
        seen += x.shape[0]
        if logits:
            all_logits.append(f.logits.cpu())
        if spatial_stats is not None:
            spatial_stats.update(f.spatial)
        if on_batch is not None:
            on_batch(x.shape[0])
    return _Activations(torch.cat(pools), stats, torch.cat(all_logits) if logits else None, spatial_stats)


def _nhwc_batches(source: NpzImages | np.ndarray, batch_size: int) -> Iterator[Tensor]:
    it = source.batches(batch_size) if isinstance(source, NpzImages) else (
        source[i:i + batch_size] for i in range(0, len(source), batch_size))
    for arr in it:
        yield torch.from_numpy(np.array(arr)).permute(0, 3, 1, 2)  # a writable copy of one batch


# -- the reference ----------------------------------------------------------------------------------
@dataclass
class Reference:
    """A reference batch: FID statistics, and the pool3 activations when precision / recall can be computed."""

    mu: np.ndarray  # [2048] float64
    sigma: np.ndarray  # [2048, 2048]
    activations: Tensor | None = None  # [M, 2048]
    mu_s: np.ndarray | None = None  # sFID statistics [2023], [2023, 2023]
    sigma_s: np.ndarray | None = None
    num_images: int | None = None  # images behind the activations (None: statistics only)
    image_size: int | None = None
    source: str = ""  # how it was obtained, for the table
    notes: list[str] = field(default_factory=list)


def reference_cache_path(folder: str | os.PathLike, image_size: int,
                         cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache_dir or the folder's parent>/<folder name>-ref<image_size>.npz``."""
    root = Path(folder).expanduser().resolve()
    return Path(cache_dir).expanduser() / f"{root.name}-ref{image_size}.npz" if cache_dir is not None else \
        root.parent / f"{root.name}-ref{image_size}.npz"


def _listing_digest(root: Path, files: list[str]) -> str:
    h = hashlib.sha256()
    for path in files:
        st = os.stat(path)
        h.update(f"{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@dataclass
class _Plan:
    """What the reference is, found by the cheap checks before any network is loaded."""

    kind: str  # "npz" or "folder"
    path: Path
    keys: list[str] = field(default_factory=list)
    stats: dict[str, np.ndarray] = field(default_factory=dict)  # precomputed mu, sigma, mu_s, sigma_s (float64)
    images: NpzImages | None = None
    files: list[str] = field(default_factory=list)  # a folder's image files, as listed (before the check)
    digest: str = ""  # of that listing: relative paths, sizes, modification times
    bad_images: str = "error"
    index: Any = None  # the folder's checked FolderIndex; None until scanned (a matching cache needs no scan)
    cache: Path | None = None


def _check_stats(mu: np.ndarray, sigma: np.ndarray, dim: int, where: str) -> None:
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise UsageError(f"{where}: statistics must be mu [{dim}] and sigma [{dim}, {dim}] (FID Inception pool3), got "
                         f"{list(mu.shape)} and {list(sigma.shape)}")


def _cache_key(plan: _Plan, image_size: int, fingerprint: str, prc_images: int) -> str:
    return json.dumps({"format": CACHE_FORMAT, "folder": str(plan.path.resolve()), "files": plan.digest,
                       "num_files": len(plan.files), "image_size": image_size, "bad_images": plan.bad_images,
                       "network": fingerprint, "prc_images": prc_images}, sort_keys=True)


def _cached_key(cache: Path) -> dict[str, Any] | None:
    """The key a cache file was written under (None: no readable cache)."""
    try:
        with np.load(cache, allow_pickle=False) as data:
            return json.loads(str(data["key"]))
    except (OSError, zipfile.BadZipFile, KeyError, ValueError):
        return None


def _scan(plan: _Plan, progress: bool) -> None:
    """Check every image of a folder reference (``bad_images``: stop listing the unreadable ones, or leave
    them out), once."""
    from fqgan.data.scan import scan_image_folder

    if plan.index is None:
        plan.index = scan_image_folder(plan.path.resolve(), bad_images=plan.bad_images, progress=progress,
                                       skip_hint="to leave them out of the reference statistics")


def _plan_reference(ref: str | os.PathLike, image_size: int, cache_dir: str | os.PathLike | None,
                    bad_images: str = "error", progress: bool = False) -> _Plan:
    path = Path(ref).expanduser()
    if path.is_dir():
        from fqgan.data.datasets import scan_folder
        from fqgan.data.scan import BAD_IMAGE_CHOICES

        if bad_images not in BAD_IMAGE_CHOICES:
            raise UsageError(f"bad_images must be one of {BAD_IMAGE_CHOICES}, got {bad_images!r}")
        samples, _ = scan_folder(str(path.resolve()))  # lists now: an empty folder fails here
        files = [p for p, _ in samples]
        cache = reference_cache_path(path, image_size, cache_dir)
        check_out_dir(cache.parent, flag=f"reference cache {cache.name} (elsewhere with --cache DIR): folder")
        plan = _Plan("folder", path, files=files, digest=_listing_digest(path.resolve(), files), bad_images=bad_images,
                     cache=cache)
        key = _cached_key(cache) if cache.is_file() else None
        if not (key and key.get("files") == plan.digest and key.get("image_size") == image_size
                and key.get("bad_images") == bad_images):
            _scan(plan, progress)  # the statistics will be computed: every file is checked first
        return plan
    if not path.exists():
        raise MissingFileError(f"reference: no such file or folder {path}")
    keys = _npz_keys(path, "reference")
    has_stats = "mu" in keys and "sigma" in keys
    if "arr_0" not in keys and not has_stats:
        raise UsageError(f"reference: {path} holds neither images ('arr_0') nor statistics ('mu' and 'sigma'): found "
                         f"{keys}; expected an ADM reference batch")
    if ("mu" in keys) != ("sigma" in keys) or ("mu_s" in keys) != ("sigma_s" in keys):
        raise UsageError(f"reference: {path} must hold 'mu' with 'sigma' and 'mu_s' with 'sigma_s', found {keys}")
    plan = _Plan("npz", path, keys=keys)
    with np.load(path, allow_pickle=False) as data:
        plan.stats = {k: data[k].astype(np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s") if k in keys}
    if "mu" in plan.stats:
        _check_stats(plan.stats["mu"], plan.stats["sigma"], FEATURE_DIM, f"reference {path}")
    if "mu_s" in plan.stats:
        _check_stats(plan.stats["mu_s"], plan.stats["sigma_s"], SPATIAL_DIM, f"reference {path} (sFID)")
    if "arr_0" in keys:
        plan.images = NpzImages(path, what="reference")
        h, w = plan.images.shape[1:3]
        if (h, w) != (image_size, image_size):
            raise UsageError(f"the samples are {image_size}x{image_size} but the reference batch {path} holds {h}x{w} "
                             f"images: evaluate against a reference at the samples' resolution")
    if "image_size" in keys:
        with np.load(path, allow_pickle=False) as data:
            size = int(data["image_size"])
        if size != image_size:
            raise UsageError(f"the samples are {image_size}x{image_size} but the reference statistics {path} were "
                             f"computed at {size}x{size}")
    return plan


def _load_reference_npz(plan: _Plan, inception: FIDInception, device: torch.device, batch_size: int, sfid: bool,
                        on_batch: Callable[[int], None] | None) -> Reference:
    stats = dict(plan.stats)
    notes = []
    acts = None
    if plan.images is None and "activations" in plan.keys:  # a cache file of a folder reference, passed as --ref
        with np.load(plan.path, allow_pickle=False) as data:
            activations = data["activations"]
        if activations.ndim != 2 or activations.shape[1] != FEATURE_DIM:
            raise UsageError(f"reference {plan.path}: 'activations' must be [M, {FEATURE_DIM}], got "
                             f"{list(activations.shape)}")
        return Reference(stats["mu"], stats["sigma"], torch.from_numpy(activations.astype(np.float32)),
                         stats.get("mu_s"), stats.get("sigma_s"), len(activations), None,
                         f"{plan.path} (precomputed mu/sigma, {len(activations)} activations for precision / recall)")
    if plan.images is not None:
        need_spatial = sfid and "mu_s" not in stats
        acts = _activations(_nhwc_batches(plan.images, batch_size), inception, device, logits=False,
                            spatial=need_spatial, on_batch=on_batch)
        if "mu" not in stats:
            stats["mu"], stats["sigma"] = acts.stats.mean_cov()
        if need_spatial:
            stats["mu_s"], stats["sigma_s"] = acts.spatial.mean_cov()
    else:
        notes.append("precision / recall skipped: the reference holds statistics only (no 'arr_0' images)")
    precomputed = "mu" in plan.keys
    source = (f"{plan.path} (" + ("precomputed mu/sigma" if precomputed else f"{len(plan.images)} images")
              + (f", {len(plan.images)} images for precision / recall" if precomputed and plan.images else "") + ")")
    return Reference(stats["mu"], stats["sigma"], acts.pool if acts else None, stats.get("mu_s"), stats.get("sigma_s"),
                     len(plan.images) if plan.images else None,
                     plan.images.shape[1] if plan.images else None, source, notes)


def _folder_batches(dataset: Any, batch_size: int, num_workers: int) -> Iterator[Tensor]:
    from torch.utils.data import DataLoader

    from fqgan.data.datasets import collate
    from fqgan.runtime.sampler import worker_errors_as_one_line

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    with worker_errors_as_one_line():  # a file changed since the check and now unreadable: one line naming it
        for images, _ in loader:
            yield to_uint8(images)  # the exact inverse of the dataset's u / 127.5 - 1: the centre crop's bytes


def prc_subset(num_images: int, size: int = PRC_REFERENCE_IMAGES) -> np.ndarray:
    """The sorted indices of the folder images whose activations precision / recall use: all of them up to ``size``,
    else a fixed random draw of ``size`` (NumPy generator seeded 0) -- ADM's ImageNet reference batch likewise holds
    10 000 images for precision / recall, while its statistics come from more."""
    if num_images <= size:
        return np.arange(num_images)
    return np.sort(np.random.default_rng(0).choice(num_images, size, replace=False))


def _load_reference_folder(plan: _Plan, image_size: int, inception: FIDInception, device: torch.device,
                           batch_size: int, num_workers: int, sfid: bool, prc_images: int, progress: bool,
                           on_batch: Callable[[int], None] | None) -> Reference:
    key = _cache_key(plan, image_size, inception.fingerprint, prc_images)
    cache = plan.cache
    notes = []
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as data:
                same = str(data["key"]) == key
                if same and (not sfid or "mu_s" in data):
                    activations = torch.from_numpy(data["activations"].astype(np.float32))
                    n = int(data["num_images"])
                    left_out = [str(p) for p in data["left_out"]] if "left_out" in data else []
                    return Reference(data["mu"], data["sigma"], activations,
                                     data["mu_s"] if "mu_s" in data else None,
                                     data["sigma_s"] if "sigma_s" in data else None, n, image_size,
                                     f"{plan.path} ({n} images{_subset_text(len(activations), n)}, cached "
                                     f"statistics {cache})", _left_out_notes(plan.path, left_out))
        except (zipfile.BadZipFile, KeyError, ValueError, OSError) as e:
            notes.append(f"reference cache {cache} unreadable ({e}): recomputed")
        else:
            notes.append(f"reference cache {cache} was for other files, size, weights or without sFID: recomputed")
    _scan(plan, progress)
    from fqgan.data.datasets import ImageFolder

    dataset = ImageFolder(plan.path.resolve(), image_size, augment=False, index=plan.index)
    n = len(dataset)
    if n == 0:
        raise UsageError(f"reference: none of the {len(plan.files)} images in {plan.path} can be read")
    keep = prc_subset(n, prc_images)
    acts = _activations(_folder_batches(dataset, batch_size, num_workers), inception, device, logits=False,
                        spatial=sfid, on_batch=on_batch, keep=keep)
    mu, sigma = acts.stats.mean_cov()
    activations = acts.pool.half()  # stored as float16; used rounded in this run too, so a cached run is identical
    left_out = [p for p, _ in plan.index.bad]
    arrays = {"mu": mu, "sigma": sigma, "activations": activations.numpy(), "key": np.array(key),
              "image_size": np.array(image_size), "num_images": np.array(n), "left_out": np.array(left_out, dtype=str)}
    if sfid:
        arrays["mu_s"], arrays["sigma_s"] = acts.spatial.mean_cov()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, cache)
    return Reference(mu, sigma, activations.float(), arrays.get("mu_s"), arrays.get("sigma_s"), n, image_size,
                     f"{plan.path} ({n} images{_subset_text(len(activations), n)}, statistics written to {cache})",
                     notes + _left_out_notes(plan.path, left_out))


def _left_out_notes(folder: Path, left_out: list[str]) -> list[str]:
    if not left_out:
        return []
    shown = ", ".join(os.path.basename(p) for p in left_out[:3]) + (", ..." if len(left_out) > 3 else "")
    what = f"{len(left_out)} unreadable image{'s' if len(left_out) > 1 else ''} of {folder}"
    return [f"{what} left out of the reference (--bad-images skip): {shown}"]


def _subset_text(kept: int, total: int) -> str:
    return "" if kept == total else f"; {kept} of them for precision / recall"


# -- the evaluation ---------------------------------------------------------------------------------
def evaluate_samples(samples: str | os.PathLike | np.ndarray, ref: str | os.PathLike, *,
                     weights: str | os.PathLike | None = None, device: str | torch.device = "auto",
                     batch_size: int = 64, sfid: bool = False, cache_dir: str | os.PathLike | None = None,
                     num_workers: int = 4, is_split_size: int = IS_SPLIT_SIZE, prc_k: int = PRC_NEIGHBOURHOOD,
                     prc_batch_size: int = 1024, prc_reference_images: int = PRC_REFERENCE_IMAGES,
                     bad_images: str = "error", progress: bool = False) -> dict[str, Any]:
    """FID, Inception Score, precision / recall (and sFID) of ``samples`` against ``ref`` (module docstring).

    Every input is checked before the network is loaded: the samples' header, the reference's keys and
    resolution (or the folder's images and the cache's directory), the weight file.

    :param samples: ``.npz`` path (``arr_0``: uint8 ``[N, H, W, 3]``, square) or such an array.
    :param ref: ADM reference ``.npz`` (``arr_0`` and/or ``mu``, ``sigma`` [, ``mu_s``, ``sigma_s``]) or an image
        folder.
    :param weights: the FID Inception weight file (default: :func:`~fqgan.eval.inception.find_inception_weights`).
    :param sfid: also compute sFID (``None`` in the result otherwise).
    :param cache_dir: where a folder reference's statistics are cached (default: beside the folder).
    :param prc_batch_size: rows per distance block of precision / recall.
    :param prc_reference_images: a folder reference keeps (and caches) the activations of at most this many of its
        images for precision / recall (:func:`prc_subset`); FID uses all.
    :param bad_images: a folder reference's files are checked (PIL ``verify``) before its statistics are
        computed: ``"error"`` stops listing the unreadable ones, ``"skip"`` leaves them out (``notes`` says so).
    :returns: ``fid``, ``sfid``, ``inception_score``, ``inception_score_std``, ``precision``, ``recall`` (``None``
        when the reference has no images), ``num_samples``, ``num_reference``, ``image_size``, ``reference``
        (where the statistics came from), ``notes``, ``settings``.
    """
    for name, value in (("batch_size", batch_size), ("is_split_size", is_split_size), ("prc_k", prc_k),
                        ("prc_batch_size", prc_batch_size), ("prc_reference_images", prc_reference_images)):
        if value < 1:
            raise UsageError(f"{name} must be positive, got {value}")
    if num_workers < 0:
        raise UsageError(f"num_workers must be >= 0, got {num_workers}")
    if isinstance(samples, np.ndarray):
        if samples.dtype != np.uint8 or samples.ndim != 4 or samples.shape[3] != 3 or samples.shape[0] < 1:
            raise UsageError(f"samples must be uint8 images [N, H, W, 3], got {samples.dtype} {list(samples.shape)}")
        source: NpzImages | np.ndarray = samples
        shape = samples.shape
        samples_name = f"array {list(shape)}"
    else:
        source = NpzImages(samples)
        shape = source.shape
        samples_name = str(source.path)
    n, h, w = shape[0], shape[1], shape[2]
    if h != w:
        raise UsageError(f"samples must be square, got {h}x{w}")
    plan = _plan_reference(ref, h, cache_dir, bad_images, progress)
    weights_path = find_inception_weights(weights)
    dev = resolve_device(device)
    inception = load_fid_inception(weights_path, dev, spatial=sfid)

    ref_count = len(plan.images) if plan.images is not None else len(plan.index.samples) if plan.index is not None \
        else 0  # a folder whose cache will serve is not read
    bar = Progress(math.ceil(n / batch_size) + math.ceil(ref_count / batch_size), desc="eval-generator",
                   enabled=progress, unit="batch")
    try:
        if plan.kind == "folder":
            reference = _load_reference_folder(plan, h, inception, dev, batch_size, num_workers, sfid,
                                               prc_reference_images, progress, lambda _: bar.update(1))
        else:
            reference = _load_reference_npz(plan, inception, dev, batch_size, sfid, lambda _: bar.update(1))
        acts = _activations(_nhwc_batches(source, batch_size), inception, dev, logits=True, spatial=sfid,
                            on_batch=lambda _: bar.update(1))
    finally:
        bar.close()

    notes = list(reference.notes)
    mu, sigma = acts.stats.mean_cov() if n >= 2 else (None, None)
    fid = frechet_distance(mu, sigma, reference.mu, reference.sigma) if mu is not None else None
    if fid is None:
        notes.append("FID skipped: it needs at least 2 samples")
    elif n <= FEATURE_DIM:
        notes.append(f"FID from {n} samples <= {FEATURE_DIM} feature dimensions: rank-deficient covariance, far from "
                     f"published ({PUBLISHED_SAMPLES}-sample) figures")
    elif n != PUBLISHED_SAMPLES:
        notes.append(f"{n} samples: published gFID uses {PUBLISHED_SAMPLES} (FID is biased upwards at smaller N)")
    sfid_value = None
    if sfid:
        if reference.mu_s is None:
            notes.append("sFID skipped: the reference has neither 'mu_s'/'sigma_s' nor images")
        elif n >= 2:
            mu_s, sigma_s = acts.spatial.mean_cov()
            sfid_value = frechet_distance(mu_s, sigma_s, reference.mu_s, reference.sigma_s)
    is_mean, is_std = inception_score(acts.logits, is_split_size)
    precision = recall = None
    if reference.activations is not None:
        if min(n, reference.activations.shape[0]) <= prc_k:
            notes.append(f"precision / recall skipped: k = {prc_k} needs more than {prc_k} images in each batch")
        else:
            prc_device = dev if dev.type == "cuda" else torch.device("cpu")
            precision, recall = precision_recall(acts.pool.to(prc_device), reference.activations.to(prc_device),
                                                 prc_k, prc_batch_size)
    tf_version = getattr(import_torch_fidelity(), "__version__", "?")
    return {
        "fid": fid, "sfid": sfid_value, "inception_score": is_mean, "inception_score_std": is_std,
        "precision": precision, "recall": recall,
        "num_samples": n, "num_reference": reference.num_images, "image_size": h,
        "samples": samples_name, "reference": reference.source, "notes": notes,
        "settings": {"inception": f"torch-fidelity {tf_version} FeatureExtractorInceptionV3",
                     "weights": str(weights_path), "weights_fingerprint": inception.fingerprint,
                     "is_split_size": is_split_size, "prc_k": prc_k, "device": str(dev)},
    }


def format_generator_table(result: dict[str, Any]) -> str:
    """The metrics of :func:`evaluate_samples` as a short plain-text table."""
    def num(v: float | None, fmt: str = ".4f") -> str:
        return "-" if v is None else format(v, fmt)

    lines = [f"samples          {result['num_samples']}  ({result['image_size']}x{result['image_size']}, "
             f"{result['samples']})",
             f"reference        {result['reference']}",
             f"FID              {num(result['fid'])}",
             f"sFID             {num(result['sfid'])}",
             f"Inception Score  {num(result['inception_score'], '.3f')} +- {num(result['inception_score_std'], '.3f')}",
             f"precision        {num(result['precision'])}",
             f"recall           {num(result['recall'])}"]
    lines += [f"note             {note}" for note in result["notes"]]
    return "\n".join(lines)
