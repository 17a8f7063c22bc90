"""Smoke test of ``fqgan demo --quick``: every stage runs, every output is written, and the measured
figures exist and lie in their ranges (the targets -- sample accuracy >= 0.6 -- are measured by the
default run, not tested)."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from fqgan.cli import main
from fqgan.demo import QUICK, DemoConfig, resolve_threads

FAST = ["--threads", "1", "--device", "cpu", "--quiet"]
STAGES = {"train classifier", "train tokenizer", "evaluate tokenizer", "extract codes", "train generator", "sample",
          "score samples", "analyse sub-codebooks", "kernel timing"}


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo_out"
    assert main(["demo", "--quick", "--out-dir", str(out), *FAST]) == 0
    text = capsys.readouterr().out
    assert "tokenizer PSNR" in text and "held-out" in text and "vs reference" in text
    assert "samples classified as their photograph" in text
    for name in ("reconstructions.png", "samples.png", "training_curves.png", "kernel_speedups.png", "metrics.json",
                 "report.md",
                 "analysis/subcodebook_reconstructions.png", "analysis/embedding.png", "analysis/usage.png",
                 "analysis/metrics.json"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    cfg = m["config"]
    assert cfg["quick"] and cfg["tokenizer_steps"] == QUICK["tokenizer_steps"] and m["precision"] in ("bf16", "fp32")
    # samples.png: one row per shown class: a real crop, a blank tile, the samples.
    with Image.open(out / "samples.png") as im:
        assert im.size[0] > (cfg["samples_per_class"] + 2) * 32 * cfg["grid_scale"]
        assert im.size[1] > cfg["sample_classes"] * 32 * cfg["grid_scale"]
    # The tokenizer, on held-out and training-region crops; the semantic teacher was on.
    tok = m["tokenizer"]
    for ev in (tok["eval"], tok["eval_train_region"]):
        assert ev["num_images"] == cfg["eval_images"] and 0 < ev["psnr"] < 100 and 0 <= ev["ssim"] <= 1
        assert len(ev["usage"]) == 2 and all(0 < u <= 1 for u in ev["usage"])
    assert tok["teacher"]["used"] and tok["teacher"]["codebook"] == "sem" and "semantic_sem" in tok["final_train"]
    # Samples scored by the classifier (CAS), beside the real held-out crops and chance.
    c = m["classifier"]
    assert c["chance"] == pytest.approx(1 / 19) and c["num_samples"] == 19 * cfg["cas_samples"]
    for key in ("samples_accuracy", "real_heldout_accuracy", "heldout_reconstructions_accuracy", "real_train_accuracy"):
        assert 0 <= c[key] <= 1, key
    # What each sub-codebook learned.
    assert set(m["probe"]) == {"vis", "sem"}
    for p in m["probe"].values():
        assert 0 <= p["accuracy"] <= 1 and 0 <= p["mutual_information"] <= math.log2(19)
    assert m["generator"]["steps"] == QUICK["generator_steps"]
    assert {r["op"].split(" ")[0] for r in m["speedups"]} == {"quantizer", "FAR", "sampling"}
    assert all(r["fused_ms"] > 0 and r["reference_ms"] > 0 for r in m["speedups"])
    assert set(m["stages"]) == STAGES
    report = (out / "report.md").read_text()
    assert "Kernel backend" in report and "speed-up" in report and f"{tok['eval']['psnr']:.2f} |" in report
    assert m["analysis"]["summary"] in report and "held-out" in report
    assert all(f"| {stage} |" in report for stage in STAGES)  # the timing table covers every stage


def test_demo_without_teacher(tmp_path):
    small = ["--classifier-steps", "3", "--tokenizer-steps", "3", "--generator-steps", "3", "--analysis-method", "pca"]
    out = tmp_path / "demo_out"
    assert main(["demo", "--quick", "--no-teacher", *small, "--out-dir", str(out), *FAST]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert not m["tokenizer"]["teacher"]["used"] and not any(k.startswith("semantic_")
                                                             for k in m["tokenizer"]["final_train"])
    assert m["config"]["tokenizer_steps"] == 3  # given explicitly: wins over --quick
    assert "no semantic teacher" in (out / "report.md").read_text()


def test_demo_bad_settings(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--sample-classes", "20"])
    assert "sample_classes must be in 1..19" in capsys.readouterr().err
    with pytest.raises(ValueError, match="threads"):
        resolve_threads("many")
    assert resolve_threads("3") == 3 and resolve_threads("auto") >= 1
    with pytest.raises(ValueError, match="code_images"):
        DemoConfig(code_images=4, generator_batch=8).validate()
    with pytest.raises(ValueError, match="cfg_scale"):
        DemoConfig(cfg_scale=0.5).validate()
    with pytest.raises(ValueError, match="samples_per_class"):
        DemoConfig(samples_per_class=30).validate()


def test_demo_stops_at_a_signal(tmp_path):
    """SIGTERM during a training stage: that stage saves its checkpoint, the demo stops there (it has no resume)
    with one line naming the stage, exit 130, and no later stage runs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fqgan", "demo", "--quick", "--classifier-steps", "100000",
                             "--out-dir", "d", *FAST], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    started = tmp_path / "d" / "classifier" / "config.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not started.exists():
        time.sleep(0.05)
    time.sleep(1.0)  # a few steps in
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "train classifier stopped by a signal at step" in err and "Traceback" not in err
    assert (tmp_path / "d" / "classifier" / "last.pt").is_file() and not (tmp_path / "d" / "tokenizer").exists()
