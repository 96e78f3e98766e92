"""`dvc repro` of download → preprocess → validate in a temporary git repo, on synthetic data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture
def dvc_repo(tmp_path, monkeypatch):
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "flip", tmp_path / "flip", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["data"]["dataset"] = "synthetic"
    params["data"]["synthetic"]["rows"] = 3000
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def run(*args: str) -> str:
        done = subprocess.run(args, capture_output=True, text=True, env=env)
        assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "init")
    return run


def test_dvc_repro_runs_the_data_stages_and_then_nothing(dvc_repo):
    out = dvc_repo("dvc", "repro")
    for stage in ("download", "preprocess", "validate"):
        assert f"Running stage '{stage}'" in out
    meta = json.loads(Path("data/processed/synthetic/meta.json").read_text())
    assert meta["counts"] == {"total": 3000, "train": 2400, "valid": 300, "test": 300}
    metrics = json.loads(Path("reports/validation.json").read_text())
    assert metrics["success"]
    assert Path("reports/gx_docs/index.html").exists()
    # second run: everything is up to date
    again = dvc_repo("dvc", "repro")
    assert "Running stage" not in again
    # a params change re-runs exactly the stages that read it
    shown = dvc_repo("dvc", "metrics", "show")
    assert "validation.json" in shown
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["preprocess"]["min_count"] = 2
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = dvc_repo("dvc", "repro")
    assert "Running stage 'preprocess'" in third and "Running stage 'download'" not in third
