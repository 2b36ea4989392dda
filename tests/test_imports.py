"""The import direction of the design: meditron_jax <- sharding <- train | infer.

``meditron_jax`` knows nothing of meshes, ``sharding`` nothing of training or
inference, and ``train`` and ``infer`` never import each other. Only the entry points
above the layers (``meditron_jax/cli.py``, ``meditron_jax/__main__.py``), ``bench/``
and ``demo/`` may reach everything, and nothing below imports them. Imports are read with ``ast`` (lazy imports inside functions
count too), so nothing is executed.
"""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("meditron_jax", "sharding", "train", "infer", "bench", "demo")
# package -> our packages it must not import
FORBIDDEN = {
    "meditron_jax": {"sharding", "train", "infer", "bench", "demo"},
    "sharding": {"train", "infer", "bench", "demo"},
    "train": {"infer", "bench", "demo"},
    "infer": {"train", "bench", "demo"},
    "bench": {"demo"},
    "demo": {"bench"},
}
ENTRY_POINTS = {os.path.join("meditron_jax", "cli.py"), os.path.join("meditron_jax", "__main__.py")}


def imported_packages(source: str) -> list[tuple[str, int]]:
    """Top-level package names imported anywhere in ``source``, with line numbers."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node.lineno))
        elif isinstance(node, ast.Call) and _is_import_module(node) and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            found.append((node.args[0].value.split(".")[0], node.lineno))
    return found


def _is_import_module(call: ast.Call) -> bool:
    f = call.func
    return (isinstance(f, ast.Attribute) and f.attr == "import_module") or \
        (isinstance(f, ast.Name) and f.id in ("import_module", "__import__"))


def violations(package: str, relpath: str, source: str) -> list[str]:
    if relpath in ENTRY_POINTS:
        return []
    return [f"{relpath}:{line} imports {name} ({package} must not import {name})"
            for name, line in imported_packages(source) if name in FORBIDDEN[package]]


def test_import_direction():
    problems, files = [], 0
    for package in PACKAGES:
        for folder, _, names in os.walk(os.path.join(ROOT, package)):
            for name in sorted(n for n in names if n.endswith(".py")):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    problems += violations(package, os.path.relpath(path, ROOT), f.read())
                files += 1
    assert files > 20
    assert not problems, "\n".join(problems)


def test_checker_catches_each_kind_of_import():
    source = ("import infer.engine\n"
              "from train.step import x\n"
              "def f():\n    from sharding import make_mesh\n"
              "importlib.import_module('bench.plan')\n"
              "from . import sibling\n")
    assert [n for n, _ in imported_packages(source)] == ["infer", "train", "sharding", "bench"]
    assert len(violations("meditron_jax", "meditron_jax/x.py", source)) == 4
    assert violations("train", "train/x.py", source) == [
        "train/x.py:1 imports infer (train must not import infer)",
        "train/x.py:5 imports bench (train must not import bench)"]
    assert violations("meditron_jax", os.path.join("meditron_jax", "cli.py"), source) == []
