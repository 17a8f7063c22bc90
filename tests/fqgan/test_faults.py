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
