"""FAR against the official source itself, when a git copy of showlab/FQGAN is named by ``FQGAN_OFFICIAL_REPO``.

The other parity tests compare with ``far_official_ref`` (a test-only re-write); a misreading of the official
code made in both the package and that re-write would pass them. These tests run the official files
``autoregressive/models/far_{dual,triple}.py``, ``generate_{dual,triple}.py`` (and ``utils/drop_path.py``)
read from that repository with ``git show HEAD:<path>`` at test time (nothing of them is stored in this
repository) and check: the re-write and the package against the official forward (logits, loss, all dropouts
live), the official sampling loop, the presets against ``FAR_B`` / ``FAR_L``, the official init, and the RoPE
table.

``FQGAN_OFFICIAL_REPO`` is a git directory (a clone's work tree or a bare repository) of showlab/FQGAN. Unset:
the tests are skipped, saying so; set but unusable (no such repository, no git, a file missing at HEAD): they fail
with what is wrong, since whoever set it meant them to run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import far_official_ref as off
import pytest
import torch
import torch.nn.functional as F

from fqgan.generator import FAR, PRESETS, FARConfig, generate
from fqgan.generator.model import rope_table_2d
from fqgan.generator.official import from_official, to_official_state_dict

REPO_VAR = "FQGAN_OFFICIAL_REPO"
FILES = {"far_2": "autoregressive/models/far_dual.py", "far_3": "autoregressive/models/far_triple.py",
         "gen_2": "autoregressive/models/generate_dual.py", "gen_3": "autoregressive/models/generate_triple.py",
         "drop_path": "utils/drop_path.py"}


def _show(repo: str, path: str) -> str:
    """``path`` at HEAD of the git directory ``repo``; fails the test with git's message when it cannot."""
    out = subprocess.run(["git", "-C", repo, "show", f"HEAD:{path}"], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.fail(f"{REPO_VAR}={repo!r}: cannot read {path} at HEAD ({out.stderr.strip()}); it must name a git "
                    f"copy of showlab/FQGAN")
    return out.stdout


def _module(name: str, source: str, folder: Path) -> types.ModuleType:
    file = folder / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(f"_fqgan_official_{name}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> dict[str, types.ModuleType]:
    repo = os.environ.get(REPO_VAR)
    if not repo:
        pytest.skip(f"{REPO_VAR} is not set: set it to a git copy of showlab/FQGAN to run these tests")
    if not os.path.isdir(repo):
        pytest.fail(f"{REPO_VAR}={repo!r} is not a directory")
    if shutil.which("git") is None:
        pytest.fail(f"{REPO_VAR} is set, but git is not on the PATH to read it")
    sources = {key: _show(repo, path) for key, path in FILES.items()}
    folder = tmp_path_factory.mktemp("official_far")
    drop_path = _module("drop_path", sources["drop_path"], folder)
    # far_*.py do `from utils.drop_path import DropPath`: provide that name only while they load.
    pkg = types.ModuleType("utils")
    pkg.drop_path = drop_path
    saved = {name: sys.modules.get(name) for name in ("utils", "utils.drop_path")}
    sys.modules.update({"utils": pkg, "utils.drop_path": drop_path})
    try:
        mods = {key: _module(key, sources[key], folder) for key in ("far_2", "far_3", "gen_2", "gen_3")}
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod
    return mods


pytestmark = pytest.mark.usefixtures("one_thread")


SHAPES = {"B-like": dict(dim=64, n_head=4, n_layer=3, ar_n_layer=3, block_size=16),
          "L-like": dict(dim=80, n_head=5, n_layer=4, ar_n_layer=4, block_size=64)}
ALL_DROPOUTS = dict(token_dropout_p=0.1, resid_dropout_p=0.1, ffn_dropout_p=0.1, attn_dropout_p=0.1,
                    drop_path_rate=0.2, class_dropout_prob=0.3)


def _official_model(mods, k: int, shape: str, V: int = 41, C: int = 9, seed: int = 1, **kw):
    with contextlib.redirect_stdout(io.StringIO()):  # the official constructor prints the AR-head depth
        model = mods[f"far_{k}"].Transformer(mods[f"far_{k}"].ModelArgs(**SHAPES[shape], vocab_size=V,
                                                                        num_classes=C, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def _official_loss(model, k, idx, labels, seed):
    rows = [idx[:, i].contiguous() for i in range(k)]  # the official loss .view()s its targets
    kw = {f"idx_{i + 1}": rows[i] for i in range(k)} | {f"targets_{i + 1}": rows[i] for i in range(k)}
    torch.manual_seed(seed)
    out = model(cond_idx=labels, **kw)
    return list(out[:-1]), out[-1]


@pytest.mark.parametrize("k,shape", [(2, "B-like"), (3, "L-like")])
def test_rewrite_and_model_equal_official_forward(official, k, shape):
    """Same weights in the official model, the re-write and FAR; training mode with every dropout live (label,
    token, attention, residual, FFN, drop-path): the same logits and loss for the same seed, and the same
    state-dict keys in the official model and the re-write."""
    ref = _official_model(official, k, shape, **ALL_DROPOUTS).train()
    a = ref.config
    rewrite = off.Transformer(off.ModelArgs(**SHAPES[shape], vocab_size=a.vocab_size, num_classes=a.num_classes,
                                            num_factors=k, **ALL_DROPOUTS)).train()
    rewrite.load_state_dict(ref.state_dict(), strict=True)
    model = from_official(ref.state_dict(), n_head=a.n_head, block_size=a.block_size, **ALL_DROPOUTS).train()
    assert sorted(to_official_state_dict(model)) == sorted(ref.state_dict())
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, a.vocab_size, (4, k, a.block_size), generator=g)
    labels = torch.randint(0, a.num_classes, (4,), generator=g)
    for seed in (0, 1):
        logits_off, loss_off = _official_loss(ref, k, idx, labels, seed)
        torch.manual_seed(seed)
        logits_rw, loss_rw = rewrite(list(idx.unbind(1)), labels, targets=list(idx.unbind(1)))
        torch.manual_seed(seed)
        logits = model.logits(idx, labels)
        torch.manual_seed(seed)
        loss = model(idx, labels).loss
        for j in range(k):
            torch.testing.assert_close(logits_rw[j], logits_off[j], rtol=0, atol=0)
            torch.testing.assert_close(logits[:, j], logits_off[j], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss_rw, loss_off, rtol=0, atol=0)
        torch.testing.assert_close(loss, loss_off, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k,cfg,temp,top_k,top_p", [
    (2, [2.0, 4.0], [0.9, 1.2], [5, 0], [1.0, 0.8]),
    (3, [3.0, 1.5, 2.0], [1.0, 0.8, 1.1], [0, 3, 0], [0.9, 1.0, 1.0]),
    (2, [1.0, 1.0], [1.0, 1.0], [0, 0], [1.0, 1.0]),
])
def test_generation_equals_official_sample_fq(official, monkeypatch, k, cfg, temp, top_k, top_p):
    """The official generate_fq / sample_fq (KV caches, per-factor CFG, temperature, the official
    top_k_top_p_filtering) with its multinomial draw replaced by an inverse-CDF draw of the same uniforms
    as ``generate(..., seed=)``: identical codes, with the reference and the fused sampler."""
    ref = _official_model(official, k, "B-like", V=29, token_dropout_p=0.1, resid_dropout_p=0.1,
                          ffn_dropout_p=0.1).eval()
    model = from_official(ref.state_dict(), n_head=4, block_size=16)
    gen = official[f"gen_{k}"]
    g = torch.Generator().manual_seed(9)

    def sample_from_logits(logits, temperature=1.0, top_k=None, top_p=None, sample_logits=True):
        logits = logits[:, -1, :] / temperature  # the official steps up to its softmax
        if top_k > 0 or top_p < 1.0:
            logits = gen.top_k_top_p_filtering(logits, top_k=top_k, top_p=top_p)
        cdf = F.softmax(logits, dim=-1).double().cumsum(-1)
        u = torch.rand(cdf.shape[0], generator=g, dtype=torch.float64)
        return torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).clamp_max(cdf.shape[-1] - 1)

    monkeypatch.setattr(gen, "sample_from_logits", sample_from_logits)
    # The official loop sizes its caches for 2B rows whenever cfg >= 1 (so cfg = 1 needs B = 1 there) and
    # treats cfg <= 1 as no guidance, which is cfg = 1 here.
    guided = cfg[0] > 1
    labels = torch.tensor([0, 8, 5]) if guided else torch.tensor([4])
    want = gen.generate_fq(ref, labels, 16, cfg_scale=cfg if guided else [0.5] * k, temperature=temp,
                           top_k=top_k, top_p=top_p)
    for reference in (True, False):
        got = generate(model, labels, cfg_scale=cfg, temperature=temp, top_k=top_k, top_p=top_p, seed=9,
                       backend="reference" if reference else None)
        for j in range(k):
            assert torch.equal(got[:, j], want[j]), (reference, j)


@pytest.mark.parametrize("name", ["FAR-B", "FAR-L"])
def test_presets_equal_official_far_models(official, monkeypatch, name):
    """FAR_B / FAR_L's ModelArgs (sizes and every default: dropouts, eps, RoPE base, init range, classes,
    vocabulary, T) and the official SwiGLU hidden size equal the preset."""
    for k in (2, 3):
        far = official[f"far_{k}"]
        monkeypatch.setattr(far, "Transformer", lambda config: config)  # capture the arguments, build nothing
        args = far.FAR_models[name]()
        preset = FARConfig.from_preset(name, num_factors=k)
        for field in ("dim", "n_layer", "n_head", "n_kv_head", "ar_n_layer", "multiple_of", "ffn_dim_multiplier",
                      "rope_base", "norm_eps", "initializer_range", "token_dropout_p", "attn_dropout_p",
                      "resid_dropout_p", "ffn_dropout_p", "drop_path_rate", "num_classes", "class_dropout_prob",
                      "vocab_size", "block_size"):
            assert getattr(preset, field) == getattr(args, field), (k, field)
        assert args.cls_token_num == 1 and args.model_type == "c2i"
        with torch.device("meta"):
            assert far.FeedForward(args).w1.weight.shape[0] == preset.hidden_dim == PRESETS[name].hidden_dim


@pytest.mark.parametrize("k", [2, 3])
def test_init_equals_official(official, k):
    """Which weights the official init zeroes (output heads, biases), sets to one (norms) or draws from
    N(0, 0.02) (every other Linear / Embedding, the label table included): the same in FAR."""
    args = dict(SHAPES["B-like"], vocab_size=300, num_classes=50)
    with contextlib.redirect_stdout(io.StringIO()):
        ref = official[f"far_{k}"].Transformer(official[f"far_{k}"].ModelArgs(**args))
    torch.manual_seed(0)
    mine = to_official_state_dict(FAR(FARConfig(num_factors=k, **args)))
    for name, w in ref.state_dict().items():
        ours = mine[name]
        if (w == 0).all() or (w == 1).all():
            assert torch.equal(ours, w), name
        else:
            assert w.numel() >= 1000, name
            assert abs(w.std().item() - 0.02) < 0.002 and abs(ours.std().item() - 0.02) < 0.002, name
            assert abs(ours.mean().item()) < 0.002, name


def test_rope_table_equals_official(official):
    for G, head_dim, base in ((16, 64, 10000), (8, 16, 10000), (4, 20, 500.0)):
        want = official["far_2"].precompute_freqs_cis_2d(G, head_dim, base, 1)
        torch.testing.assert_close(rope_table_2d(G, head_dim, float(base)), want, rtol=0, atol=0)
