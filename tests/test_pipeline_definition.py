"""One source of truth: Config() is params.yaml, and dvc.yaml's stages depend on the code they run.

* ``Config()`` (the typed defaults) equals ``params.yaml`` (the quick profile) key by key; the paper's
  profile (``profiles/paper.txt``) is a list of valid overrides of it.
* Every ``flip`` module a stage's command can import (its ``flip <command>`` function in
  ``flip/cli.py``, then every ``flip`` import of every module reached, function-level imports
  included) lies under one of the stage's ``deps``, so that ``dvc repro`` re-runs the stage when that
  code changes. The command-line shell and the typed config are left out: ``params`` carry the
  settings, and the shell only parses them.
* What identifies a run (:data:`flip.train.fingerprint.STAGE_SECTIONS`) is among the stage's ``params``.
"""

from __future__ import annotations

import ast
import dataclasses
import shlex

import pytest
import yaml
from helpers import ROOT

from flip.config import Config, load_config
from flip.train.fingerprint import STAGE_SECTIONS, flatten

# Modules every command loads that do not change what a stage computes (see the module docstring).
SHELL = {"flip/__init__.py", "flip/cli.py", "flip/config.py", "flip/errors.py", "flip/progress.py"}


def test_config_defaults_are_params_yaml():
    defaults = flatten(Config().to_dict())
    params = flatten(load_config(ROOT / "params.yaml").to_dict())
    differ = {k: (defaults.get(k), params.get(k)) for k in set(defaults) | set(params) if defaults.get(k) != params.get(k)}
    assert not differ, f"Config() vs params.yaml: {differ}"


