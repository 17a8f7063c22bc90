"""``fqgan sample --npz``: ADM's format, class balance, per-image draws, and a sharded 2-process gloo run that
gives the same images as one process with the same seed: restarted after a deleted shard, and after SIGKILL to
the running torchrun and its workers."""

import os
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

from fqgan.cli import main
from fqgan.data.samples import assemble_npz, to_uint8, write_samples_npz
from fqgan.generator.generate import class_labels, image_uniforms

TINY_FLAGS = ["--preset", "tiny", "--codebook-size", "64", "--perceptual-weight", "0", "--semantic-weight", "0",
              "--batch-size", "4", "--num-workers", "0", "--quiet", "--device", "cpu"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny tokenizer (32 px, 8x8 tokens, K = 64) and a FAR trained on its codes for two steps (19 classes)."""
    root = tmp_path_factory.mktemp("models")
    tok, codes, gen = root / "tok", root / "codes", root / "gen"
    assert main(["train-tokenizer", *TINY_FLAGS, "--steps", "1", "--out-dir", str(tok)]) == 0
    assert main(["extract-codes", "--tokenizer", str(tok / "last.pt"), "--num-images", "8", "--out", str(codes),
                 "--num-workers", "0", "--device", "cpu", "--quiet"]) == 0
    assert main(["train-generator", "--codes", str(codes), "--preset", "FAR-tiny", "--dim", "32", "--n-layer", "1",
                 "--batch-size", "4", "--steps", "2", "--num-workers", "0", "--out-dir", str(gen), "--quiet",
                 "--device", "cpu"]) == 0
    return ["--checkpoint", str(gen / "last.pt"), "--tokenizer", str(tok / "last.pt"), "--device", "cpu"]


def test_class_labels_balanced_and_random():
    labels = class_labels(50_000, range(1000))
    assert labels.dtype == np.int64 and np.array_equal(np.bincount(labels), np.full(1000, 50))  # 50 per class
    assert np.array_equal(labels[:1000], np.arange(1000))  # every prefix as balanced as it can be
    counts = np.bincount(class_labels(23, [4, 7, 9]), minlength=10)[[4, 7, 9]]
    assert sorted(counts) == [7, 8, 8]
    r = class_labels(300, range(5), "random", seed=3)
    assert np.array_equal(r, class_labels(300, range(5), "random", seed=3)) and set(r) == set(range(5))
    assert np.array_equal(r[100:], class_labels(300, range(5), "random", seed=3)[100:])
    with pytest.raises(ValueError, match="balanced"):
        class_labels(3, [1], "sorted")


def test_image_uniforms_depend_on_the_index_only():
    a = image_uniforms(7, [0, 1, 2, 3], 2, 16)
    assert a.shape == (4, 2, 16) and a.dtype == torch.float64 and 0 <= a.min() and a.max() < 1
    assert torch.equal(a[2:], image_uniforms(7, [2, 3], 2, 16))
    assert not torch.equal(a, image_uniforms(8, [0, 1, 2, 3], 2, 16))


def test_npz_format_and_class_balance(tmp_path, models, capsys):
    out = tmp_path / "s.npz"
    assert main(["sample", *models, "--npz", str(out), "--num-images", "10", "--class", "0", "--class", "3",
                 "--class", "coffee", "--batch-size", "4", "--shard-size", "6", "--quiet"]) == 0
    assert "wrote 10 samples (3 classes, balanced)" in capsys.readouterr().out
    assert not (tmp_path / "s.npz.shards").exists()  # removed once s.npz is written
    with zipfile.ZipFile(out) as z:  # what ADM's evaluator opens: the member arr_0.npy
        assert sorted(z.namelist()) == ["arr_0.npy", "labels.npy"]
    with np.load(out) as data:
        images, labels = data["arr_0"], data["labels"]
    assert images.dtype == np.uint8 and images.shape == (10, 32, 32, 3) and images.flags.c_contiguous
    assert labels.tolist() == [0, 3, 2, 0, 3, 2, 0, 3, 2, 0]  # classes i mod 3, in the order given
    assert len({images[i].tobytes() for i in range(10)}) == 10
    from fqgan.eval.generator import NpzImages  # what `fqgan eval-generator` streams it with

    reader = NpzImages(out)
    assert reader.shape == (10, 32, 32, 3) and np.array_equal(np.concatenate(list(reader.batches(4))), images)
    # the output is checked before any model loads
    err = _error(capsys, ["sample", "--checkpoint", str(tmp_path / "none.pt"), "--tokenizer", "x.pt", "--npz",
                          str(tmp_path / "s.png")])
    assert "--npz" in err and "unknown file type '.png'" in err
    err = _error(capsys, ["sample", "--checkpoint", str(tmp_path / "none.pt"), "--tokenizer", "x.pt", "--npz",
                          str(out)])
    assert "exists: pass --overwrite" in err
    assert "--num-images goes with --npz" in _error(capsys, ["sample", *models, "--class", "1", "--num-images", "3"])


def test_npz_compiled_pads_the_last_batch(tmp_path, models):
    """--compile: a short last batch is padded to --batch-size (no graphs of its own); the images are the eager
    run's, up to float rounding at a sampling threshold (at most one of six here)."""
    args = [*models, "--num-images", "6", "--batch-size", "4", "--class", "1", "--class", "2", "--quiet"]
    assert main(["sample", *args, "--npz", str(tmp_path / "eager.npz")]) == 0
    assert main(["sample", *args, "--npz", str(tmp_path / "compiled.npz"), "--compile"]) == 0
    with np.load(tmp_path / "eager.npz") as a, np.load(tmp_path / "compiled.npz") as b:
        assert b["arr_0"].shape == (6, 32, 32, 3) and np.array_equal(a["labels"], b["labels"])
        same = sum(np.array_equal(a["arr_0"][i], b["arr_0"][i]) for i in range(6))
    assert same >= 5


def _error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def _fqgan(args, nproc=None, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "fqgan", *args] if nproc is None else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m",
         "fqgan", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_two_processes_resumed_equal_one_process(tmp_path, models):
    """12 images in 3 shards of 4 (batches of 3 + 1): one process, then 2 gloo processes; then the 2-process
    run again with the final file and one shard deleted: only that shard is sampled again, and every run
    writes the same images (each image's draws come from (seed, its index))."""
    args = [*models, "--num-images", "12", "--shard-size", "4", "--batch-size", "3", "--seed", "5", "--quiet"]
    _fqgan(["sample", *args, "--npz", str(tmp_path / "one.npz")])
    two = tmp_path / "two.npz"
    _fqgan(["sample", *args, "--npz", str(two), "--keep-shards"], nproc=2)
    with np.load(tmp_path / "one.npz") as a, np.load(two) as b:
        one_images, one_labels = a["arr_0"], a["labels"]
        assert np.array_equal(one_images, b["arr_0"]) and np.array_equal(one_labels, b["labels"])
    shards = tmp_path / "two.npz.shards"
    kept = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard_*.npz")}
    assert sorted(kept) == ["shard_00000.npz", "shard_00001.npz", "shard_00002.npz"]
    two.unlink()
    (shards / "shard_00001.npz").unlink()
    (shards / ".shard_00002.npz.999.tmp").write_bytes(b"a killed save")
    out = _fqgan(["sample", *args, "--npz", str(two)], nproc=2)
    assert "2 finished shards reused" in out and "this process sampled 4" in out
    with np.load(two) as b:
        assert np.array_equal(one_images, b["arr_0"]) and np.array_equal(one_labels, b["labels"])
    assert not shards.exists()
    # A restart with other settings is refused, not mixed in.
    (tmp_path / "three.npz.shards").mkdir()
    _fqgan(["sample", *args, "--npz", str(tmp_path / "three.npz"), "--keep-shards"])
    (tmp_path / "three.npz").unlink()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "fqgan", "sample", *args, "--npz", str(tmp_path / "three.npz"),
                           "--cfg-scale", "3"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "holds shards of another sampling run (differs in: cfg_scale)" in proc.stderr


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), children first."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        below = todo.pop()
        kids = [p for p, parent in parents.items() if parent == below]
        out += kids
        todo += kids
    return out


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers through /proc")
def test_a_sampler_killed_mid_run_resumes_to_the_same_images(tmp_path, models):
    """SIGKILL to a running 2-process sampler, torchrun and its workers (a scheduler's hard kill), once its
    first shard is written; the same command again samples only what is missing, and the images equal one
    process's."""
    args = [*models, "--num-images", "96", "--shard-size", "4", "--batch-size", "1", "--seed", "7", "--quiet"]
    one, two, shards = tmp_path / "one.npz", tmp_path / "two.npz", tmp_path / "two.npz.shards"
    _fqgan(["sample", *args, "--npz", str(one)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "fqgan", "sample", *args, "--npz", str(two)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not any(shards.glob("shard_*.npz")):
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-2000:]
    for pid in [proc.pid, *_descendants(proc.pid)]:  # torchrun starts its workers in sessions of their own
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    proc.stderr.close()
    done = len(list(shards.glob("shard_*.npz")))
    assert 1 <= done < 24 and not two.exists()
    out = _fqgan(["sample", *args, "--npz", str(two)], nproc=2)
    assert f"{done} finished shards reused" in out
    with np.load(one) as a, np.load(two) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])


