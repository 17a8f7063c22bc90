"""The one loop's parallel choices, on CPU with gloo: FSDP2 equals one process on the whole batch (FAR and
the tokenizer), a sharded checkpoint of 2 ranks resumes in 1 process, FAR's fused heads run on sharded
weights, gradient accumulation equals the larger batch, activation checkpointing leaves the loss as is."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_train_generator import SMALL_FAR, write_codes
from test_train_generator import _cfg as generator_config
from test_train_tokenizer import MODEL

from fqgan.runtime.checkpoint import load_checkpoint
from fqgan.runtime.logging import read_metrics
from fqgan.tokenizer.config import TokenizerLossConfig
from fqgan.train.config import GeneratorTrainConfig, TokenizerTrainConfig
from fqgan.train.generator import train_generator
from fqgan.train.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# Dropouts off where runs with different process counts are compared: masks are drawn per rank.
QUIET_FAR = dict(SMALL_FAR, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, class_dropout_prob=0.0)
# The tokenizer's batch statistics are per process (entropy: global with quantizer_distributed; InfoNCE
# and the discriminator's BatchNorm: per rank, so off: disc_start after the last step).
QUIET_TOKENIZER = dict(model=MODEL.replace(quantizer_distributed=True),
                       loss=TokenizerLossConfig(perceptual_weight=0.0, semantic_weight=0.0, disc_start=100))


def _far(tmp_path, name, **changes):
    return generator_config(tmp_path, name, **{"model_overrides": dict(QUIET_FAR), "max_steps": 1, **changes})


def _tok(tmp_path, name, **changes):
    base = dict(out_dir=str(tmp_path / name), data="sample", sample_length=16, global_batch_size=4, num_workers=0,
                max_steps=1, log_every=1, ckpt_every=0, quiet=True, device="cpu", precision="fp32", **QUIET_TOKENIZER)
    base.update(changes)
    return TokenizerTrainConfig(**base)


def _worker(rank, world, init_file, kind, cfg_dict):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        if kind == "generator":
            train_generator(GeneratorTrainConfig.from_dict(cfg_dict))
        else:
            train_tokenizer(TokenizerTrainConfig.from_dict(cfg_dict))
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, kind, cfg, world=2):
    mp.spawn(_worker, args=(world, str(tmp_path / f"pg-{cfg.out_dir.rsplit('/', 1)[-1]}"), kind, cfg.to_dict()),
             nprocs=world, join=True)


def _gradients(ckpt, key="optimizer"):
    """Adam's exp_avg after one step is (1 - beta1) * grad: the gradients. A last.pt optimizer state is keyed by
    position in the optimizer's groups, a sharded one by parameter name: both as a list in group order."""
    opt = ckpt[key]
    return [opt["state"][p]["exp_avg"] / 0.1 for g in opt["param_groups"] for p in g["params"]]


def _assert_same_step(a, b, module="model", key="optimizer"):
    """``a``: a one-process last.pt, ``b``: a sharded 2-rank checkpoint, both after one step."""
    names = [n for g in b[key]["param_groups"] for n in g["params"]]
    for n, ga, gb in zip(names, _gradients(a, key), _gradients(b, key), strict=True):
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-7, msg=lambda m, n=n: f"grad of {n}: {m}")
        # Weights agree wherever the gradient is not float noise on a mathematically zero gradient:
        # Adam turns such noise into full +-lr steps.
        real = ga.abs() > 1e-6
        torch.testing.assert_close(b[module][n][real], a[module][n][real], rtol=0, atol=1e-7)


def test_fsdp_generator_two_ranks_equal_one_process(tmp_path):
    write_codes(tmp_path / "codes")
    train_generator(_far(tmp_path, "one"))
    _spawn(tmp_path, "generator", _far(tmp_path, "two", parallel="fsdp"))
    a = load_checkpoint(tmp_path / "one" / "last.pt")
    b = load_checkpoint(tmp_path / "two" / "last.dcp")  # sharded, gathered here
    assert b["world_size"] == 2 and len(b["rng"]) == 2 and set(b["model"]) == set(a["model"])
    _assert_same_step(a, b)
    ra, rb = read_metrics(tmp_path / "one" / "metrics.jsonl")[0], read_metrics(tmp_path / "two" / "metrics.jsonl")[0]
    assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)


