"""fqgan.eval.generator and ``fqgan eval-generator``.

* each metric against an independent plain implementation on small random feature sets: ``scipy.linalg.sqrtm``
  for FID, the Inception Score formula, a brute-force k-NN for precision / recall (and its chunking);
* the ``.npz`` reader (streamed, plain and compressed archives);
* the command as a user runs it, in a temporary folder, with tiny random images and a random-weight Inception
  file (no weights can be downloaded): against ADM ``.npz`` references (images; images with precomputed
  statistics; statistics only), against an image folder (its cache is reused, then invalidated), and bad inputs,
  which all fail before the network is loaded. The features it uses are compared with those of torch-fidelity's
  own ``FeatureExtractorInceptionV3`` loading the same file through its own loader.

A 2048 x 2048 ``sqrtm`` takes about a minute on the 2-core CI machine, so the command's runs record the
statistics handed to ``frechet_distance`` instead of computing it (``frechet_distance`` is tested here on small
dimensions and in test_eval_fid.py).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fqgan.cli import main
from fqgan.data.datasets import center_crop_arr
from fqgan.eval import generator as gen
from fqgan.eval.fid import FeatureStats, frechet_distance
from fqgan.eval.generator import NpzImages, inception_score, precision_recall
from fqgan.eval.inception import (
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_FILENAMES,
    INSTALL_HINT,
    FIDInception,
    InceptionFeatures,
    import_torch_fidelity,
    random_inception_state_dict,
    torch_fidelity_available,
)

pytestmark = pytest.mark.skipif(not torch_fidelity_available(), reason=INSTALL_HINT)

SIZE = 32
N = 4  # images per batch in the command's runs: the fewest precision / recall accept with k = 3


# -- plain implementations --------------------------------------------------------------------------
def _plain_fid(a, b):
    from scipy import linalg

    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    diff = a.mean(0) - b.mean(0)
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)


def _plain_inception_score(logits, split_size):
    scores = []
    for start in range(0, len(logits), split_size):
        z = np.asarray(logits[start:start + split_size], np.float64)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        marginal = p.mean(0)
        scores.append(np.exp(np.mean([np.sum(pi * (np.log(pi) - np.log(marginal))) for pi in p])))
    return np.mean(scores), np.std(scores)


def _plain_precision_recall(samples, reference, k=3):
    samples, reference = np.asarray(samples, np.float64), np.asarray(reference, np.float64)

    def radii(x):  # distance to the k-th nearest other point
        return np.array([sorted(np.linalg.norm(x[i] - x[j]) for j in range(len(x)) if j != i)[k - 1]
                         for i in range(len(x))])

    def inside(points, centres, rad):
        return np.mean([any(np.linalg.norm(p - c) <= r for c, r in zip(centres, rad)) for p in points])

    return inside(samples, reference, radii(reference)), inside(reference, samples, radii(samples))


# -- metrics against the plain implementations ------------------------------------------------------
def test_fid_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((41, 7)) * rng.uniform(0.5, 2, 7)
    b = rng.standard_normal((53, 7)) @ rng.standard_normal((7, 7)) * 0.5 + 0.3
    stats = []
    for x in (a, b):
        s = FeatureStats(7)
        for chunk in np.array_split(x, [1, 10, 30]):  # uneven batches, as the stream gives them
            s.update(torch.from_numpy(chunk))
        stats.append(s.mean_cov())
    (mu1, s1), (mu2, s2) = stats
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_plain_fid(a, b), rel=1e-9)


@pytest.mark.parametrize("n, split_size", [(30, 10), (23, 5), (7, 5000)])
def test_inception_score_matches_the_formula(n, split_size):
    # ADM: consecutive splits of split_size in order, the last one shorter (23 = 5 + 5 + 5 + 5 + 3).
    logits = np.random.default_rng(n).standard_normal((n, 11)) * 3
    mean, std = inception_score(torch.from_numpy(logits).float(), split_size)
    want_mean, want_std = _plain_inception_score(logits.astype(np.float32), split_size)
    assert mean == pytest.approx(want_mean, rel=1e-12) and std == pytest.approx(want_std, rel=1e-9, abs=1e-12)


def test_inception_score_equals_torch_fidelity_unshuffled_for_whole_splits():
    import_torch_fidelity()  # torchvision through fqgan's door first
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.randn(30, 9, generator=torch.Generator().manual_seed(1)) * 2
    theirs = isc_features_to_metric(logits, splits=3, shuffle=False)
    mean, std = inception_score(logits, split_size=10)
    assert mean == pytest.approx(theirs["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(theirs["inception_score_std"], rel=1e-9)


def test_inception_score_bad_input():
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        inception_score(torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        inception_score(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="split_size"):
        inception_score(torch.zeros(2, 2), split_size=0)


def test_precision_recall_on_a_line():
    # reference 0..4: radii (3rd nearest other point) 3, 2, 2, 2, 3. Samples -3.5 and 10 lie outside every
    # reference ball; 2.5 (within 0.5 of 2) and 6.9 (within 2.9 <= 3 of 4) inside: precision 1/2.
    reference = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])
    samples = torch.tensor([[-3.5], [2.5], [10.0], [6.9]])
    precision, recall = precision_recall(samples, reference)
    assert precision == 0.5 and (precision, recall) == _plain_precision_recall(samples, reference)


@pytest.mark.parametrize("batch_size", [1, 5, 1000])
def test_precision_recall_match_brute_force_knn(batch_size):
    g = torch.Generator().manual_seed(2)
    reference = torch.randn(37, 6, generator=g)
    samples = torch.cat([torch.randn(25, 6, generator=g) * 1.3 + 0.4, reference[:4]])  # 4 exact copies of references
    got = precision_recall(samples, reference, k=3, batch_size=batch_size)
    want = _plain_precision_recall(samples, reference, k=3)
    # torch-fidelity averages in float32: rel 1e-6 still tells every count apart (one point is 1/37 here).
    assert got == pytest.approx(want, rel=1e-6) and 0 < got[0] < 1 and 0 < got[1] < 1
    # another k: the radius is the k-th neighbour other than the point itself
    assert precision_recall(samples, reference, k=5, batch_size=batch_size) == pytest.approx(
        _plain_precision_recall(samples, reference, k=5), rel=1e-6)


def test_precision_recall_never_builds_an_n_by_n_matrix(monkeypatch):
    import_torch_fidelity()
    import torch_fidelity.metric_prc as prc

    shapes = []
    original = prc.calc_cdist_part

    def spy(a, b, batch_size):
        out = original(a, b, batch_size)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(prc, "calc_cdist_part", spy)
    g = torch.Generator().manual_seed(3)
    precision_recall(torch.randn(50, 4, generator=g), torch.randn(60, 4, generator=g), batch_size=8)
    assert shapes and all(rows <= 8 for rows, _ in shapes)  # blocks of at most 8 x N rows


def test_precision_recall_bad_input():
    with pytest.raises(ValueError, match="more than 3 reference"):
        precision_recall(torch.randn(5, 2), torch.randn(3, 2))
    with pytest.raises(ValueError, match="2-d features, reference 3-d"):
        precision_recall(torch.randn(5, 2), torch.randn(5, 3))
    with pytest.raises(ValueError, match="float"):
        precision_recall(torch.ones(5, 2, dtype=torch.long), torch.randn(5, 2))


# -- the .npz reader --------------------------------------------------------------------------------
@pytest.mark.parametrize("compressed", [False, True])
def test_npz_images_stream_in_batches(tmp_path, compressed):
    images = np.random.default_rng(4).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    (np.savez_compressed if compressed else np.savez)(tmp_path / "s.npz", arr_0=images, arr_1=np.arange(7))
    reader = NpzImages(tmp_path / "s.npz")
    assert len(reader) == 7 and reader.shape == (7, 5, 6, 3)
    batches = list(reader.batches(3))
    assert [len(b) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)


def test_npz_images_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        NpzImages(tmp_path / "absent.npz")
    np.savez(tmp_path / "keys.npz", images=np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match=r"no array 'arr_0' \(found \['images'\]\)"):
        NpzImages(tmp_path / "keys.npz")
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((1, 2, 2, 3), np.float32))
    with pytest.raises(ValueError, match=r"uint8 images \[N, H, W, 3\].*float32"):
        NpzImages(tmp_path / "float.npz")
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((1, 3, 2, 2), np.uint8))
    with pytest.raises(ValueError, match=r"\[1, 3, 2, 2\]"):
        NpzImages(tmp_path / "nchw.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not an .npz archive"):
        NpzImages(tmp_path / "junk.npz")


class _StubInception:
    """Cheap features: pool3 = each image's mean pixel plus the feature index (the plumbing is under test)."""

    def extract(self, x):
        pool = x.float().mean(dim=(1, 2, 3))[:, None] + torch.arange(2048.0)
        return InceptionFeatures(pool, pool[:, :5], None)


