"""One source of truth: Config() is params.yaml, and dvc.yaml's stages depend on the code they run.

* ``Config()`` (the typed defaults) equals ``params.yaml`` (the quick profile) key by key; the paper's
  profile (``profiles/paper.txt``) is a list of valid overrides of it.
* Every ``flip`` module a stage's command can import (its ``flip <command>`` function in
  ``flip/cli.py``, then every ``flip`` import of every module reached, function-level imports
  included) lies under one of the stage's ``deps``, so that ``dvc repro`` re-runs the stage when that
  code changes. The command-line shell and the typed config are left out: ``params`` carry the
  settings, and the shell only parses them.
* What identifies a run (:data:`flip.train.identity.STAGE_SECTIONS`) is among the stage's ``params``.
"""

from __future__ import annotations

import ast
import dataclasses
import shlex

import pytest
import yaml
from helpers import ROOT

from flip.config import Config, load_config
from flip.train.identity import STAGE_SECTIONS, flatten

# Modules every command loads that do not change what a stage computes (see the module docstring).
SHELL = {"flip/__init__.py", "flip/cli.py", "flip/config.py", "flip/errors.py", "flip/progress.py"}


def test_config_defaults_are_params_yaml():
    defaults = flatten(Config().to_dict())
    params = flatten(load_config(ROOT / "params.yaml").to_dict())
    differ = {k: (defaults.get(k), params.get(k)) for k in set(defaults) | set(params) if defaults.get(k) != params.get(k)}
    assert not differ, f"Config() vs params.yaml: {differ}"


def test_paper_profile_is_valid_overrides():
    lines = (ROOT / "profiles" / "paper.txt").read_text(encoding="utf-8").splitlines()
    overrides = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    cfg = load_config(ROOT / "params.yaml", overrides)
    assert cfg.pretrain.epochs == 30 and cfg.finetune.train_rows == 0
    assert dataclasses.asdict(cfg) != dataclasses.asdict(Config())


# ------------------------------------------------------------------------------------ dvc.yaml
def _module_file(name: str):
    """The file of module ``name`` under ROOT (a package's __init__.py), or None."""
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _flip_imports(tree: ast.AST) -> set[str]:
    """Every ``flip`` module named by an import anywhere in ``tree`` (and the packages above it)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            candidates = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        for name in candidates:
            if name.split(".")[0] != "flip":
                continue
            parts = name.split(".")
            names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {n for n in names if _module_file(n) is not None}


def imported_files(command: str) -> set[str]:
    """Repository paths of the flip modules that ``flip <command>`` can import."""
    cli = ast.parse((ROOT / "flip" / "cli.py").read_text(encoding="utf-8"))
    [fn] = [n for n in cli.body if isinstance(n, ast.FunctionDef) and n.name == command]
    todo, seen = list(_flip_imports(fn)), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_flip_imports(ast.parse(_module_file(name).read_text(encoding="utf-8"))))
    return {_module_file(n).relative_to(ROOT).as_posix() for n in seen}


def stages() -> list[tuple[str, dict]]:
    """(name, stage) of dvc.yaml, ``foreach`` expanded (``${item}``/``${key}`` substituted)."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    out = []
    for name, stage in spec.items():
        if "foreach" not in stage:
            out.append((name, stage))
            continue
        items = stage["foreach"]
        pairs = items.items() if isinstance(items, dict) else ((i, i) for i in items)
        for key, item in pairs:
            text = yaml.safe_dump(stage["do"]).replace("${item}", str(item)).replace("${key}", str(key))
            out.append((f"{name}@{key}", yaml.safe_load(text)))
    return out


STAGES = stages()


def _command(stage: dict) -> str:
    words = shlex.split(stage["cmd"])
    assert words[0] == "flip", stage["cmd"]
    return words[1]


@pytest.mark.parametrize("name,stage", STAGES, ids=[n for n, _ in STAGES])
def test_stage_deps_cover_the_code_it_imports(name, stage):
    deps = [d.rstrip("/") for d in stage.get("deps", []) if d.startswith("flip")]
    files = imported_files(_command(stage)) - SHELL
    assert files, f"{name}: no flip module found for {stage['cmd']!r}"
    uncovered = sorted(f for f in files if not any(f == d or f.startswith(d + "/") for d in deps))
    assert not uncovered, f"dvc.yaml stage {name} imports {uncovered} but does not depend on them"


def test_dependency_scan_finds_lazy_imports():
    """The scan follows imports inside functions (the CLI's own, the strategies' registry)."""
    files = imported_files("finetune")
    assert {"flip/train/finetune.py", "flip/evaluate/metrics.py", "flip/data/tensors.py"} <= files
    assert "flip/train/pretrain.py" not in imported_files("drift")


@pytest.mark.parametrize("name,stage", [(n, s) for n, s in STAGES if _command(s) in ("pretrain", "finetune")],
                         ids=[n for n, s in STAGES if _command(s) in ("pretrain", "finetune")])
def test_stage_params_cover_what_identifies_a_run(name, stage):
    """A section in the run's fingerprint that dvc.yaml does not list would change the run without DVC
    re-running the stage."""
    from flip.strategies import get_strategy

    if _command(stage) == "pretrain":
        sections = STAGE_SECTIONS["pretrain"]
    else:
        [strategy] = [w.split("=", 1)[1] for w in shlex.split(stage["cmd"]) if w.startswith("finetune.strategy=")]
        sections = STAGE_SECTIONS["finetune_plm" if get_strategy(strategy).uses_plm else "finetune"]
    listed = {p.split(".")[0] if isinstance(p, str) else next(iter(p)) for p in stage.get("params", [])}
    assert set(sections) <= listed, f"{name}: params {sorted(listed)} lack {sorted(set(sections) - listed)}"


# ------------------------------------------------------------------------------------ imports
def _direct_imports(path) -> set[str]:
    """The flip modules a file names in its imports, anywhere in it (``from X import m``: X.m when m is a
    module, else X)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                names.add(full if _module_file(full) is not None else node.module)
    return {n for n in names if n.split(".")[0] == "flip" and _module_file(n) is not None}


def test_no_module_imports_a_module_that_imports_it_back():
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (ROOT / "flip").rglob("*.py")}
    graph = {name: _direct_imports(path) for name, path in modules.items()}
    mutual = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps
                     if a in graph.get(b, ()) and a != b})
    assert not mutual, f"modules that import each other: {mutual}"
