"""Faults as a user meets them, through the ``fqgan`` command in a temporary folder: a second run into the
same folder, a scheduler's signal to a running run (one process, and two under torchrun), the temporary
files of a killed save. Each test checks what was kept (file hashes, weights) and what the message says."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train_generator import write_codes

from fqgan.runtime.checkpoint import load_checkpoint
from fqgan.runtime.logging import read_metrics
from fqgan.runtime.signals import PREEMPTED_EXIT_CODE

FAR = ["--preset", "FAR-tiny", "--dim", "32", "--n-layer", "2", "--n-head", "2", "--ar-n-layer", "1",
       "--batch-size", "8", "--device", "cpu", "--num-workers", "0", "--quiet", "--log-every", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def command(torchrun=0):
    """``python -m fqgan``, or ``torchrun --standalone --nproc_per_node N -m fqgan``."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)] if torchrun else []
    return [sys.executable, *launcher, "-m", "fqgan"]


def fqgan(tmp_path, *args, torchrun=0):
    """Run ``fqgan ARGS`` (under torchrun with ``torchrun`` processes) in ``tmp_path``."""
    return subprocess.run(command(torchrun) + [str(a) for a in args], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=300)


def hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir()) if p.is_file()}


@pytest.fixture
def codes(tmp_path):
    write_codes(tmp_path / "codes", n=32)
    return "codes"


def test_second_run_into_the_same_folder_keeps_the_first(tmp_path, codes):
    first = fqgan(tmp_path, "train-generator", "--codes", codes, "--steps", "3", "--out-dir", "run", *FAR)
    assert first.returncode == 0, first.stderr
    before = hashes(tmp_path / "run")
    assert set(before) == {"config.json", "metrics.jsonl", "last.pt"}

    again = fqgan(tmp_path, "train-generator", "--codes", codes, "--steps", "5", "--out-dir", "run", *FAR)
    assert again.returncode == 2
    assert "already holds a run at step 3" in again.stderr and "--resume auto" in again.stderr
    assert "--overwrite" in again.stderr and "Traceback" not in again.stderr
    assert hashes(tmp_path / "run") == before  # nothing was touched

    over = fqgan(tmp_path, "train-generator", "--codes", codes, "--steps", "2", "--out-dir", "run", "--overwrite", *FAR)
    assert over.returncode == 0, over.stderr
    (moved,) = (tmp_path / "run" / "previous").iterdir()
    assert hashes(moved) == before  # moved aside, byte for byte
    assert load_checkpoint(tmp_path / "run" / "last.pt")["steps"] == 2
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


def test_an_existing_file_as_out_dir(tmp_path, codes):
    (tmp_path / "taken").write_text("not a folder")
    got = fqgan(tmp_path, "train-generator", "--codes", codes, "--steps", "1", "--out-dir", "taken", *FAR)
    assert got.returncode == 2 and "--out-dir taken is an existing file, not a folder" in got.stderr
    assert "Traceback" not in got.stderr


def _signal_when_running(tmp_path, argv, sig, torchrun=0, min_steps=5):
    """Start a long run, send ``sig`` once it has logged ``min_steps`` steps, return (completed process, step)."""
    proc = subprocess.Popen(command(torchrun) + argv, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / argv[argv.index("--out-dir") + 1] / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= min_steps:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    marker = metrics.parent / "PREEMPTED"
    assert marker.exists(), f"no PREEMPTED file; exit {proc.returncode}; stderr:\n{err[-3000:]}"
    step = int(marker.read_text())
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), step