def test_fsdp_tokenizer_two_ranks_equal_one_process(tmp_path):
    train_tokenizer(_tok(tmp_path, "one"))
    _spawn(tmp_path, "tokenizer", _tok(tmp_path, "two", parallel="fsdp"))
    a = load_checkpoint(tmp_path / "one" / "last.pt")
    b = load_checkpoint(tmp_path / "two" / "last.dcp")
    _assert_same_step(a, b)
    ra, rb = read_metrics(tmp_path / "one" / "metrics.jsonl")[0], read_metrics(tmp_path / "two" / "metrics.jsonl")[0]
    assert rb["loss_gen"] == pytest.approx(ra["loss_gen"], rel=1e-5)
    assert rb["usage_vis"] == ra["usage_vis"]


def test_fsdp_checkpoint_of_two_ranks_resumes_in_one_process(tmp_path):
    # With the EMA, activation checkpointing and 2 micro-batches per rank on, to cover their sharded paths.
    write_codes(tmp_path / "codes")
    extra = dict(ema=True, activation_checkpointing=True, grad_accum=2)
    _spawn(tmp_path, "generator", _far(tmp_path, "full", parallel="fsdp", max_steps=3, **extra))
    _spawn(tmp_path, "generator", _far(tmp_path, "part", parallel="fsdp", max_steps=2, **extra))
    with pytest.warns(UserWarning, match="written by 2 process"):
        train_generator(_far(tmp_path, "part", max_steps=3, resume="auto", **extra))  # 1 process: DCP reshards
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    part = read_metrics(tmp_path / "part" / "metrics.jsonl")
    assert [r["step"] for r in part] == [1, 2, 3]
    assert part[2]["loss"] == pytest.approx(full[2]["loss"], rel=1e-5)
    # The 1-process run wrote last.pt; --resume auto takes the newer of last.pt and last.dcp.
    a, b = load_checkpoint(tmp_path / "full" / "last.dcp"), load_checkpoint(tmp_path / "part" / "last.pt")
    assert b["steps"] == 3
    for name, t in a["ema"].items():
        torch.testing.assert_close(b["ema"][name], t, rtol=0, atol=1e-6, msg=lambda m, n=name: f"ema {n}: {m}")


