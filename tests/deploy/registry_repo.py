"""A small git + DVC project with the registry's shape: a training stage, a ``package`` foreach stage
whose output ``models/serve/flip_id`` is the ``flip_id`` artifact, DVC metrics kept in git, and the
project's .gitignore. Its stages are shell-free python one-liners, so a repro takes a second."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

DVC_YAML = """\
stages:
  train:
    cmd: python make.py train
    deps:
      - make.py
      - src.txt
    outs:
      - models/full/flip_id
  package:
    foreach:
      flip_id: models/full/flip_id
    do:
      cmd: python make.py package ${item} models/serve/${key}
      deps:
        - ${item}
        - make.py
      outs:
        - models/serve/${key}
      metrics:
        - reports/metrics.json:
            cache: false
artifacts:
  flip_id:
    path: models/serve/flip_id
    type: model
"""

MAKE_PY = """\
import json, pathlib, sys
if sys.argv[1] == "train":
    out = pathlib.Path("models/full/flip_id"); out.mkdir(parents=True, exist_ok=True)
    (out / "weights.txt").write_text(pathlib.Path("src.txt").read_text() * 3)
else:
    src, out = pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
    (out / "plm").mkdir(parents=True, exist_ok=True)
    (out / "model.safetensors").write_text((src / "weights.txt").read_text())
    (out / "plm" / "config.json").write_text("{}")
    (out / "model.json").write_text(json.dumps({"train_time_range": [0, 10]}))
    pathlib.Path("reports").mkdir(exist_ok=True)
    pathlib.Path("reports/metrics.json").write_text(json.dumps({"auc": len(src.read_text() if src.is_file() else "x")}))
"""

ENV = {"DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
       "GIT_COMMITTER_EMAIL": "t@t"}


def env() -> dict[str, str]:
    return {**os.environ, **ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def runner(path: Path):
    def run(*args: str, check: bool = True) -> str:
        done = subprocess.run(args, capture_output=True, text=True, env=env(), cwd=path)
        if check:
            assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr
    return run


def make_registry_repo(path: Path, content: str = "weights v1\n"):
    """The project, committed, with ``dvc repro`` run (dvc.lock not committed yet); returns ``run``."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "dvc.yaml").write_text(DVC_YAML)
    (path / "make.py").write_text(MAKE_PY)
    (path / "src.txt").write_text(content)
    (path / "params.yaml").write_text("retrain:\n  stage: prod\n")
    shutil.copy(ROOT / ".gitignore", path / ".gitignore")
    run = runner(path)
    run("git", "init", "-q")
    run("dvc", "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "init")
    run("dvc", "repro", "-q")
    return run


def write_passing_decision(path: Path, artifact: str = "flip_id") -> dict:
    """The gate's decision file (its format: reports/gate/<artifact>.json) for the bundle as it is now."""
    from flip.deploy.registry import dir_md5

    decision = {"artifact": artifact, "challenger": {"path": f"models/serve/{artifact}",
                                                     "md5": dir_md5(path / "models" / "serve" / artifact),
                                                     "auc": 0.7, "logloss": 0.5},
                "champion": None, "delta": None, "promote": True, "reasons": ["no champion yet"]}
    out = path / "reports" / "gate" / f"{artifact}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(decision))
    return decision
