"""Codes and the FAR training loop: extraction with flips, exact resume, 2-process DDP equals one
process on the whole batch, the tokenizer/generator compatibility checks."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fqgan.data.codes import CodeDataset, CodesMeta, extract_codes, load_codes_meta
from fqgan.data.datasets import SampleImages
from fqgan.generator import FARConfig, check_generator_tokenizer
from fqgan.generator.load import load_generator
from fqgan.runtime.checkpoint import load_checkpoint
from fqgan.runtime.logging import read_metrics
from fqgan.tokenizer import FQTokenizer
from fqgan.tokenizer.config import TINY
from fqgan.train.config import GeneratorTrainConfig
from fqgan.train.generator import far_optimizer, model_config_for, train_generator

SMALL_FAR = {"dim": 32, "n_layer": 2, "n_head": 2, "ar_n_layer": 1, "multiple_of": 16}


pytestmark = pytest.mark.usefixtures("one_thread")


def write_codes(folder, n=24, k=2, K=32, grid=4, classes=5, seed=0):
    """A code folder with random codes (what extract-codes writes), without a tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    np.save(folder / "codes.npy", rng.integers(0, K, (n, 2, k, grid, grid)).astype(np.uint16))
    np.save(folder / "labels.npy", rng.integers(0, classes, n).astype(np.int64))
    meta = CodesMeta(n, 2, k, K, grid, grid * 4, tuple(f"c{i}" for i in range(classes)),
                     tuple(f"f{i}" for i in range(k)))
    (folder / "meta.json").write_text(json.dumps(meta.to_dict()))
    return folder


def _cfg(tmp_path, name, **changes):
    base = dict(out_dir=str(tmp_path / name), codes=str(tmp_path / "codes"), preset="FAR-tiny",
                model_overrides=dict(SMALL_FAR), global_batch_size=4, num_workers=0, max_steps=4, log_every=1,
                # fp32, not auto (bf16 on CPUs with AMX / AVX512-BF16): runs are compared to fp32 tolerances
                ckpt_every=0, quiet=True, device="cpu", precision="fp32")
    base.update(changes)
    return GeneratorTrainConfig(**base)


def _losses(cfg):
    seen = []
    train_generator(cfg, on_step=lambda step, v: seen.append((step, v["loss"])))
    return seen


def test_extract_codes_with_flips(tmp_path):
    torch.manual_seed(0)
    tok = FQTokenizer(TINY.replace(codebook_size=64, feat_pred_dims=(0, 0), teachers=(None, None))).eval()
    data = SampleImages(32, length=5, augment=False)
    meta = extract_codes(tok, data, tmp_path / "c", batch_size=2, tokenizer_path="tok.pt")
    assert (meta.num_images, meta.num_aug, meta.num_codebooks, meta.grid_size) == (5, 2, 2, 8)
    assert load_codes_meta(tmp_path / "c") == meta and meta.classes[0] == "astronaut"
    codes = np.load(tmp_path / "c" / "codes.npy")
    assert codes.shape == (5, 2, 2, 8, 8) and codes.dtype == np.uint16
    x = torch.stack([data[i][0] for i in range(5)])
    with torch.no_grad():
        assert np.array_equal(codes[:, 0], tok.encode(x).numpy())
        assert np.array_equal(codes[:, 1], tok.encode(torch.flip(x, dims=[-1])).numpy())
    assert np.load(tmp_path / "c" / "labels.npy").tolist() == [0, 1, 2, 3, 4]
    ds = CodeDataset(tmp_path / "c")
    item, label = ds[3]
    assert item.shape == (2, 64) and item.dtype == torch.int64 and label == 3
    picks = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        picks.add(bool(torch.equal(ds[3][0], torch.from_numpy(codes[3, 1].astype(np.int64)).view(2, 64))))
    assert picks == {True, False}  # both augmentations are drawn over epochs