def _sharded_heads_worker(rank, world, init_file, out_file):
    from torch.distributed.tensor import DTensor

    from fqgan.generator import FAR, FARConfig
    from fqgan.generator.model import TransformerBlock
    from fqgan.runtime.dist import init_distributed
    from fqgan.runtime.parallel import shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        cfg = FARConfig.from_preset("FAR-tiny", num_factors=2, vocab_size=48, block_size=16, num_classes=5, **QUIET_FAR)
        plain = FAR(cfg)
        sharded = FAR(cfg)
        sharded.load_state_dict(plain.state_dict())
        shard(sharded, (TransformerBlock,), init_distributed("cpu"))
        assert isinstance(sharded.head, DTensor)  # the k output heads [k, V, D], sharded over the ranks
        g = torch.Generator().manual_seed(1)
        codes, labels = torch.randint(0, 48, (4, 2, 16), generator=g), torch.randint(0, 5, (4,), generator=g)
        lp, ls = plain(codes, labels).loss, sharded(codes, labels).loss  # both through fk.linear_cross_entropy
        lp.backward()
        ls.backward()
        grad = sharded.head.grad.full_tensor()
        # FSDP averages gradients over ranks; both ranks saw the same batch, so the mean is this batch's.
        torch.save({"loss": (lp.item(), ls.item()), "grad": (plain.head.grad, grad)}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_far_fused_heads_run_on_sharded_weights(tmp_path):
    mp.spawn(_sharded_heads_worker, args=(2, str(tmp_path / "pg"), str(tmp_path / "out")), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f"{tmp_path / 'out'}.{rank}")
        assert got["loss"][1] == pytest.approx(got["loss"][0], rel=1e-6)
        torch.testing.assert_close(got["grad"][1], got["grad"][0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["generator", "tokenizer"])
def test_grad_accum_equals_the_larger_batch(tmp_path, kind):
    # 2 x 4 accumulated against 1 x 8, one process, two steps (the second starts from different weights
    # if the first differed).
    if kind == "generator":
        write_codes(tmp_path / "codes")
        cfg = lambda name, **kw: _far(tmp_path, name, global_batch_size=8, max_steps=2, **kw)
        train, key = train_generator, "loss"
    else:
        loss = TokenizerLossConfig(perceptual_weight=0.0, semantic_weight=0.0, disc_start=100)
        model = MODEL.replace(entropy_loss_ratio=0.0)  # the entropy loss's code distribution is per micro-batch
        cfg = lambda name, **kw: _tok(tmp_path, name, global_batch_size=8, max_steps=2, model=model,
                                      loss=loss, **kw)
        train, key = train_tokenizer, "loss_gen"
    train(cfg("big"))
    train(cfg("accum", grad_accum=2))
    a, b = load_checkpoint(tmp_path / "big" / "last.pt"), load_checkpoint(tmp_path / "accum" / "last.pt")
    big, accum = read_metrics(tmp_path / "big" / "metrics.jsonl"), read_metrics(tmp_path / "accum" / "metrics.jsonl")
    for ra, rb in zip(big, accum, strict=True):
        assert rb[key] == pytest.approx(ra[key], rel=1e-5)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
    for name, t in a["model"].items():
        if t.is_floating_point():
            torch.testing.assert_close(b["model"][name], t, rtol=0, atol=2e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"] == 2  # one Adam step per batch


def test_grad_accum_must_divide_the_batch(tmp_path):
    write_codes(tmp_path / "codes")
    with pytest.raises(ValueError, match="does not split into --grad-accum 3"):
        train_generator(_far(tmp_path, "x", grad_accum=3))


@pytest.mark.parametrize("kind", ["generator", "tokenizer"])
def test_activation_checkpointing_keeps_the_loss(tmp_path, kind):
    # Dropout on: the recomputation replays the RNG, so the masks (and the losses) are the same.
    if kind == "generator":
        write_codes(tmp_path / "codes")
        cfg = lambda name, **kw: _far(tmp_path, name, max_steps=3, model_overrides=dict(SMALL_FAR), **kw)
        train, key = train_generator, "loss"
    else:
        cfg = lambda name, **kw: _tok(tmp_path, name, max_steps=3, model=MODEL.replace(dropout_p=0.1), **kw)
        train, key = train_tokenizer, "loss_gen"
    plain, checkpointed = [], []
    train(cfg("plain"), on_step=lambda s, v: plain.append(v[key]))
    train(cfg("ac", activation_checkpointing=True), on_step=lambda s, v: checkpointed.append(v[key]))
    assert checkpointed == pytest.approx(plain, rel=1e-6)
    a, b = load_checkpoint(tmp_path / "plain" / "last.pt"), load_checkpoint(tmp_path / "ac" / "last.pt")
    assert set(a["model"]) == set(b["model"])  # the checkpoint wrapper leaves the state-dict names as they are


def test_fsdp_without_a_process_group_says_how(tmp_path, capsys):
    from fqgan.cli import main

    write_codes(tmp_path / "codes")
    argv = ["train-generator", "--codes", str(tmp_path / "codes"), "--preset", "FAR-tiny", "--parallel", "fsdp",
            "--steps", "1", "--batch-size", "4", "--device", "cpu", "--out-dir", str(tmp_path / "r"), "--quiet"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "--parallel fsdp needs a process group: run under torchrun" in capsys.readouterr().err


def _mixed_precision_worker(rank, world, init_file, out_file):
    from fqgan.runtime.dist import init_distributed
    from fqgan.runtime.parallel import shard
    from fqgan.tokenizer import FQTokenizer
    from fqgan.tokenizer.adapter import FactorizedAdapter

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = FQTokenizer(MODEL)
        shard(model, (FactorizedAdapter,), init_distributed("cpu"), mixed_precision=True)
        seen = {}
        model.quantizer.register_forward_pre_hook(lambda m, a: seen.update(codebooks=m.codebooks.dtype))
        model.branches[0].adapter.register_forward_pre_hook(
            lambda m, a: seen.update(adapter=m.positional_embedding.dtype))
        model(torch.rand(2, 3, 32, 32) * 2 - 1)
        torch.save(seen, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_fsdp_mixed_precision_keeps_the_quantizer_in_fp32(tmp_path):
    mp.spawn(_mixed_precision_worker, args=(2, str(tmp_path / "pg"), str(tmp_path / "out")), nprocs=2, join=True)
    seen = torch.load(f"{tmp_path / 'out'}.0")
    assert seen == {"adapter": torch.bfloat16, "codebooks": torch.float32}
