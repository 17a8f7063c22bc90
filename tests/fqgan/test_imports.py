"""The layering rule, checked over the source's AST: ``fqgan`` uses only ``fqgan_kernels``' public
names (``fqgan_kernels.__all__``), and ``fqgan_kernels`` never imports ``fqgan``."""

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
