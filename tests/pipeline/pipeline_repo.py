"""Make a temporary git + DVC repository holding the project's dvc.yaml, params.yaml and code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from helpers import ROOT


def make_dvc_repo(path: Path, params_update) -> callable:
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, path / name)
    for folder in ("flip", "flows", "profiles"):
        shutil.copytree(ROOT / folder, path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (path / "benchmarks" / "results").mkdir(parents=True)  # the report stage reads the scaling study
    shutil.copy(ROOT / "benchmarks" / "results" / "pretrain_scaling.json", path / "benchmarks" / "results")
    params = yaml.safe_load((path / "params.yaml").read_text())
    params_update(params)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def run(*args: str) -> str:
        done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=path)
        assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "init")
    return run


def synthetic(params: dict) -> None:
    params["data"]["dataset"] = "synthetic"
    params["data"]["synthetic"]["rows"] = 3000


def tiny_profile(bert: Path):
    """Every stage on 3,000 synthetic rows with a tiny BERT: the ``pipeline`` preset (tests/helpers.py)
    laid over the repository's params.yaml."""
    from helpers import PRESETS, layer

    def update(p: dict) -> None:
        p.update(layer(p, PRESETS["pipeline"], {"plm": {"name": str(bert)}}))
    return update