def test_activations_keep_a_subset_and_sum_statistics_of_all():
    images = torch.from_numpy(_images(7, 6)).permute(0, 3, 1, 2)
    keep = gen.prc_subset(7, 3)
    assert keep.tolist() == sorted(set(keep.tolist())) and len(keep) == 3
    acts = gen._activations(iter(images.split(3)), _StubInception(), torch.device("cpu"), logits=True,
                            spatial=False, keep=keep)
    full = _StubInception().extract(images).pool
    assert torch.equal(acts.pool, full[torch.from_numpy(keep)]) and acts.logits.shape == (7, 5)
    _assert_stats(*acts.stats.mean_cov(), full.double().numpy())
    assert gen.prc_subset(5, 10).tolist() == [0, 1, 2, 3, 4]
    assert np.array_equal(gen.prc_subset(100_000), gen.prc_subset(100_000)) and len(gen.prc_subset(100_000)) == 10_000


# -- the command ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random-weight FID Inception file, written as torch-fidelity's is (no BatchNorm counters)."""
    path = tmp_path_factory.mktemp("weights") / INCEPTION_WEIGHTS_FILENAMES[0]
    torch.save({k: v for k, v in random_inception_state_dict(0).items() if not k.endswith("num_batches_tracked")}, path)
    return path


