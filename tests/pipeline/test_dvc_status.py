"""`dvc status` after editing code: only the stages that run that code are out of date.

A temporary DVC repository runs the data stages for real (`dvc repro validate`); the later stages'
outputs are placeholders recorded with `dvc commit`, so that every stage starts up to date without
training anything (what `dvc status` compares is dvc.lock against the dependencies, not how the
outputs were made). Then a comment is appended to a module and `dvc status --json` names the stages.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _placeholders(root: Path) -> None:
    """Every declared output that does not exist yet: a small file (or a folder holding one)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        outs = [Path(out.fs_path) for stage in repo.index.stages for out in stage.outs]
    for out in outs:
        if out.exists():
            continue
        if out.suffix in (".json", ".html", ".md"):
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("{}\n")
        else:
            out.mkdir(parents=True)
            (out / "placeholder.txt").write_text(f"stands for {out.name}\n")


def _stale(dvc_repo) -> set[str]:
    return set(json.loads(dvc_repo("dvc", "status", "--json").strip() or "{}"))


def _append_comment(path: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n# an edit that changes no behaviour\n")


def test_editing_a_module_outdates_only_the_stages_that_run_it(dvc_repo):
    out = dvc_repo("dvc", "repro", "validate")
    assert "Running stage 'validate'" in out
    _placeholders(Path.cwd())
    dvc_repo("dvc", "commit", "--force")
    assert _stale(dvc_repo) == set()  # the whole pipeline is up to date

    _append_comment("flip/data/validate.py")  # a Great Expectations check
    assert _stale(dvc_repo) == {"validate"}  # not pretraining, finetuning, drift or evaluate
    _append_comment("flip/train/pretrain.py")
    assert _stale(dvc_repo) == {"validate", "pretrain"}  # not the scratch baseline