@pytest.mark.parametrize("path", sorted((ROOT / "profiles").glob("*.txt")), ids=lambda p: p.stem)
def test_every_profile_is_valid_overrides(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    overrides = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert overrides, f"{path}: no overrides"
    cfg = load_config(ROOT / "params.yaml", overrides)
    assert dataclasses.asdict(cfg) != dataclasses.asdict(load_config(ROOT / "params.yaml"))


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


def _package_modules(package: str) -> list[str]:
    """Every module of the package ``package`` (its .py files, sub-packages included)."""
    base = ROOT.joinpath(*package.split("."))
    return [".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            for f in sorted(base.rglob("*.py"))] if base.is_dir() else []


def _dynamic_imports(node: ast.AST) -> list[str]:
    """Every module of package ``flip.x`` for a computed module name ``f"flip.x.{name}"`` (what
    ``importlib.import_module`` may load: the dataset sources)."""
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        prefix = str(node.values[0].value)
        if prefix.startswith("flip.") and prefix.endswith("."):
            return _package_modules(prefix.rstrip("."))
    return []


def _flip_imports(tree: ast.AST) -> set[str]:
    """Every ``flip`` module named by an import anywhere in ``tree`` (and the packages above it),
    dynamic imports by name included (:func:`_dynamic_imports`)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            candidates = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.JoinedStr):
            candidates = _dynamic_imports(node)
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
    """The scan follows imports inside functions (the CLI's own, the strategies' registry) and imports by
    a computed name (the dataset sources)."""
    files = imported_files("finetune")
    assert {"flip/train/finetune.py", "flip/metrics.py", "flip/data/tensors.py"} <= files
    assert "flip/train/pretrain.py" not in imported_files("drift")
    assert {"flip/data/sources/synthetic.py", "flip/data/sources/csv.py"} <= imported_files("preprocess")


def _covers(dep: str, path: str) -> bool:
    return path == dep or path.startswith(dep.rstrip("/") + "/")


@pytest.mark.parametrize("name,stage", STAGES, ids=[n for n, _ in STAGES])
def test_stage_code_deps_are_what_it_imports(name, stage):
    """No over-cover: a module file a stage depends on is one its command imports, and a folder it depends
    on holds only such modules, so that editing code a stage does not run never re-runs it."""
    files = imported_files(_command(stage)) - SHELL
    for dep in (d.rstrip("/") for d in stage.get("deps", []) if d.startswith("flip")):
        inside = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / dep).rglob("*.py")) \
            if (ROOT / dep).is_dir() else [dep]
        unused = [f for f in inside if f not in files]
        assert not unused, f"dvc.yaml stage {name} depends on {dep}, but its command never imports {unused}"


def code_readers(path: str) -> set[str]:
    """The stages of dvc.yaml with a dependency covering the repository file ``path``."""
    return {name for name, stage in STAGES if any(_covers(d, path) for d in stage.get("deps", []))}


def test_editing_a_module_reruns_only_the_stages_that_run_it():
    assert code_readers("flip/data/validate.py") == {"validate"}  # a Great Expectations check: not pretraining
    assert code_readers("flip/train/pretrain.py") == {"pretrain"}  # not the scratch baseline
    assert code_readers("flip/evaluate/report.py") == {"report"}
    assert "pretrain" not in code_readers("flip/data/preprocess.py")
    assert code_readers("flip/evaluate/drift.py") == {"drift", "evaluate"}


# ------------------------------------------------------------------------------------ params
def _overridden(stage: dict) -> list[str]:
    """The keys a stage's command fixes with ``-S key=value``."""
    words = shlex.split(stage["cmd"])
    return [words[i + 1].split("=", 1)[0] for i, w in enumerate(words[:-1]) if w in ("-S", "--set")]


def _params(stage: dict) -> list[str]:
    return [p if isinstance(p, str) else next(iter(p)) for p in stage.get("params", [])]


@pytest.mark.parametrize("name,stage", STAGES, ids=[n for n, _ in STAGES])
def test_stage_params_exist_and_leave_out_what_its_command_fixes(name, stage):
    """A declared param is a key of params.yaml; one the command fixes with -S is not declared (changing
    it in params.yaml would re-run the stage for nothing)."""
    known = flatten(Config().to_dict())
    for param in _params(stage):
        assert param in known or any(k.startswith(param + ".") for k in known), f"{name}: no param {param}"
    fixed = [(key, p) for key in _overridden(stage) for p in _params(stage) if _covers(p.replace(".", "/"),
                                                                                       key.replace(".", "/"))]
    assert not fixed, f"{name}: its command fixes {fixed[0][0]} with -S, yet dvc.yaml declares {fixed[0][1]}"


# finetune keys that a strategy without a language model never reads (flip.train.finetune, .strategies)
PLM_ONLY_KEYS = {"plm_lr", "plm_lr_grid", "plm_seeds", "plm_epochs", "plm_batch_size", "alpha_init",
                 "length_bucketing"}


@pytest.mark.parametrize("name,stage", [(n, s) for n, s in STAGES if _command(s) == "finetune"],
                         ids=[n for n, s in STAGES if _command(s) == "finetune"])
def test_finetuning_stages_declare_every_finetune_key_they_read(name, stage):
    """Declared (dotted) or fixed by -S: every finetune key, less the language-model ones for the
    strategies without a language model (a new key in flip/config.py must be placed here)."""
    from flip.strategy_table import get_strategy

    [strategy] = [k.split("=", 1)[1] for k in shlex.split(stage["cmd"]) if k.startswith("finetune.strategy=")]
    keys = {k for k in flatten(Config().to_dict()) if k.startswith("finetune.")}
    read = keys if get_strategy(strategy).uses_plm else keys - {f"finetune.{k}" for k in PLM_ONLY_KEYS}
    covered = {k for k in keys if any(_covers(p.replace(".", "/"), k.replace(".", "/"))
                                      for p in [*_params(stage), *_overridden(stage)])}
    assert read <= covered, f"{name}: dvc.yaml neither declares nor fixes {sorted(read - covered)}"


def test_evaluate_reads_the_drift_stages_verdict_under_the_same_settings():
    """One drift computation: evaluate depends on the drift stage's output (it reads drift.json), and
    both declare the settings of that computation."""
    by_name = dict(STAGES)
    assert "reports/drift" in by_name["drift"]["outs"] and "reports/drift" in by_name["evaluate"]["deps"]
    settings = {"retrain.drift_share", "retrain.target_drift", "evaluate.drift_rows"}
    for name in ("drift", "evaluate"):
        declared = _params(by_name[name])
        assert all(any(_covers(p.replace(".", "/"), k.replace(".", "/")) for p in declared) for k in settings), name
    assert not any(p.startswith("retrain.drift_policy") for p in _params(by_name["drift"]))  # the flow's policy


@pytest.mark.parametrize("name,stage", [(n, s) for n, s in STAGES if _command(s) in ("pretrain", "finetune")],
                         ids=[n for n, s in STAGES if _command(s) in ("pretrain", "finetune")])
def test_stage_params_cover_what_identifies_a_run(name, stage):
    """A section in the run's fingerprint that dvc.yaml does not list would change the run without DVC
    re-running the stage."""
    from flip.strategy_table import get_strategy

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