def _images(n, seed, size=SIZE, width=None):
    return np.random.default_rng(seed).integers(0, 256, (n, size, width or size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def batches():
    return {"samples": _images(N, 10), "ref": _images(N, 11)}


@pytest.fixture(scope="module")
def independent(weights, batches):
    """Features of both batches from torch-fidelity's own FeatureExtractorInceptionV3, loaded by its own loader,
    with mixed_6/conv (sFID) read in ADM's layout (NHWC, first 7 channels) by a hook of this test."""
    fe = import_torch_fidelity().feature_extractor_inceptionv3
    net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                         feature_extractor_weights_path=str(weights))
    seen = []
    net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.append(o.permute(0, 2, 3, 1)[..., :7]))
    out = {}
    for name, images in batches.items():
        seen.clear()
        pool, logits = net(torch.from_numpy(images).permute(0, 3, 1, 2))
        out[name] = {"pool": pool.double().numpy(), "logits": logits.double().numpy(),
                     "spatial": seen[0].reshape(len(images), -1).double().numpy()}
    return out


@pytest.fixture
def recorder(monkeypatch):
    """Replaces the 2048 x 2048 Frechet distance of the command (minutes on 2 cores) by a record of its inputs."""
    calls = []

    def record(mu1, sigma1, mu2, sigma2):
        calls.append((mu1, sigma1, mu2, sigma2))
        return 10.0 + len(calls)

    monkeypatch.setattr(gen, "frechet_distance", record)
    return calls


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty cache
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _assert_stats(mu, sigma, features):
    np.testing.assert_allclose(mu, features.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-4, atol=1e-5)


def _run(capsys, *argv):
    code = main(["eval-generator", *map(str, argv), "--device", "cpu", "--batch-size", "3", "--quiet"])
    assert code == 0
    return capsys.readouterr().out