@pytest.mark.parametrize("world", [1, 2])
def test_sigterm_saves_and_resume_equals_the_uninterrupted_run(tmp_path, codes, world):
    argv = ["train-generator", "--codes", codes, "--steps", "100000", "--out-dir", "cut", *FAR]
    done, step = _signal_when_running(tmp_path, argv, signal.SIGTERM, torchrun=world if world > 1 else 0)
    if world == 1:  # under torchrun the exit code is torchrun's own; the PREEMPTED file tells
        assert done.returncode == PREEMPTED_EXIT_CODE, done.stderr
        assert f"stopped by a signal at step {step}" in done.stderr and "--resume auto" in done.stderr
    ckpt = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert ckpt["steps"] == step and ckpt["world_size"] == world

    end = step + 3
    resumed = fqgan(tmp_path, "train-generator", "--codes", codes, "--steps", end, "--out-dir", "cut", "--resume",
                    "auto", *FAR, torchrun=world if world > 1 else 0)
    assert resumed.returncode == 0, resumed.stderr
    assert not (tmp_path / "cut" / "PREEMPTED").exists()
    whole = fqgan(tmp_path, "train-generator", "--codes", codes, "--steps", end, "--out-dir", "whole", *FAR,
                  torchrun=world if world > 1 else 0)
    assert whole.returncode == 0, whole.stderr
    a, b = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt")
    assert a["steps"] == b["steps"] == end
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), name  # bit for bit
    assert [r["step"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")] == list(range(1, end + 1))


def test_stale_temporary_files_are_removed_at_start(tmp_path, codes):
    first = fqgan(tmp_path, "train-generator", "--codes", codes, "--steps", "1", "--out-dir", "run", *FAR)
    assert first.returncode == 0, first.stderr
    (tmp_path / "run" / ".last.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "run" / ".last.dcp.tmp").mkdir()
    got = fqgan(tmp_path, "train-generator", "--codes", codes, "--steps", "2", "--out-dir", "run", "--resume", "auto",
                *FAR)
    assert got.returncode == 0, got.stderr
    assert "removed" in got.stderr and ".last.pt.x1y2.tmp" in got.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "last.pt", "metrics.jsonl"]


def test_resume_refuses_a_changed_run_and_ignores_runtime_fields(tmp_path, codes):
    first = fqgan(tmp_path, "train-generator", "--codes", codes, "--steps", "2", "--out-dir", "run", *FAR)
    assert first.returncode == 0, first.stderr
    before = hashes(tmp_path / "run")
    changed = [*FAR[: FAR.index("--batch-size")], "--batch-size", "4", *FAR[FAR.index("--batch-size") + 2:]]
    got = fqgan(tmp_path, "train-generator", "--codes", codes, "--steps", "4", "--out-dir", "run", "--resume", "auto",
                "--seed", "1", *changed)
    assert got.returncode == 2
    assert "global_batch_size: checkpoint 8, now 4" in got.stderr and "seed: checkpoint 0, now 1" in got.stderr
    assert "--allow-config-change" in got.stderr and hashes(tmp_path / "run") == before
    # Runtime-only fields (log interval, checkpoint interval, quiet, the step count) change freely.
    ok = fqgan(tmp_path, "train-generator", "--codes", codes, "--steps", "3", "--out-dir", "run", "--resume", "auto",
               "--ckpt-every", "7", *FAR[:-2], "--log-every", "3")
    assert ok.returncode == 0, ok.stderr
    forced = fqgan(tmp_path, "train-generator", "--codes", codes, "--steps", "4", "--out-dir", "run", "--resume",
                   "auto", "--allow-config-change", *changed)
    assert forced.returncode == 0, forced.stderr


def test_damaged_code_folder_names_the_file(tmp_path, codes):
    folder = tmp_path / codes
    data = (folder / "codes.npy").read_bytes()
    (folder / "codes.npy").write_bytes(data[: len(data) // 3])
    got = fqgan(tmp_path, "train-generator", "--codes", codes, "--steps", "1", "--out-dir", "run", *FAR)
    assert got.returncode == 2 and "codes.npy" in got.stderr and "damaged or truncated" in got.stderr
    (folder / "codes.npy").write_bytes(data)
    (folder / "meta.json").write_text('{"kind": "fqgan-codes", "num_images": 32}')
    got = fqgan(tmp_path, "train-generator", "--codes", codes, "--steps", "1", "--out-dir", "run2", *FAR)
    assert got.returncode == 2 and "meta.json is damaged (no num_aug" in got.stderr
    assert "Traceback" not in got.stderr


@pytest.fixture
def two_tokenizers_and_a_generator(tmp_path):
    """Tokenizers a.pt and b.pt (same config, other weights), codes written by a, a FAR trained on them."""
    from fqgan.data.codes import extract_codes
    from fqgan.data.datasets import SampleImages
    from fqgan.runtime.checkpoint import save_checkpoint
    from fqgan.tokenizer import FQTokenizer
    from fqgan.tokenizer.config import TINY
    from fqgan.train.config import GeneratorTrainConfig
    from fqgan.train.generator import train_generator

    config = TINY.replace(codebook_size=32, feat_pred_dims=(0, 0), teachers=(None, None))
    for seed, name in ((0, "a.pt"), (1, "b.pt")):
        torch.manual_seed(seed)
        model = FQTokenizer(config).eval()
        save_checkpoint(tmp_path / name, {"model_config": config.to_dict(), "model": model.state_dict()},
                        "fqgan-tokenizer")
        if name == "a.pt":
            extract_codes(model, SampleImages(32, length=8, augment=False), tmp_path / "codes", batch_size=4,
                          tokenizer_path="a.pt")
    train_generator(GeneratorTrainConfig(codes=str(tmp_path / "codes"), preset="FAR-tiny", out_dir=str(tmp_path / "g"),
                                         model_overrides={"dim": 32, "n_layer": 1, "n_head": 2, "ar_n_layer": 1},
                                         global_batch_size=4, max_steps=1, num_workers=0, quiet=True, device="cpu"))
    return tmp_path


def test_sample_refuses_another_tokenizer(two_tokenizers_and_a_generator):
    tmp_path = two_tokenizers_and_a_generator
    base = ["sample", "--checkpoint", "g/last.pt", "--class", "0", "--n", "1", "--device", "cpu"]
    wrong = fqgan(tmp_path, *base, "--tokenizer", "b.pt", "--out", "b.png")
    assert wrong.returncode == 2 and not (tmp_path / "b.png").exists()
    assert "g/last.pt was trained on codes of a.pt" in wrong.stderr and "b.pt has fingerprint" in wrong.stderr
    assert "--allow-tokenizer-mismatch" in wrong.stderr
    right = fqgan(tmp_path, *base, "--tokenizer", "a.pt", "--out", "a.png")
    assert right.returncode == 0, right.stderr
    forced = fqgan(tmp_path, *base, "--tokenizer", "b.pt", "--out", "b.png", "--allow-tokenizer-mismatch")
    assert forced.returncode == 0 and "warning:" in forced.stderr and (tmp_path / "b.png").exists()


def test_sample_checks_its_output_before_generating(two_tokenizers_and_a_generator):
    tmp_path = two_tokenizers_and_a_generator
    base = ["sample", "--checkpoint", "g/last.pt", "--tokenizer", "a.pt", "--class", "0", "--n", "1"]
    got = fqgan(tmp_path, *base, "--out", "s3")
    assert got.returncode == 2 and "--out s3: unknown file type '(no extension)'" in got.stderr
    assert "s3.png" in got.stderr


# -- data integrity ---------------------------------------------------------------------------------------
TOKENIZER = ["--preset", "tiny", "--codebook-size", "32", "--perceptual-weight", "0", "--semantic-weight", "0",
             "--batch-size", "2", "--device", "cpu", "--precision", "fp32", "--quiet", "--log-every", "1",
             "--num-workers", "2"]


def image_folder(root, classes=("cat", "dog"), per_class=3):
    """Real PNG files of random pixels, ``per_class`` in each class folder."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_a_corrupt_image_is_found_before_training(tmp_path):
    image_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 3)
    got = fqgan(tmp_path, "train-tokenizer", "--data", "imgs", "--steps", "2", "--out-dir", "run", *TOKENIZER)
    assert got.returncode == 2 and "Traceback" not in got.stderr
    assert "1 of 7 images in" in got.stderr and "broken.jpg" in got.stderr and "--bad-images skip" in got.stderr
    assert not (tmp_path / "run" / "last.pt").exists()

    skip = fqgan(tmp_path, "train-tokenizer", "--data", "imgs", "--steps", "2", "--out-dir", "run", "--overwrite",
                 "--bad-images", "skip", *TOKENIZER)
    assert skip.returncode == 0, skip.stderr
    assert "1 unreadable images left out" in skip.stderr
    assert "broken.jpg" in (tmp_path / "run" / "bad_images.txt").read_text()
    assert load_checkpoint(tmp_path / "run" / "last.pt")["steps"] == 2

    # Images that break after the scan (the index is kept: a resume does not scan again): with every one broken
    # there is nothing left to skip to, and the worker's error reaches the user as one line naming a file.
    index = (tmp_path / "run" / "data_index.json").read_bytes()
    for p in (tmp_path / "imgs").rglob("*.png"):
        p.write_bytes(p.read_bytes()[:40])
    later = fqgan(tmp_path, "train-tokenizer", "--data", "imgs", "--steps", "3", "--out-dir", "run", "--resume",
                  "auto", "--bad-images", "skip", *TOKENIZER)
    assert later.returncode == 2, later.stderr
    assert (tmp_path / "run" / "data_index.json").read_bytes() == index
    assert "Traceback" not in later.stderr and "DataLoader worker" not in later.stderr
    assert "cannot read image" in later.stderr


def test_skipped_images_are_counted(tmp_path):
    image_folder(tmp_path / "imgs", per_class=4)
    first = fqgan(tmp_path, "train-tokenizer", "--data", "imgs", "--steps", "1", "--out-dir", "run", *TOKENIZER)
    assert first.returncode == 0, first.stderr
    (tmp_path / "imgs" / "cat" / "0.png").write_bytes(b"gone bad")
    later = fqgan(tmp_path, "train-tokenizer", "--data", "imgs", "--steps", "5", "--out-dir", "run", "--resume",
                  "auto", *TOKENIZER)
    assert later.returncode == 0, later.stderr
    assert "cat/0.png" in later.stderr and "skipped" in later.stderr and "Traceback" not in later.stderr
    assert max(r["skipped_images"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")) >= 1


def test_an_empty_class_folder_is_an_error_unless_classes_are_listed(tmp_path):
    image_folder(tmp_path / "imgs", classes=("ant", "bee"))
    (tmp_path / "imgs" / "arm").mkdir()  # sorts between: would shift bee's label
    got = fqgan(tmp_path, "train-tokenizer", "--data", "imgs", "--steps", "1", "--out-dir", "run", *TOKENIZER)
    assert got.returncode == 2 and "arm" in got.stderr and "contains no images" in got.stderr
    (tmp_path / "classes.txt").write_text("ant\narm\nbee\n")
    ok = fqgan(tmp_path, "train-tokenizer", "--data", "imgs", "--steps", "1", "--out-dir", "run", "--classes",
               "classes.txt", *TOKENIZER)
    assert ok.returncode == 0, ok.stderr
    import json

    index = json.loads((tmp_path / "run" / "data_index.json").read_text())
    assert index["classes"] == ["ant", "arm", "bee"] and {label for _, label in index["samples"]} == {0, 2}


def truncated_jpeg(path, seed=1):
    """A real JPEG cut to two thirds, as an interrupted copy leaves it: PIL's ``verify`` passes it."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[:len(buf.getvalue()) * 2 // 3])
    return path


def test_the_check_finds_a_truncated_jpeg(tmp_path):
    from PIL import Image

    from fqgan.data.scan import verify_image

    image_folder(tmp_path / "imgs", per_class=1)
    Image.open(tmp_path / "imgs" / "cat" / "0.png").save(tmp_path / "whole.jpg")
    cut = truncated_jpeg(tmp_path / "cut.jpg")
    with Image.open(cut) as img:
        img.verify()  # the header check alone lets it through
    assert verify_image(str(tmp_path / "whole.jpg")) is None and verify_image(str(tmp_path / "imgs/cat/0.png")) is None
    assert "truncated" in verify_image(str(cut))
    png = (tmp_path / "imgs" / "cat" / "0.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[:len(png) // 2])
    assert verify_image(str(tmp_path / "cut.png")) is not None


@pytest.fixture
def tokenizer_file(tmp_path):
    from fqgan.runtime.checkpoint import save_checkpoint
    from fqgan.tokenizer import FQTokenizer
    from fqgan.tokenizer.config import TINY

    config = TINY.replace(codebook_size=32, feat_pred_dims=(0, 0), teachers=(None, None))
    save_checkpoint(tmp_path / "tok.pt", {"model_config": config.to_dict(), "model": FQTokenizer(config).state_dict()},
                    "fqgan-tokenizer")
    return "tok.pt"


def test_extract_codes_checks_the_folder_first(tmp_path, tokenizer_file):
    import json

    image_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "cat" / "1.png").write_bytes(b"not a png")
    truncated_jpeg(tmp_path / "imgs" / "dog" / "cut.jpg")
    args = ["extract-codes", "--tokenizer", tokenizer_file, "--data", "imgs", "--num-workers", "2", "--device", "cpu",
            "--quiet"]
    got = fqgan(tmp_path, *args, "--out", "codes")
    assert got.returncode == 2 and "Traceback" not in got.stderr and "DataLoader worker" not in got.stderr
    assert "2 of 7 images" in got.stderr and "cat/1.png" in got.stderr and "dog/cut.jpg" in got.stderr
    assert "--bad-images skip to encode the others" in got.stderr and not (tmp_path / "codes").exists()

    # Under torchrun rank 0 checks and every rank stops: the message is printed once.
    two = fqgan(tmp_path, *args, "--out", "codes", torchrun=2)
    assert two.returncode != 0 and two.stderr.count("fqgan extract-codes: error: 2 of 7 images") == 1, two.stderr

    # --bad-images skip: the others are encoded, with either launcher alike; meta.json lists the files left out.
    one = fqgan(tmp_path, *args, "--out", "codes1", "--bad-images", "skip")
    assert one.returncode == 0, one.stderr
    assert one.stderr.count("2 unreadable images left out") == 1
    two = fqgan(tmp_path, *args, "--out", "codes2", "--bad-images", "skip", torchrun=2)
    assert two.returncode == 0, two.stderr
    assert two.stderr.count("2 unreadable images left out") == 1
    meta = json.loads((tmp_path / "codes1" / "meta.json").read_text())
    assert meta["num_images"] == 5 and sorted(Path(p).name for p, _ in meta["left_out"]) == ["1.png", "cut.jpg"]
    for name in ("codes.npy", "labels.npy"):
        assert (tmp_path / "codes1" / name).read_bytes() == (tmp_path / "codes2" / name).read_bytes()


def test_eval_tokenizer_checks_the_folder_first(tmp_path, tokenizer_file):
    import json

    image_folder(tmp_path / "imgs")
    truncated_jpeg(tmp_path / "imgs" / "cat" / "cut.jpg")
    args = ["eval-tokenizer", "--checkpoint", tokenizer_file, "--data", "imgs", "--no-rfid", "--num-workers", "2",
            "--device", "cpu", "--quiet", "--out", "eval"]
    got = fqgan(tmp_path, *args)
    assert got.returncode == 2 and "Traceback" not in got.stderr
    assert "1 of 7 images" in got.stderr and "cat/cut.jpg" in got.stderr and "to evaluate the others" in got.stderr
    assert not (tmp_path / "eval" / "metrics.json").exists()
    skip = fqgan(tmp_path, *args, "--bad-images", "skip")
    assert skip.returncode == 0, skip.stderr
    assert "1 unreadable images left out" in skip.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert [Path(p).name for p, _ in metrics["left_out"]] == ["cut.jpg"] and metrics["num_images"] == 6


def test_outputs_are_checked_before_the_work(tmp_path):
    from fqgan.runtime.checkpoint import save_checkpoint
    from fqgan.tokenizer import FQTokenizer
    from fqgan.tokenizer.config import TINY

    config = TINY.replace(codebook_size=32, feat_pred_dims=(0, 0), teachers=(None, None))
    save_checkpoint(tmp_path / "tok.pt", {"model_config": config.to_dict(), "model": FQTokenizer(config).state_dict()},
                    "fqgan-tokenizer")
    (tmp_path / "taken").write_text("a file")
    got = fqgan(tmp_path, "eval-tokenizer", "--checkpoint", "tok.pt", "--out", "taken", "--no-rfid", "--quiet")
    assert got.returncode == 2 and "--out taken is an existing file, not a folder" in got.stderr
    got = fqgan(tmp_path, "reconstruct", "taken", "--checkpoint", "tok.pt", "--out", "taken")
    assert got.returncode == 2 and "Traceback" not in got.stderr

    args = ["extract-codes", "--tokenizer", "tok.pt", "--num-images", "4", "--out", "codes", "--num-workers", "0",
            "--device", "cpu", "--quiet"]
    assert fqgan(tmp_path, *args).returncode == 0
    before = hashes(tmp_path / "codes")
    again = fqgan(tmp_path, *args)
    assert again.returncode == 2 and "already holds a code folder" in again.stderr and "--overwrite" in again.stderr
    assert hashes(tmp_path / "codes") == before
    assert fqgan(tmp_path, *args, "--overwrite").returncode == 0
