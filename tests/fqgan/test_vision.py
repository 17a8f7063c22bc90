"""fqgan.runtime.vision.import_torchvision: torchvision's Python parts work here (transforms, make_grid,
vgg16, datasets.folder), also where its C++ extension cannot load (the CUDA torchvision 0.28 wheel beside
the CPU torch 2.13 wheel); a missing torchvision says how to install it."""

import importlib
import subprocess
import sys
import textwrap

import pytest
import torch

from fqgan.runtime import vision
from fqgan.runtime.vision import import_torchvision


def test_import_returns_torchvision_and_is_idempotent():
    tv = import_torchvision()
    assert tv.__name__ == "torchvision"
    assert import_torchvision() is tv is sys.modules["torchvision"]
    import torchvision  # a plain import after the door sees the same module

    assert torchvision is tv


def test_transforms_ten_crop():
    tv = import_torchvision()
    image = torch.arange(3 * 9 * 11, dtype=torch.float32).view(3, 9, 11)
    crops = tv.transforms.TenCrop(5)(image)
    assert len(crops) == 10 and all(c.shape == (3, 5, 5) for c in crops)
    torch.testing.assert_close(crops[0], image[:, :5, :5])  # top-left
    torch.testing.assert_close(crops[5], crops[1].flip(-1))  # top-left of the mirrored image


def test_make_grid_layout():
    tv = import_torchvision()
    images = torch.rand(5, 3, 4, 6)
    grid = tv.utils.make_grid(images, nrow=3, padding=2, pad_value=0.25)
    assert grid.shape == (3, 2 + 2 * (4 + 2), 2 + 3 * (6 + 2))
    torch.testing.assert_close(grid[:, 2 + 6:2 + 6 + 4, 2 + 8:2 + 8 + 6], images[4])
    assert (grid[:, :2] == 0.25).all()


def test_vgg16_builds_and_runs():
    tv = import_torchvision()
    with torch.device("meta"):  # layout only: the classifier alone is 124M parameters
        model = tv.models.vgg16()
    assert sum(p.numel() for p in model.parameters()) == 138_357_544  # torchvision's model table
    trunk = model.features[:5].to_empty(device="cpu")
    for m in trunk:
        if isinstance(m, torch.nn.Conv2d):
            m.reset_parameters()
    assert trunk(torch.randn(1, 3, 8, 8)).shape == (1, 64, 4, 4)


def test_missing_schemas_only_when_the_extension_is_missing():
    """Where torchvision's C++ ops loaded, nothing was defined; where they did not, exactly nms and qnms
    were (kept alive by the module), and the C++ ops raise torchvision's own error when called."""
    tv = import_torchvision()
    if tv.extension._has_ops():
        assert vision._SCHEMA_LIBRARY is None
        return
    assert vision._SCHEMA_LIBRARY is not None
    assert all(vision._has_schema(name) for name in ("nms", "qnms"))
    with pytest.raises(RuntimeError, match="Couldn't load custom C"):
        tv.ops.nms(torch.rand(3, 4), torch.rand(3), 0.5)


def test_first_import_in_a_fresh_process():
    """A plain ``import torchvision`` fails here only with the missing-operator error the door handles;
    through the door the import succeeds and transforms work (a new process: nothing imported yet)."""
    code = textwrap.dedent("""
        import importlib, torch
        try:
            import torchvision
            print("plain: ok")
        except RuntimeError as e:
            print("plain:", e)
        from fqgan.runtime.vision import import_torchvision
        tv = import_torchvision()
        print("door:", type(tv.transforms.TenCrop(2)).__name__)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    plain, door = out.stdout.strip().splitlines()[-2:]
    assert plain in ("plain: ok", "plain: operator torchvision::nms does not exist"), plain
    assert door == "door: TenCrop"


def test_missing_torchvision_says_how_to_install(monkeypatch):
    real = importlib.import_module

    def no_torchvision(name, *args, **kwargs):
        if name == "torchvision":
            raise ModuleNotFoundError("No module named 'torchvision'", name="torchvision")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(vision.importlib, "import_module", no_torchvision)
    monkeypatch.delitem(sys.modules, "torchvision")
    with pytest.raises(ModuleNotFoundError, match=r"fqgan-kernels\[model\]") as err:
        import_torchvision()
    assert err.value.name == "torchvision"


def test_other_import_errors_are_not_swallowed(monkeypatch):
    real = importlib.import_module

    def broken(name, *args, **kwargs):
        if name == "torchvision":
            raise RuntimeError("operator torchvision::roi_align does not exist")  # not one we may define
        return real(name, *args, **kwargs)

    monkeypatch.setattr(vision.importlib, "import_module", broken)
    monkeypatch.delitem(sys.modules, "torchvision")
    with pytest.raises(RuntimeError, match="roi_align"):
        import_torchvision()


def test_fqgan_imports_torchvision_only_through_the_door():
    """No module of fqgan imports torchvision itself (nor lpips, which imports it, outside the LPIPS
    module that opens the door first): a plain import fails beside the CPU torch."""
    import ast
    from pathlib import Path

    root = Path(vision.__file__).resolve().parents[1]
    allowed = {"torchvision": {"runtime/vision.py"}, "lpips": {"tokenizer/lpips.py"}}
    bad = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                     else [])
            for name in names:
                top = name.split(".")[0]
                if top in allowed and rel not in allowed[top]:
                    bad.append(f"fqgan/{rel}:{node.lineno}: import {name}")
    assert not bad, "\n".join(bad)