def test_eval_generator_against_an_adm_reference_batch(env, weights, batches, independent, recorder, capsys):
    tmp = env
    np.savez(tmp / "samples.npz", arr_0=batches["samples"], arr_1=np.arange(N))  # `fqgan sample --npz` / ADM format
    np.savez_compressed(tmp / "ref.npz", arr_0=batches["ref"])
    printed = _run(capsys, "samples.npz", "--ref", "ref.npz", "--inception-weights", weights, "--out", "results.json",
                   "--sfid")
    result = json.loads((tmp / "results.json").read_text())
    s, r = independent["samples"], independent["ref"]
    # FID and sFID get the statistics of torch-fidelity's features (pool3; mixed_6/conv in ADM's layout).
    (mu1, sigma1, mu2, sigma2), (mu1s, sigma1s, mu2s, sigma2s) = recorder
    _assert_stats(mu2, sigma2, r["pool"])
    _assert_stats(mu1, sigma1, s["pool"])
    assert mu1s.shape == (2023,)
    _assert_stats(mu1s, sigma1s, s["spatial"])
    _assert_stats(mu2s, sigma2s, r["spatial"])
    assert result["fid"] == 11.0 and result["sfid"] == 12.0
    want_is = _plain_inception_score(s["logits"], 5000)
    assert result["inception_score"] == pytest.approx(want_is[0], rel=1e-6) and result["inception_score_std"] == 0
    want_pr = _plain_precision_recall(s["pool"], r["pool"])
    assert (result["precision"], result["recall"]) == pytest.approx(want_pr, rel=1e-6)
    assert result["num_samples"] == result["num_reference"] == N and result["image_size"] == SIZE
    assert any("rank-deficient" in note for note in result["notes"])
    assert result["settings"]["prc_k"] == 3 and result["settings"]["is_split_size"] == 5000
    for word in ("FID", "sFID", "Inception Score", "precision", "recall", "results.json", f"{want_is[0]:.3f}"):
        assert word in printed

    # ADM's reference batches carry precomputed mu / sigma beside arr_0: those give FID, arr_0 precision / recall.
    rng = np.random.default_rng(5)
    mu, a = rng.standard_normal(2048), rng.standard_normal((2048, 8))
    np.savez(tmp / "adm_ref.npz", arr_0=batches["ref"], mu=mu, sigma=a @ a.T)
    recorder.clear()
    _run(capsys, "samples.npz", "--ref", "adm_ref.npz", "--inception-weights", weights, "--out", "adm.json")
    adm = json.loads((tmp / "adm.json").read_text())
    np.testing.assert_array_equal(recorder[0][2], mu)
    np.testing.assert_array_equal(recorder[0][3], a @ a.T)
    assert (adm["precision"], adm["recall"]) == (result["precision"], result["recall"]) and adm["sfid"] is None
    assert "precomputed" in adm["reference"]

    # Statistics only (ADM's or `fqgan eval-tokenizer --save-fid-stats`): FID, but no precision / recall.
    np.savez(tmp / "stats.npz", mu=mu, sigma=a @ a.T)
    printed = _run(capsys, "samples.npz", "--ref", "stats.npz", "--inception-weights", weights, "--out", "stats.json")
    stats = json.loads((tmp / "stats.json").read_text())
    assert stats["precision"] is None and stats["recall"] is None and stats["num_reference"] is None
    assert stats["fid"] is not None and "precision / recall skipped" in printed

    # The library function gives the same numbers from an in-memory array.
    direct = gen.evaluate_samples(batches["samples"], tmp / "ref.npz", weights=weights, device="cpu")
    for key in ("inception_score", "precision", "recall"):
        assert direct[key] == pytest.approx(result[key], rel=1e-6)


def _write_folder(folder, n, seed):
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    shapes = [(40, 48), (48, 40), (64, 64), (33, 50), (100, 37)]
    for i in range(n):
        h, w = shapes[i % len(shapes)]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


