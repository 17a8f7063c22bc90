"""The runtime floor (fqgan.runtime): checkpoints (atomic, clear errors), RNG state, EMA, sampler resume, metrics."""

import json
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from fqgan.runtime.checkpoint import CheckpointError, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from fqgan.runtime.device import cpu_has_fast_bf16, resolve_precision
from fqgan.runtime.dist import all_reduce_mean, init_distributed
from fqgan.runtime.ema import EMA
from fqgan.runtime.logging import MetricsLogger, read_metrics
from fqgan.runtime.sampler import ResumableSampler


def _state():
    return {"model": {"w": torch.randn(3, 5)}, "step": 7, "rng": capture_rng(),
            "cfg": {"lr": 1e-4, "betas": [0.9, 0.95]}}


def test_checkpoint_roundtrip(tmp_path):
    st = _state()
    path = save_checkpoint(tmp_path / "sub" / "ckpt.pt", st, kind="test")
    out = load_checkpoint(path, kind="test")
    assert out["kind"] == "test" and out["step"] == 7 and out["cfg"] == st["cfg"]
    torch.testing.assert_close(out["model"]["w"], st["model"]["w"], rtol=0, atol=0)
    assert [f for f in os.listdir(tmp_path / "sub")] == ["ckpt.pt"]  # no temporary left behind


def test_checkpoint_save_failure_keeps_old_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1}, kind="test")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(path, {"step": 2, "bad": Unpicklable()}, kind="test")
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_checkpoint_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found.*looked at"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_checkpoint_truncated(tmp_path, cut):
    path = save_checkpoint(tmp_path / "c.pt", _state(), kind="test")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_checkpoint(path)


@pytest.mark.parametrize("head", [b"", b"\x80\x02"], ids=["random", "pickle-header"])
def test_checkpoint_corrupted(tmp_path, head):
    path = tmp_path / "c.pt"
    path.write_bytes(head + os.urandom(4096))
    with pytest.raises(CheckpointError, match="corrupted or truncated") as info:
        load_checkpoint(path)
    # torch's advice for trusted files with custom classes must not reach a user with a broken file
    assert "weights_only" not in str(info.value) and "file an issue" not in str(info.value)


def test_checkpoint_bitflip_in_payload(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", {"model": {"w": torch.randn(64, 64)}}, kind="test")
    data = bytearray(open(path, "rb").read())
    # zip central directory lives at the end; clobber it
    data[-60:-20] = b"\x00" * 40
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_checkpoint(path)


def test_checkpoint_empty_and_folder(tmp_path):
    (tmp_path / "e.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "e.pt")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)


def test_checkpoint_wrong_kind(tmp_path):
    path = save_checkpoint(tmp_path / "g.pt", {"step": 1}, kind="generator")
    with pytest.raises(CheckpointError, match="holds a 'generator' checkpoint; expected 'tokenizer'"):
        load_checkpoint(path, kind="tokenizer")
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="no 'kind' entry"):
        load_checkpoint(tmp_path / "foreign.pt", kind="tokenizer")


# The legacy global NumPy generator on purpose: it is the state capture_rng saves.
def test_rng_roundtrip_through_checkpoint(tmp_path):
    random.seed(1), torch.manual_seed(3)
    np.random.seed(2)  # noqa: NPY002
    np.random.randn()  # noqa: NPY002 -- leave a cached gaussian in numpy's state
    save_checkpoint(tmp_path / "r.pt", {"rng": capture_rng()}, kind="test")
    expected = (random.random(), np.random.randn(3).tolist(), torch.randn(3))  # noqa: NPY002
    random.seed(9), np.random.seed(9), torch.manual_seed(9)  # noqa: NPY002
    restore_rng(load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (random.random(), np.random.randn(3).tolist(), torch.randn(3))  # noqa: NPY002
    assert got[0] == expected[0] and got[1] == expected[1]
    torch.testing.assert_close(got[2], expected[2], rtol=0, atol=0)


def test_ema_update():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = EMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model(torch.randn(5, 4))  # moves the BatchNorm running stats
    ema.update(model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ema.model.state_dict()[name], 0.9 * before[name] + 0.1 * p.detach())
    torch.testing.assert_close(ema.model[1].running_mean, model[1].running_mean)
    assert not any(p.requires_grad for p in ema.model.parameters())
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.5)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_resume_position(world):
    data = list(range(23))
    for rank in range(world):
        full = ResumableSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=5, drop_last=True)
        full.set_position(epoch=2)
        order = list(full)
        part = ResumableSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=5, drop_last=True)
        part.set_position(epoch=2, skip=4)
        assert list(part) == order[4:] and len(part) == len(order) - 4
    with pytest.raises(ValueError, match="skip"):
        full.set_position(0, skip=10**6)


def test_metrics_logger_and_resume_truncation(tmp_path):
    path = tmp_path / "m.jsonl"
    log = MetricsLogger(path)
    for step in (1, 2, 3, 4):
        log.log(step, loss=torch.tensor(0.5 * step), lr=1e-4, bad=float("nan"))
    log.close()
    recs = read_metrics(path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and recs[1]["loss"] == 1.0 and recs[0]["bad"] == "nan"
    with open(path, "a") as f:
        f.write('{"step": 5, "lo')  # a line cut by a crash
    log = MetricsLogger(path, resume_step=2)
    log.log(3, loss=9.0)
    log.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 0.5), (2, 1.0), (3, 9.0)]
    assert all(json.loads(line) for line in open(path))
    MetricsLogger(tmp_path / "x.jsonl", enabled=False).log(1, a=1)
    assert not (tmp_path / "x.jsonl").exists()


def test_single_process_dist_info(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert info.world_size == 1 and info.rank == 0 and info.is_main and info.backend is None
    assert all_reduce_mean({"a": 2.0}, info) == {"a": 2.0}
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        init_distributed("cpu")


def test_precision_and_device_errors(monkeypatch):
    # auto: bf16 on CPUs with AMX or AVX512-BF16 (native bf16 matrix products), fp32 on the others.
    expected = "bf16" if cpu_has_fast_bf16() else "fp32"
    assert resolve_precision("auto", torch.device("cpu")) == expected
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert not cpu_has_fast_bf16() and resolve_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            init_distributed("cuda")
