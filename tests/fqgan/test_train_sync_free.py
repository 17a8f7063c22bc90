"""A training step reads nothing on the host between its data batch and its optimizer steps (issue 18,
section 7): a whole tokenizer step (TokenizerLoss: pixel, GAN and quantizer terms, the discriminator step,
clipping, EMA, the metric sums) and a whole FAR step run under ``NoHostReads`` (tests/test_sync_free.py),
with the kernels' value checks on their device path. Only the optimizers' own ``step`` runs outside it
(torch's Adam keeps its step counters on the host, where reading them costs no GPU sync). The metric sums
are read once per log interval: :class:`fqgan.runtime.logging.MetricMeans` reads nothing until ``flush``.
"""

import pytest
import torch
from test_sync_free import NoHostReads
from test_train_generator import SMALL_FAR, write_codes
from test_train_tokenizer import MODEL
from torch.utils._python_dispatch import _disable_current_modes

from fqgan.runtime.dist import DistInfo
from fqgan.runtime.ema import EMA
from fqgan.runtime.logging import MetricMeans
from fqgan.tokenizer.config import TokenizerLossConfig
from fqgan.train.config import GeneratorTrainConfig, TokenizerTrainConfig
from fqgan.train.generator import GeneratorTask
from fqgan.train.loop import _Run, _split
from fqgan.train.tokenizer import TokenizerTask

pytestmark = pytest.mark.usefixtures("one_thread", "as_if_on_gpu")


@pytest.fixture
def as_if_on_gpu(monkeypatch):
    from fqgan_kernels import _validate

    monkeypatch.setattr(_validate, "on_host", lambda x: False)


def _one_step_without_host_reads(cfg, task, batch, step):
    info = DistInfo(0, 1, 0, torch.device("cpu"), None)
    run = _Run(cfg, task, info)
    run.precision = "fp32"
    torch.manual_seed(0)
    modules = task.build(info.device)
    run.model = modules["model"]
    ema = EMA(run.model, 0.99)
    owned = {key: (modules[owner], opt) for key, (owner, opt) in task.optimizers(modules).items()}
    for _, opt in owned.values():  # the optimizer's own step: outside the checked region (see the docstring)
        step_fn = opt.step

        def unchecked(*args, _step=step_fn, **kwargs):
            with _disable_current_modes():
                return _step(*args, **kwargs)

        opt.step = unchecked
    for m in modules.values():
        m.train()
    phases = task.phases(modules, "fp32")
    means = MetricMeans(info)
    with NoHostReads():
        values = run._step(phases, owned, ema, _split(batch, cfg.grad_accum), step)
        means.add(values)
    assert means.count == 1 and set(values) >= set(task.report_keys)
    return means.flush()


def test_tokenizer_step_reads_nothing_on_the_host(tmp_path):
    # disc_start = 1: the generator's GAN term and the discriminator step both run; two micro-batches.
    cfg = TokenizerTrainConfig(out_dir=str(tmp_path), model=MODEL, global_batch_size=4, grad_accum=2, device="cpu",
                               loss=TokenizerLossConfig(perceptual_weight=0.0, semantic_weight=0.0, disc_start=1))
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    keys, means, _ = _one_step_without_host_reads(cfg, TokenizerTask(cfg), (images, torch.zeros(4)), step=5)
    assert {"loss_gen", "loss_disc", "grad_norm", "grad_norm_disc", "usage_vis"} <= set(keys)
    assert torch.isfinite(means).all()


def test_far_step_reads_nothing_on_the_host(tmp_path):
    write_codes(tmp_path / "codes")
    cfg = GeneratorTrainConfig(out_dir=str(tmp_path / "run"), codes=str(tmp_path / "codes"), preset="FAR-tiny",
                               model_overrides=dict(SMALL_FAR), global_batch_size=4, device="cpu")
    task = GeneratorTask(cfg)
    data, _ = task.dataset()
    codes = torch.stack([data[i][0] for i in range(4)])
    keys, means, _ = _one_step_without_host_reads(cfg, task, (codes, torch.arange(4) % 5), step=1)
    assert {"loss", "grad_norm"} <= set(keys) and torch.isfinite(means).all()


def test_the_check_catches_a_host_read_in_a_step(tmp_path, monkeypatch):
    # The same FAR step with one .item() in its loss (what the progress bar used to do) must fail.
    write_codes(tmp_path / "codes")
    cfg = GeneratorTrainConfig(out_dir=str(tmp_path / "run"), codes=str(tmp_path / "codes"), preset="FAR-tiny",
                               model_overrides=dict(SMALL_FAR), global_batch_size=4, device="cpu")
    task = GeneratorTask(cfg)
    data, _ = task.dataset()
    phases = task.phases

    def reading(wrapped, precision):
        (phase,) = phases(wrapped, precision)

        def loss(i, batch, step):
            value, metrics = phase.loss(i, batch, step)
            float(value.item())
            return value, metrics

        return [phase._replace(loss=loss)]

    monkeypatch.setattr(task, "phases", reading)
    codes = torch.stack([data[i][0] for i in range(4)])
    with pytest.raises(AssertionError, match="host read"):
        _one_step_without_host_reads(cfg, task, (codes, torch.arange(4) % 5), step=1)