def test_eval_generator_against_an_image_folder_and_its_cache(env, weights, batches, recorder, capsys, monkeypatch):
    tmp = env
    np.savez(tmp / "samples.npz", arr_0=batches["samples"])
    _write_folder(tmp / "data", N, seed=12)
    seen = []
    original = FIDInception.extract

    def spy(self, images):
        seen.append(images.clone())
        return original(self, images)

    monkeypatch.setattr(FIDInception, "extract", spy)
    argv = ["samples.npz", "--ref", "data", "--inception-weights", weights, "--num-workers", "0"]
    printed = _run(capsys, *argv, "--out", "first.json")
    cache = tmp / "data-ref32.npz"  # beside the folder
    assert cache.is_file() and "statistics written to" in printed
    # The reference images are the folder's files through ADM's centre crop at the samples' size (32).
    ref_images = torch.cat(seen)[:N].permute(0, 2, 3, 1).numpy()
    for i, path in enumerate(sorted((tmp / "data").iterdir())):
        np.testing.assert_array_equal(ref_images[i], np.asarray(center_crop_arr(Image.open(path).convert("RGB"), SIZE)))
    assert sum(len(x) for x in seen) == 2 * N
    with np.load(cache) as data:
        assert data["activations"].dtype == np.float16 and data["activations"].shape == (N, 2048)
        np.testing.assert_array_equal(data["mu"], recorder[0][2])
    first = json.loads((tmp / "first.json").read_text())
    stamp = cache.stat().st_mtime_ns

    # Second run: the cache is reused, only the samples go through the network, the numbers are identical.
    seen.clear()
    printed = _run(capsys, *argv, "--out", "second.json")
    second = json.loads((tmp / "second.json").read_text())
    assert sum(len(x) for x in seen) == N and cache.stat().st_mtime_ns == stamp and "cached statistics" in printed
    for key in ("inception_score", "precision", "recall", "num_reference"):
        assert second[key] == first[key]
    np.testing.assert_array_equal(recorder[1][2], recorder[0][2])

    # The cache is an ADM-style statistics file: as --ref it gives FID and, from its activations, precision / recall.
    _run(capsys, "samples.npz", "--ref", cache, "--inception-weights", weights, "--out", "from_cache.json")
    from_cache = json.loads((tmp / "from_cache.json").read_text())
    assert (from_cache["precision"], from_cache["recall"]) == (first["precision"], first["recall"])
    assert "activations for precision / recall" in from_cache["reference"]

    # A new image in the folder invalidates the cache.
    _write_folder(tmp / "data", N + 1, seed=12)
    seen.clear()
    printed = _run(capsys, *argv, "--out", "third.json")
    assert sum(len(x) for x in seen) == 2 * N + 1 and "recomputed" in printed
    assert json.loads((tmp / "third.json").read_text())["num_reference"] == N + 1
    # --cache DIR puts it elsewhere.
    assert gen.reference_cache_path("data", 32, "cache_dir") == Path("cache_dir") / "data-ref32.npz"


