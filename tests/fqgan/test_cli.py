"""The ``fqgan`` command line: documented commands, a small end-to-end run, errors that say what to fix."""

import subprocess
import sys

import pytest

from fqgan.cli import build_parser, main

TINY_FLAGS = ["--preset", "tiny", "--codebook-size", "64", "--perceptual-weight", "0", "--semantic-weight", "0",
              "--batch-size", "4", "--num-workers", "0", "--quiet", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return parser, sub.choices


def test_every_command_is_documented(capsys):
    parser, commands = _commands()
    assert {"train-tokenizer", "eval-tokenizer", "reconstruct"} <= set(commands)
    top = parser.format_help()
    for name, p in commands.items():
        assert name in top
        text = p.format_help()
        assert p.description and len(text) > 200
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"


def test_python_dash_m_help():
    out = subprocess.run([sys.executable, "-m", "fqgan", "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "train-tokenizer" in out.stdout and "examples:" in out.stdout


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: fqgan" in capsys.readouterr().out


def _error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_train_eval_reconstruct_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train-tokenizer", *TINY_FLAGS, "--steps", "2", "--log-every", "1", "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "trained 2 steps" in text and "codebook usage vis" in text
    assert (out / "last.pt").is_file() and (out / "metrics.jsonl").is_file() and (out / "config.json").is_file()
    # Resume to step 3 from the checkpoint the first run left.
    assert main(["train-tokenizer", *TINY_FLAGS, "--steps", "3", "--out-dir", str(out), "--resume", "auto"]) == 0
    assert "trained 3 steps" in capsys.readouterr().out

    ev = tmp_path / "eval"
    assert main(["eval-tokenizer", "--checkpoint", str(out / "last.pt"), "--num-images", "4", "--batch-size", "4",
                 "--num-workers", "0", "--out", str(ev), "--no-rfid", "--quiet", "--device", "cpu"]) == 0
    assert (ev / "metrics.json").is_file() and "PSNR" in capsys.readouterr().out

    from fqgan.data.datasets import load_sample_photo

    photo = tmp_path / "chelsea.png"
    load_sample_photo("chelsea.png").save(photo)
    rec = tmp_path / "rec"
    assert main(["reconstruct", str(photo), "--checkpoint", str(out / "last.pt"), "--out", str(rec),
                 "--device", "cpu"]) == 0
    assert (rec / "metrics.json").is_file()


def test_error_missing_checkpoint_to_resume(tmp_path, capsys):
    err = _error(capsys, ["train-tokenizer", *TINY_FLAGS, "--steps", "1", "--out-dir", str(tmp_path / "o"),
                          "--resume", str(tmp_path / "missing.pt")])
    assert "fqgan train-tokenizer: error: checkpoint not found" in err and "Traceback" not in err


def test_error_corrupted_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
    err = _error(capsys, ["train-tokenizer", *TINY_FLAGS, "--steps", "1", "--out-dir", str(tmp_path / "o"),
                          "--resume", str(bad)])
    assert "corrupted or truncated" in err
    err = _error(capsys, ["eval-tokenizer", "--checkpoint", str(bad), "--no-rfid", "--device", "cpu"])
    assert "fqgan eval-tokenizer: error:" in err and "bad.pt" in err


def test_error_empty_image_folder(tmp_path, capsys):
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    err = _error(capsys, ["train-tokenizer", *TINY_FLAGS, "--data", str(tmp_path / "imgs"),
                          "--out-dir", str(tmp_path / "o")])
    assert "contains no images" in err


def test_error_bad_values(tmp_path, capsys):
    err = _error(capsys, ["train-tokenizer", *TINY_FLAGS, "--batch-size", "0", "--out-dir", str(tmp_path / "o")])
    assert "global_batch_size must be a positive int" in err
    err = _error(capsys, ["train-tokenizer", "--preset", "nope"])
    assert "invalid choice: 'nope'" in err
    err = _error(capsys, ["train-tokenizer", *TINY_FLAGS, "--image-size", "30", "--out-dir", str(tmp_path / "o")])
    assert "image_size 30 is not divisible" in err


def test_codes_generator_sample_end_to_end_and_errors(tmp_path, capsys):
    tok = tmp_path / "tok"
    assert main(["train-tokenizer", *TINY_FLAGS, "--steps", "1", "--out-dir", str(tok)]) == 0
    codes = tmp_path / "codes"
    assert main(["extract-codes", "--tokenizer", str(tok / "last.pt"), "--num-images", "8", "--out", str(codes),
                 "--num-workers", "0", "--device", "cpu", "--quiet"]) == 0
    gen = tmp_path / "gen"
    assert main(["train-generator", "--codes", str(codes), "--preset", "FAR-tiny", "--dim", "32", "--n-layer", "1",
                 "--batch-size", "4", "--steps", "2", "--num-workers", "0", "--out-dir", str(gen), "--quiet",
                 "--device", "cpu"]) == 0
    png = tmp_path / "s.png"
    assert main(["sample", "--checkpoint", str(gen / "last.pt"), "--tokenizer", str(tok / "last.pt"),
                 "--class", "2", "--class", "chelsea", "--n", "2", "--out", str(png), "--device", "cpu"]) == 0
    assert png.is_file() and "class 2 (coffee), 1 (chelsea)" in capsys.readouterr().out

    base = ["sample", "--checkpoint", str(gen / "last.pt"), "--tokenizer", str(tok / "last.pt"), "--device", "cpu"]
    assert "unknown class id 19: this generator has classes 0..18" in _error(capsys, [*base, "--class", "19"])
    assert "unknown class 'zebra'" in _error(capsys, [*base, "--class", "zebra"])
    assert "one value or k=2 values" in _error(capsys, [*base, "--class", "1", "--cfg-scale", "4,2,1"])
    err = _error(capsys, [*base[:2], str(tmp_path / "none.pt"), *base[3:], "--class", "1"])
    assert "not found" in err or "no such file" in err
    # A tokenizer with other codebook sizes than the generator's codes.
    other = tmp_path / "tok2"
    flags = [f for f in TINY_FLAGS]
    flags[flags.index("--codebook-size") + 1] = "32"
    assert main(["train-tokenizer", *flags, "--steps", "1", "--out-dir", str(other)]) == 0
    err = _error(capsys, ["sample", "--checkpoint", str(gen / "last.pt"), "--tokenizer", str(other / "last.pt"),
                          "--class", "1", "--device", "cpu"])
    assert "built for codebook size 64 but the tokenizer's sub-codebooks have 32" in err
    # A missing code folder.
    err = _error(capsys, ["train-generator", "--codes", str(tmp_path / "missing"), "--preset", "FAR-tiny",
                          "--out-dir", str(tmp_path / "g3"), "--steps", "1", "--batch-size", "4", "--device", "cpu"])
    assert "code folder" in err and "extract-codes" in err
    # A tokenizer checkpoint given where a generator is expected.
    err = _error(capsys, [*base[:2], str(tok / "last.pt"), *base[3:], "--class", "1"])
    assert "'fqgan-tokenizer' checkpoint, not a generator" in err


def test_help_and_the_hint_without_the_model_extra(tmp_path):
    # The extra's modules made unimportable (scripts/check_plain_install.sh does it with a real install).
    import subprocess
    import sys

    blocked = ["PIL", "tqdm", "torchvision", "transformers", "skimage", "scipy", "matplotlib", "sklearn", "lpips"]
    prelude = f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\nfrom fqgan.cli import main\n"
    for cmd in ([], ["train-tokenizer"], ["train-generator"], ["sample"], ["eval-tokenizer"], ["demo"]):
        got = subprocess.run([sys.executable, "-c", prelude + f"main({[*cmd, '--help']!r})"], capture_output=True,
                             text=True, cwd=tmp_path)
        assert got.returncode == 0 and "usage: fqgan" in got.stdout, got.stderr
    got = subprocess.run([sys.executable, "-c", prelude + "sys.exit(main(['train-generator', '--codes', 'x']))"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert got.returncode == 2 and "needs pillow" in got.stderr and "fqgan-kernels[model]" in got.stderr
    assert "Traceback" not in got.stderr


def test_internal_errors_keep_their_traceback(monkeypatch, capsys):
    # A ValueError that no input check raised (here: from torch) is a fault: it propagates with its traceback;
    # the package's own input checks still end in one line.
    import fqgan.cli as cli

    def broken(args):
        import torch

        torch.zeros(2).view(3)  # RuntimeError inside torch
        return None

    def implicit(args):
        return int("not a number")  # a ValueError Python raises, not an input check

    def checked(args):
        from fqgan.runtime.errors import UsageError

        raise UsageError("--n must be positive")

    for fn, exc in ((broken, RuntimeError), (implicit, ValueError)):
        monkeypatch.setattr(cli, "run_sample", fn)
        with pytest.raises(exc):
            cli.main(["sample", "--checkpoint", "g.pt", "--tokenizer", "t.pt", "--class", "0"])
    monkeypatch.setattr(cli, "run_sample", checked)
    with pytest.raises(SystemExit) as stop:
        cli.main(["sample", "--checkpoint", "g.pt", "--tokenizer", "t.pt", "--class", "0"])
    assert stop.value.code == 2 and "error: --n must be positive" in capsys.readouterr().err


def test_fqgan_raises_only_its_own_types_for_bad_input():
    """The CLI's rule: a user error is one of fqgan's own types (fqgan/runtime/errors.py). So no ``raise`` of a
    bare built-in ValueError, TypeError or FileNotFoundError anywhere in fqgan/: one would print a traceback."""
    import ast
    from pathlib import Path

    import fqgan

    found = []
    for path in sorted(Path(fqgan.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(exc, ast.Name) and exc.id in ("ValueError", "TypeError", "FileNotFoundError"):
                    found.append(f"{path.name}:{node.lineno} raise {exc.id}")
    assert not found, found
