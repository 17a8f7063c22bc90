"""Smoke test of ``fqgan demo`` at minimal settings: every stage runs and every output is written."""

import json

import pytest
import torch
from PIL import Image

from fqgan.cli import main
from fqgan.demo import DemoConfig, resolve_threads

MINIMAL = ["--tokenizer-steps", "3", "--generator-steps", "3", "--train-crops", "32", "--eval-images", "8",
           "--code-images", "19", "--tokenizer-batch", "8", "--generator-batch", "8",
           "--sample-classes", "2", "--samples-per-class", "2", "--speed-rounds", "1",
           "--threads", "1", "--device", "cpu", "--quiet"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_demo_minimal(tmp_path, capsys):
    out = tmp_path / "demo_out"
    assert main(["demo", "--out-dir", str(out), *MINIMAL]) == 0
    text = capsys.readouterr().out
    assert "tokenizer PSNR" in text and "vs reference" in text
    for name in ("reconstructions.png", "samples.png", "training_curves.png", "metrics.json", "report.md"):
        assert (out / name).is_file(), name
    with Image.open(out / "samples.png") as im:
        assert im.size[0] > 2 * 32 and im.size[1] > 2 * 32
    m = json.loads((out / "metrics.json").read_text())
    ev = m["tokenizer"]["eval"]
    assert ev["num_images"] == 8 and 0 < ev["psnr"] < 100 and len(ev["usage"]) == 2
    assert m["generator"]["steps"] == 3 and m["generator"]["codes"]["num_images"] == 19
    assert {r["op"].split(" ")[0] for r in m["speedups"]} == {"quantizer", "FAR", "sampling"}
    assert all(r["fused_ms"] > 0 and r["reference_ms"] > 0 for r in m["speedups"])
    assert set(m["stages"]) == {"train tokenizer", "evaluate tokenizer", "extract codes", "train generator",
                                "sample", "kernel timing"}
    report = (out / "report.md").read_text()
    assert "Kernel backend" in report and "speed-up" in report and f"{ev['psnr']:.2f} dB" in report


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