def test_code_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="code folder .* not found.*extract-codes"):
        CodeDataset(tmp_path / "none")
    write_codes(tmp_path / "c")
    (tmp_path / "c" / "labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match="no labels.npy"):
        CodeDataset(tmp_path / "c")
    write_codes(tmp_path / "d")
    np.save(tmp_path / "d" / "codes.npy", np.zeros((24, 2, 3, 4, 4), np.uint16))
    with pytest.raises(ValueError, match="codes.npy has shape"):
        CodeDataset(tmp_path / "d")


def test_resume_is_exact(tmp_path):
    write_codes(tmp_path / "codes")
    ref = _losses(_cfg(tmp_path, "full", ema=True))  # dropout and label dropout on (FAR-tiny defaults)
    _losses(_cfg(tmp_path, "part", ema=True, max_steps=2))
    got = _losses(_cfg(tmp_path, "part", ema=True, resume="auto"))
    assert got == ref[2:]
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "part" / "last.pt")
    for key in ("model", "ema"):
        assert all(torch.equal(t, b[key][n]) for n, t in a[key].items())
    assert [r["step"] for r in read_metrics(tmp_path / "part" / "metrics.jsonl")] == [1, 2, 3, 4]
    model, meta = load_generator(tmp_path / "part" / "last.pt")
    assert not model.training and model.config.vocab_size == 32 and meta["num_codebooks"] == 2


def _ddp_worker(rank, world, init_file, cfg_dict):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        train_generator(GeneratorTrainConfig.from_dict(cfg_dict))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    # Dropouts off: their masks are drawn per rank (label dropout too), so they cannot match one process.
    write_codes(tmp_path / "codes")
    quiet = dict(SMALL_FAR, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, class_dropout_prob=0.0)
    train_generator(_cfg(tmp_path, "one", model_overrides=quiet, max_steps=1))
    two = _cfg(tmp_path, "two", model_overrides=quiet, max_steps=1)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "pg"), two.to_dict()), nprocs=2, join=True)
    a, b = load_checkpoint(tmp_path / "one" / "last.pt"), load_checkpoint(tmp_path / "two" / "last.pt")
    assert b["world_size"] == 2
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert len(sa) == len(sb) > 0
    for i in sa:  # exp_avg = (1 - beta1) * grad after the first step
        torch.testing.assert_close(sb[i]["exp_avg"] / 0.1, sa[i]["exp_avg"] / 0.1, rtol=1e-4, atol=1e-7)
    for name, t in a["model"].items():
        torch.testing.assert_close(b["model"][name], t, rtol=0, atol=2e-7, msg=name)
    ra, rb = read_metrics(tmp_path / "one" / "metrics.jsonl")[0], read_metrics(tmp_path / "two" / "metrics.jsonl")[0]
    assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)


def test_generator_config_comes_from_the_codes(tmp_path):
    write_codes(tmp_path / "codes", k=3, K=16, grid=2, classes=4)
    train_generator(_cfg(tmp_path, "g", max_steps=1))
    c = load_checkpoint(tmp_path / "g" / "last.pt")["model_config"]
    assert (c["num_factors"], c["vocab_size"], c["block_size"], c["num_classes"]) == (3, 16, 4, 4)
    with pytest.raises(ValueError, match="num_factors=2 does not match the codes"):
        train_generator(_cfg(tmp_path, "h", max_steps=1, model_overrides=dict(SMALL_FAR, num_factors=2)))
    with pytest.raises(ValueError, match="smaller than the 4 classes"):
        train_generator(_cfg(tmp_path, "h", max_steps=1, num_classes=2))
    with pytest.raises(ValueError, match="other settings"):
        train_generator(_cfg(tmp_path, "g", max_steps=2, resume="auto", model_overrides=dict(SMALL_FAR, dim=48)))


def test_generator_tokenizer_compatibility():
    tok = TINY.replace(codebook_size=64)
    check_generator_tokenizer(FARConfig.from_preset("FAR-tiny", vocab_size=64, block_size=64), tok)
    with pytest.raises(ValueError, match="codebook size 512 but the tokenizer's sub-codebooks have 64"):
        check_generator_tokenizer(FARConfig.from_preset("FAR-tiny", vocab_size=512, block_size=64), tok)
    with pytest.raises(ValueError, match="k=3 sub-tokens"):
        check_generator_tokenizer(FARConfig.from_preset("FAR-tiny", num_factors=3, vocab_size=64, block_size=64), tok)
    with pytest.raises(ValueError, match="16 tokens per image"):
        check_generator_tokenizer(FARConfig.from_preset("FAR-tiny", vocab_size=64, block_size=16), tok)