def test_sigterm_to_the_sampler_keeps_its_shards_and_says_how_to_go_on(tmp_path, models):
    """SIGTERM (a scheduler's polite stop) to a running one-process sampler once a shard is written: one line
    saying what was kept, exit 75 (as a preempted training run), no traceback; the same command finishes the rest
    and gives the uninterrupted run's images."""
    from fqgan.runtime.signals import PREEMPTED_EXIT_CODE

    args = [*models, "--num-images", "48", "--shard-size", "4", "--batch-size", "1", "--seed", "3", "--quiet"]
    whole, cut, shards = tmp_path / "whole.npz", tmp_path / "cut.npz", tmp_path / "cut.npz.shards"
    _fqgan(["sample", *args, "--npz", str(whole)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "fqgan", "sample", *args, "--npz", str(cut)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not any(shards.glob("shard_*.npz")):
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be stopped: " + proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    done = len(list(shards.glob("shard_*.npz")))
    assert proc.returncode == PREEMPTED_EXIT_CODE, err
    assert "Traceback" not in err and f"stopped by SIGTERM: {done} of 12 shards are finished and kept in" in err
    assert 1 <= done < 12 and not cut.exists()
    out = _fqgan(["sample", *args, "--npz", str(cut)])
    assert f"{done} finished shards reused" in out
    with np.load(whole) as a, np.load(cut) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])


