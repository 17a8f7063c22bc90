"""The layering rules, checked over the source's AST: ``fqgan`` uses only ``fqgan_kernels``' public
names (``fqgan_kernels.__all__``), ``fqgan_kernels`` never imports ``fqgan``, and inside ``fqgan`` every import
goes down its floors (runtime -> data -> tokenizer, generator -> train, eval -> demo -> cli; docs/design.md)."""

import ast
from pathlib import Path

import fqgan_kernels

ROOT = Path(__file__).resolve().parents[2]
PUBLIC = set(fqgan_kernels.__all__) | {"__version__"}


def _sources(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources under {ROOT / package}"
    return [(f, ast.parse(f.read_text(), filename=str(f))) for f in files]


def _is_fqgan(module):
    return module == "fqgan" or module.startswith("fqgan.")


def _is_kernels(module):
    return module == "fqgan_kernels" or module.startswith("fqgan_kernels.")


def fqgan_violations(tree, where):
    """Uses of fqgan_kernels beyond its public names in one module of fqgan."""
    bad, aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "fqgan_kernels":
                    aliases.add(a.asname or a.name)
                elif _is_kernels(a.name):
                    bad.append(f"{where}:{node.lineno}: import {a.name} (a private module)")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _is_kernels(node.module):
            if node.module != "fqgan_kernels":
                bad.append(f"{where}:{node.lineno}: from {node.module} import ... (a private module)")
            else:
                bad += [f"{where}:{node.lineno}: from fqgan_kernels import {a.name} (not in __all__)"
                        for a in node.names if a.name not in PUBLIC]
        elif isinstance(node, ast.Call) and _import_module_target(node) and _is_kernels(_import_module_target(node)):
            if _import_module_target(node) != "fqgan_kernels":
                bad.append(f"{where}:{node.lineno}: import_module({_import_module_target(node)!r})")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if node.attr not in PUBLIC:
                bad.append(f"{where}:{node.lineno}: {node.value.id}.{node.attr} (not in fqgan_kernels.__all__)")
    return bad


def _import_module_target(node):
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
        return str(node.args[0].value)
    return None


def kernels_violations(tree, where):
    """Imports of fqgan in one module of fqgan_kernels."""
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad += [f"{where}:{node.lineno}: import {a.name}" for a in node.names if _is_fqgan(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _is_fqgan(node.module):
            bad.append(f"{where}:{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call) and _import_module_target(node) and _is_fqgan(_import_module_target(node)):
            bad.append(f"{where}:{node.lineno}: import_module({_import_module_target(node)!r})")
    return bad


def test_fqgan_uses_only_public_kernel_names():
    bad = [v for f, tree in _sources("fqgan") for v in fqgan_violations(tree, f.relative_to(ROOT))]
    assert not bad, "\n".join(bad)


def test_fqgan_kernels_never_imports_fqgan():
    bad = [v for f, tree in _sources("fqgan_kernels") for v in kernels_violations(tree, f.relative_to(ROOT))]
    assert not bad, "\n".join(bad)


def test_the_checks_catch_violations():
    src = ("import fqgan_kernels as fk\nfrom fqgan_kernels.quantizer import code_counts\n"
           "from fqgan_kernels import _validate, sample\nimport fqgan_kernels._ext\nx = fk._backend\n"
           "y = fk.sample\nimportlib.import_module('fqgan_kernels.reference')\n")
    found = fqgan_violations(ast.parse(src), "m.py")
    assert len(found) == 5 and not any("fk.sample" in v for v in found), found
    src = ("import fqgan.data\nfrom fqgan import cli\nfrom . import reference\nimport fqgan_kernels\n"
           "__import__('fqgan')\n")
    assert len(kernels_violations(ast.parse(src), "k.py")) == 3


# -- the floors of fqgan -----------------------------------------------------------------------------
# Bottom to top. A module imports fqgan modules of lower floors, or of its own package; never a floor
# above, nor another package of its floor. runtime knows no model; the models use runtime only for file
# I/O (their loaders), error types, option fields and the torchvision import.
FLOORS = {"fqgan.runtime": 1, "fqgan.data": 2, "fqgan.tokenizer": 3, "fqgan.generator": 3, "fqgan.train": 4,
          "fqgan.eval": 4, "fqgan.demo": 5, "fqgan.cli": 6, "fqgan.__main__": 7, "fqgan": 7}
MODEL_RUNTIME = {"fqgan.runtime.checkpoint", "fqgan.runtime.errors", "fqgan.runtime.options", "fqgan.runtime.vision"}


def _package(module):
    """The floor key of a module name: its fqgan subpackage or top-level module."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else "fqgan"


def _module_name(path):
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _fqgan_imports(tree, module, is_package=False):
    """(line, imported fqgan module) of every import in ``tree`` (relative ones resolved from ``module``)."""
    package = module if is_package else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if _is_fqgan(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if _is_fqgan(target):
                out.append((node.lineno, target))
    return out


def floor_violations(tree, module, where, is_package=False):
    """Imports of ``module`` that go up a floor or sideways to another package of its floor."""
    own = _package(module)
    bad = []
    for line, target in _fqgan_imports(tree, module, is_package):
        theirs = _package(target)
        if theirs == own:
            continue
        if FLOORS[theirs] >= FLOORS[own]:
            bad.append(f"{where}:{line}: {module} (floor {FLOORS[own]}) imports {target} (floor {FLOORS[theirs]})")
        elif FLOORS[own] == 3 and theirs == "fqgan.runtime" and target not in MODEL_RUNTIME:
            bad.append(f"{where}:{line}: model module {module} imports {target} (models use only "
                       f"{sorted(MODEL_RUNTIME)})")
    return bad


def test_every_fqgan_module_has_a_floor():
    unknown = {_package(_module_name(f)) for f, _ in _sources("fqgan")} - set(FLOORS)
    assert not unknown, f"modules without a floor (add them to FLOORS and docs/design.md): {sorted(unknown)}"


def test_fqgan_imports_go_down_the_floors():
    bad = [v for f, tree in _sources("fqgan")
           for v in floor_violations(tree, _module_name(f), f.relative_to(ROOT), f.name == "__init__.py")]
    assert not bad, "\n".join(bad)


def test_the_floor_check_catches_violations():
    up = ast.parse("from fqgan.train.loop import fit\nfrom . import config\n")
    assert len(floor_violations(up, "fqgan.runtime.dist", "d.py")) == 1  # runtime -> train; own package is fine
    sideways = ast.parse("from fqgan.generator import FAR\nimport fqgan.runtime.checkpoint\n")
    assert len(floor_violations(sideways, "fqgan.tokenizer.model", "m.py")) == 1
    loop = ast.parse("from fqgan.runtime.parallel import shard\nfrom ..runtime.dist import DistInfo\n")
    assert len(floor_violations(loop, "fqgan.tokenizer.load", "l.py")) == 2  # models: file I/O only
    assert floor_violations(ast.parse("from fqgan.train.loop import fit\nfrom fqgan.demo import run_demo\n"),
                            "fqgan.cli", "c.py") == []
