"""The import direction of the design: meditron_jax <- sharding <- train | infer <- cli.

``meditron_jax`` knows nothing of meshes, ``sharding`` nothing of training or
inference, and ``train`` and ``infer`` never import each other. Only the top layer
(``cli/``: the command and ``plan``), ``bench/`` and ``demo/`` may reach everything, and
nothing below imports them. Inside ``meditron_jax``: kernels <- model <- io, the tokenizer
on its own, and no module imports another that imports it back (no circle). Imports are
read with ``ast`` (lazy imports inside functions count too), so nothing is executed.
"""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("meditron_jax", "sharding", "train", "infer", "serve", "cli", "bench", "demo")
# package -> our packages it must not import
FORBIDDEN = {
    "meditron_jax": {"sharding", "train", "infer", "serve", "cli", "bench", "demo"},
    "sharding": {"train", "infer", "serve", "cli", "bench", "demo"},
    "train": {"infer", "serve", "cli", "bench", "demo"},
    "infer": {"train", "serve", "cli", "bench", "demo"},
    "serve": {"train", "cli", "bench", "demo"},
    "cli": set(),
    "bench": {"demo"},
    "demo": {"bench"},
}
# meditron_jax's subpackages -> the subpackages they must not import
INSIDE = {
    "kernels": {"model", "io", "tokenizer"},
    "model": {"io", "tokenizer"},
    "tokenizer": {"kernels", "model", "io"},
}


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
              "importlib.import_module('cli.plan')\n"
              "from . import sibling\n")
    assert [n for n, _ in imported_packages(source)] == ["infer", "train", "sharding", "cli"]
    assert len(violations("meditron_jax", "meditron_jax/x.py", source)) == 4
    assert violations("train", "train/x.py", source) == [
        "train/x.py:1 imports infer (train must not import infer)",
        "train/x.py:5 imports cli (train must not import cli)"]
    assert violations("cli", "cli/x.py", source) == []


def _modules() -> dict[str, str]:
    """meditron_jax's modules by dotted name -> source."""
    out = {}
    for folder, _, names in os.walk(os.path.join(ROOT, "meditron_jax")):
        for name in names:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].replace(os.sep, ".")
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    out[rel.removesuffix(".__init__")] = f.read()
    return out


def _edges(name: str, source: str, modules) -> set[str]:
    """Our modules ``name`` imports: ``from X import y`` is X.y where that is a module
    (a package's parent runs first anyway), else X itself, whose names it reads."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
    return {m for m in found if m in modules and m != name}


def _circles(graph: dict[str, set[str]]) -> list[str]:
    """Modules that reach themselves through the import graph."""
    def reach(start):
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        return seen
    return sorted(m for m in graph if m in reach(m))


def test_meditron_jax_subpackages_layer_and_never_circle():
    modules = _modules()
    graph = {name: _edges(name, src, modules) for name, src in modules.items()}
    problems = [f"{name} imports {target}" for name, targets in graph.items()
                for target in targets
                if name.count(".") and target.count(".")
                and target.split(".")[1] in INSIDE.get(name.split(".")[1], ())]
    assert len(modules) > 25 and graph["meditron_jax.model.decoder"] >= {
        "meditron_jax.model.lora", "meditron_jax.kernels"}
    assert not problems, problems
    assert not _circles(graph), f"import circles through {_circles(graph)}"
    # the checker sees the circle this layout removed (lora reading param_specs through
    # the package whose forward imports lora)
    graph["meditron_jax.model.lora"].add("meditron_jax.model")
    assert "meditron_jax.model.lora" in _circles(graph)