def _meta(k=2, K=32, grid=4, classes=5) -> CodesMeta:
    return CodesMeta(8, 2, k, K, grid, grid * 4, tuple(f"c{i}" for i in range(classes)),
                     tuple(f"f{i}" for i in range(k)))


def test_drop_path_turns_residual_and_ffn_dropout_off_as_official(tmp_path):
    """train_c2i_*.py: `dropout_p = 0.0 if drop_path_rate > 0 else args.dropout_p` (resid and FFN; token and
    label dropout stay); an explicit resid/FFN dropout override is kept."""
    meta = _meta()
    plain = model_config_for(_cfg(tmp_path, "a"), meta)
    assert (plain.resid_dropout_p, plain.ffn_dropout_p, plain.drop_path_rate) == (0.1, 0.1, 0.0)
    dp = model_config_for(_cfg(tmp_path, "b", model_overrides=dict(SMALL_FAR, drop_path_rate=0.1)), meta)
    assert (dp.resid_dropout_p, dp.ffn_dropout_p, dp.token_dropout_p, dp.class_dropout_prob) == (0.0, 0.0, 0.1, 0.1)
    assert dp.drop_path_rate == 0.1
    explicit = model_config_for(_cfg(tmp_path, "c", model_overrides=dict(
        SMALL_FAR, drop_path_rate=0.1, resid_dropout_p=0.05, ffn_dropout_p=0.05)), meta)
    assert (explicit.resid_dropout_p, explicit.ffn_dropout_p) == (0.05, 0.05)


def test_optimizer_equals_official_creat_optimizer():
    """far_optimizer = the official creat_optimizer on the official module tree (AdamW; weight decay on every
    parameter with >= 2 dims -- label table, the k input embeddings, aggregation / attention / FFN weights, the
    k output heads -- none on biases and norms), with the official defaults lr 1e-4, betas (0.9, 0.95), decay
    0.05: two steps on the same gradients give the same weights. Our k embeddings / heads are one [k, V, D]
    tensor each, so a `dim() == 2` rule would leave them undecayed and fail here."""
    import far_official_ref as off

    from fqgan.generator import from_official, to_official_state_dict

    run = GeneratorTrainConfig()
    assert (run.lr, run.beta1, run.beta2, run.weight_decay, run.max_grad_norm, run.global_batch_size, run.epochs) \
        == (1e-4, 0.9, 0.95, 0.05, 1.0, 256, 300)
    ref = off.Transformer(off.ModelArgs(dim=16, n_layer=1, n_head=2, ar_n_layer=1, block_size=4, vocab_size=11,
                                        num_classes=3, num_factors=3, multiple_of=8))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g))  # the official init zeroes the heads: decay would not show
    model = from_official(ref.state_dict(), n_head=2, block_size=4)
    lr = 0.05  # large enough that the decay term lr * wd * w is far above float32 rounding
    named = dict(ref.named_parameters())
    official = torch.optim.AdamW([{"params": [p for p in named.values() if p.dim() >= 2], "weight_decay": 0.05},
                                  {"params": [p for p in named.values() if p.dim() < 2], "weight_decay": 0.0}],
                                 lr=lr, betas=(0.9, 0.95))
    ours = far_optimizer(model, dataclasses.replace(run, lr=lr), torch.device("cpu"))
    assert [grp["weight_decay"] for grp in ours.param_groups] == [0.05, 0.0]
    assert all(grp["betas"] == (0.9, 0.95) for grp in ours.param_groups)
    decayed = {id(p) for p in ours.param_groups[0]["params"]}
    assert id(model.tok_embed) in decayed and id(model.head) in decayed and id(model.aggregate.bias) not in decayed
    for _ in range(2):
        grads = {name: torch.randn(p.shape, generator=g) for name, p in named.items()}
        for name, p in named.items():
            p.grad = grads[name].clone()
        holder = from_official(grads, n_head=2, block_size=4)  # the same gradients in our layout
        for p, q in zip(model.parameters(), holder.parameters()):
            p.grad = q.detach().clone()
        official.step()
        ours.step()
    mine = to_official_state_dict(model)
    for name, p in ref.state_dict().items():
        torch.testing.assert_close(mine[name], p, rtol=1e-6, atol=1e-7, msg=name)