def test_eval_generator_checks_a_reference_folder_s_images(env, weights, batches, recorder, capsys, monkeypatch):
    """A corrupt file and a truncated JPEG (which PIL's ``verify`` alone lets through) in the reference folder:
    found before the network is loaded and listed; ``--bad-images skip`` leaves them out (with DataLoader workers,
    as a user runs it), says so in the notes, and a cached run says it again."""
    import io

    tmp = env
    np.savez(tmp / "samples.npz", arr_0=batches["samples"])
    _write_folder(tmp / "data", N, seed=12)
    (tmp / "data" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    buf = io.BytesIO()
    Image.fromarray(_images(1, 3, size=40)[0]).save(buf, "JPEG")
    (tmp / "data" / "cut.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    argv = ["eval-generator", "samples.npz", "--ref", "data", "--inception-weights", str(weights), "--device", "cpu",
            "--quiet", "--num-workers", "2"]
    loaded = []
    original = gen.load_fid_inception
    monkeypatch.setattr(gen, "load_fid_inception", lambda *a, **k: loaded.append(1) or original(*a, **k))
    with pytest.raises(SystemExit) as info:
        main([*argv, "--out", "bad.json"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err and not loaded
    assert f"2 of {N + 2} images" in err and "broken.jpg" in err and "cut.jpg: OSError: image file is truncated" in err
    assert "--bad-images skip to leave them out of the reference statistics" in err
    assert not (tmp / "data-ref32.npz").exists() and not (tmp / "bad.json").exists()

    assert main([*argv, "--out", "skip.json", "--bad-images", "skip"]) == 0
    skip = json.loads((tmp / "skip.json").read_text())
    assert skip["num_reference"] == N and skip["precision"] is not None
    assert any("2 unreadable images of data left out" in note for note in skip["notes"]), skip["notes"]
    with np.load(tmp / "data-ref32.npz") as data:
        assert sorted(Path(p).name for p in data["left_out"]) == ["broken.jpg", "cut.jpg"]
    assert main([*argv, "--out", "again.json", "--bad-images", "skip"]) == 0
    again = json.loads((tmp / "again.json").read_text())
    assert "cached statistics" in again["reference"] and again["notes"] == skip["notes"]
    assert (again["precision"], again["recall"]) == (skip["precision"], skip["recall"])
    # The skipping run's cache does not serve a run that asks for every image: it checks, and stops.
    with pytest.raises(SystemExit):
        main([*argv, "--out", "strict.json"])
    assert f"2 of {N + 2} images" in capsys.readouterr().err


def test_eval_generator_stopped_by_sigterm_says_so(env, monkeypatch, capsys):
    """A scheduler's SIGTERM during the evaluation: one line, exit 75, no metrics file (a real signal to this
    process, raised while the evaluation runs)."""
    import os
    import signal
    import time

    from fqgan.runtime.signals import PREEMPTED_EXIT_CODE

    def evaluation(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("SIGTERM did not stop the evaluation")

    monkeypatch.setattr(gen, "evaluate_samples", evaluation)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["eval-generator", "samples.npz", "--ref", "ref.npz", "--quiet"]) == PREEMPTED_EXIT_CODE
    err = capsys.readouterr().err
    assert "fqgan eval-generator: stopped by SIGTERM: the metrics were not written" in err
    assert not (env / "samples.metrics.json").exists()
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is gone again


def test_eval_generator_bad_inputs_fail_before_loading_the_network(env, weights, monkeypatch, capsys):
    tmp = env

    def not_now(*args, **kwargs):
        raise AssertionError("the network was loaded before the inputs were checked")

    monkeypatch.setattr(gen, "load_fid_inception", not_now)
    np.savez(tmp / "samples.npz", arr_0=_images(N, 0))
    np.savez(tmp / "ref.npz", arr_0=_images(N, 1))

    def fails(*argv, match):
        with pytest.raises(SystemExit) as info:
            main(["eval-generator", *map(str, argv), "--device", "cpu", "--quiet"])
        err = capsys.readouterr().err
        assert info.value.code == 2 and "fqgan eval-generator: error:" in err, err
        assert match in err, err
        return err

    ok = ["--inception-weights", weights]
    fails("missing.npz", "--ref", "ref.npz", *ok, match="no such file missing.npz")
    np.savez(tmp / "keys.npz", images=_images(N, 0))
    fails("keys.npz", "--ref", "ref.npz", *ok, match="has no array 'arr_0' (found ['images'])")
    np.savez(tmp / "float.npz", arr_0=_images(N, 0).astype(np.float32))
    fails("float.npz", "--ref", "ref.npz", *ok, match="must be uint8 images [N, H, W, 3]")
    np.savez(tmp / "wide.npz", arr_0=_images(N, 0, width=48))
    fails("wide.npz", "--ref", "ref.npz", *ok, match="must be square, got 32x48")
    fails("samples.npz", "--ref", "absent", *ok, match="no such file or folder absent")
    np.savez(tmp / "wrong_ref.npz", images=_images(N, 1))
    fails("samples.npz", "--ref", "wrong_ref.npz", *ok, match="holds neither images ('arr_0') nor statistics")
    np.savez(tmp / "big_ref.npz", arr_0=_images(N, 1, size=64))
    fails("samples.npz", "--ref", "big_ref.npz", *ok, match="the samples are 32x32 but the reference batch")
    np.savez(tmp / "bad_stats.npz", mu=np.zeros(2048), sigma=np.eye(16))
    fails("samples.npz", "--ref", "bad_stats.npz", *ok, match="statistics must be mu [2048] and sigma [2048, 2048]")
    (tmp / "empty").mkdir()
    fails("samples.npz", "--ref", "empty", *ok, match="contains no images")
    fails("samples.npz", "--ref", "ref.npz", "--inception-weights", "gone.pth",
          match="no such file. Looked at: gone.pth")
    # Nothing configured: the message says where it looked (both file names) and how to provide the file.
    err = fails("samples.npz", "--ref", "ref.npz", match=f"${INCEPTION_WEIGHTS_ENV} (not set)")
    assert all(name in err for name in INCEPTION_WEIGHTS_FILENAMES) and "torch_home" in err
    (tmp / "taken.json").write_text("{}")
    fails("samples.npz", "--ref", "ref.npz", *ok, "--out", "taken.json", match="exists: pass --overwrite")
    assert (tmp / "taken.json").read_text() == "{}"
    fails("samples.npz", "--ref", "ref.npz", *ok, "--batch-size", "0", match="--batch-size must be positive")
    assert not (tmp / "samples.metrics.json").exists()