def test_write_samples_npz_streams_shards(tmp_path):
    """The library function on its own: any make(), ragged last shard and batch, labels kept, atomic final file."""
    labels = np.arange(7) % 3
    calls = []

    def make(indices, lab):
        calls.append(indices.tolist())
        x = torch.from_numpy(indices).float().view(-1, 1, 1, 1).expand(-1, 3, 2, 5) / 10 - 0.5
        return to_uint8(x)

    result = write_samples_npz(tmp_path / "x.npz", labels, make, shard_size=3, batch_size=2, keep_shards=True)
    assert calls == [[0, 1], [2], [3, 4], [5], [6]]
    assert result.generated == 7 and result.skipped_shards == 0
    with np.load(tmp_path / "x.npz") as d:
        assert d["arr_0"].shape == (7, 2, 5, 3) and np.array_equal(d["labels"], labels)
        assert d["arr_0"][:, 0, 0, 0].tolist() == [int(127.5 * (i / 10 - 0.5) + 128) for i in range(7)]
    again = assemble_npz(tmp_path / "y.npz", sorted((tmp_path / "x.npz.shards").glob("shard_*.npz")))
    assert again.read_bytes() == (tmp_path / "x.npz").read_bytes()
    calls.clear()
    result = write_samples_npz(tmp_path / "x.npz", labels, make, shard_size=3, batch_size=2)
    assert calls == [] and result.skipped_shards == 3
    with pytest.raises(ValueError, match="uint8"):
        write_samples_npz(tmp_path / "z.npz", labels, lambda i, y: np.zeros((len(i), 2, 2, 3)), shard_size=3)
