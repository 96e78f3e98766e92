"""Imports only run down: data and models → align → train → evaluate → deploy (then the CLI on top).

A module may import from its own layer or any layer below; the top-level modules (config, errors, io,
environment, metrics, runs, strategy_table, progress) are the floor, below every package, so they import
none of them. Function-level imports count too: a lazy import is still a dependency."""

from __future__ import annotations

import ast

from helpers import ROOT

LAYERS = {"data": 1, "models": 1, "align": 2, "train": 3, "evaluate": 4, "deploy": 5}
TOP = 9  # flip/cli.py: the shell over everything


def layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "flip":
        return None
    if len(parts) == 1:
        return 0
    return TOP if parts[1] == "cli" else LAYERS.get(parts[1], 0)


def upward_imports(module: str, source: str) -> list[str]:
    """The flip modules that ``source`` (the text of ``module``) imports from a layer above its own."""
    own = layer(module)
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        found += [n for n in names if (layer(n) or 0) > own]
    return found


def test_the_check_sees_an_upward_import():
    assert upward_imports("flip.train.loop", "def f():\n    from flip.evaluate.calibration import x\n") == [
        "flip.evaluate.calibration"]
    assert upward_imports("flip.runs", "import flip.deploy.gate") == ["flip.deploy.gate"]
    assert upward_imports("flip.deploy.gate", "from flip.evaluate.significance import paired_delta") == []


def test_no_module_imports_from_a_layer_above_it():
    bad = {}
    for path in sorted((ROOT / "flip").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        if up := upward_imports(module, path.read_text(encoding="utf-8")):
            bad[str(path.relative_to(ROOT))] = up
    assert not bad, f"imports that run up the layers {LAYERS}: {bad}"
