"""The registry: a promotion registers exactly the gated bundle or nothing, commits only the pipeline's
files, survives a kill -9 at every step (the next run completes or rolls back), clears a stale
index.lock but never a live one, pushes where remotes exist, and a broken registry is never read as
"no champion". Each test builds a small real git + DVC + GTO project (tests/deploy/registry_repo.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
sys.path.insert(0, str(Path(__file__).parent))
from registry_repo import ENV, env, make_registry_repo, runner, write_passing_decision  # noqa: E402

from flip.deploy.registry import (dir_md5, in_stage, journal_path, lock_hash, promote, recover,  # noqa: E402
                                  clear_stale_index_lock)
from flip.errors import FlipError  # noqa: E402

BUNDLE = "models/serve/flip_id"


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """The project made once (git init, dvc init, dvc repro); each test gets a copy."""
    path = tmp_path_factory.mktemp("registry") / "proj"
    make_registry_repo(path)
    return path


@pytest.fixture
def repo(template, tmp_path, monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    path = tmp_path / "proj"
    shutil.copytree(template, path, symlinks=True)
    shutil.rmtree(path / ".dvc" / "tmp", ignore_errors=True)  # DVC's state (inode -> hash) of the template
    write_passing_decision(path)
    return path, runner(path)


def tags(run) -> set[str]:
    return set(run("git", "tag").split())


def assert_consistent(path: Path, run, versions: list[str]) -> None:
    """The registry holds exactly ``versions``, each on a commit whose dvc.lock records the bundle the
    gate passed; prod is the last; no journal and no index.lock are left behind."""
    assert sorted(t for t in tags(run) if "@" in t) == [f"flip_id@{v}" for v in versions]
    for v in versions:
        commit = run("git", "rev-parse", f"flip_id@{v}^{{commit}}").strip()
        assert lock_hash(path, BUNDLE, rev=commit) is not None
    last = run("git", "rev-parse", f"flip_id@{versions[-1]}^{{commit}}").strip()
    gated = json.loads((path / "reports/gate/flip_id.json").read_text())["challenger"]["md5"]
    assert lock_hash(path, BUNDLE, rev=last) == gated == dir_md5(path / BUNDLE)
    assert in_stage(path, "flip_id", "prod") == {"version": versions[-1], "commit": last}
    assert not journal_path(path, "flip_id").exists()
    assert not (path / ".git" / "index.lock").exists()
    shown = run(str(Path(sys.executable).parent / "gto"), "show", "flip_id")
    assert versions[-1] in shown and "prod" in shown


@pytest.mark.slow
def test_dir_md5_is_the_hash_dvc_records(repo):
    path, _ = repo
    for out in (BUNDLE, "models/full/flip_id"):
        assert dir_md5(path / out) == lock_hash(path, out)
    (path / BUNDLE / "plm" / "config.json").write_text('{"x": 1}')
    assert dir_md5(path / BUNDLE) != lock_hash(path, BUNDLE)


@pytest.mark.slow
def test_promotion_commits_only_the_pipeline_files_and_registers_the_gated_bundle(repo):
    path, run = repo
    (path / ".gitignore").write_text((path / ".gitignore").read_text() + "/scratch/\n")
    run("git", "add", ".gitignore")  # the user's own staged change
    lines: list[str] = []
    done = promote(path, "flip_id", "prod", message="retrain: test", log=lines.append)
    assert done["version"] == "v0.0.1" and done["bundle_md5"] == lock_hash(path, BUNDLE, rev="HEAD")
    assert run("git", "show", "--name-only", "--format=", "HEAD").split() == ["dvc.lock", "reports/metrics.json"]
    assert run("git", "diff", "--cached", "--name-only").split() == [".gitignore"]  # still staged, not committed
    assert done["pushed"] is False and "no DVC remote" in done["warning"] and "no git remote" in done["warning"]
    assert any("registered flip_id v0.0.1" in line for line in lines)
    assert_consistent(path, run, ["v0.0.1"])

    # a new bundle: a second version on a new commit, prod moves to it
    (path / "src.txt").write_text("weights v2\n")
    run("git", "commit", "-qam", "new weights")
    run("dvc", "repro", "-q")
    write_passing_decision(path)
    assert promote(path, "flip_id", "prod", log=lines.append)["version"] == "v0.0.2"
    assert_consistent(path, run, ["v0.0.1", "v0.0.2"])


@pytest.mark.slow
def test_refusals_leave_no_commit_and_no_tag(repo):
    path, run = repo
    head = run("git", "rev-parse", "HEAD")

    def refused(match: str, **kw) -> None:
        with pytest.raises(FlipError, match=match):
            promote(path, "flip_id", "prod", log=lambda _: None, **kw)
        assert run("git", "rev-parse", "HEAD") == head and not tags(run)
        assert not journal_path(path, "flip_id").exists()

    # the bundle changed after the gate scored it
    weights = path / BUNDLE / "model.safetensors"
    original = weights.read_text()
    weights.write_text("tampered")
    refused("changed after the gate scored it")
    # ... and gated again in that state: dvc.lock does not record what the gate scored
    write_passing_decision(path)
    refused("dvc.lock records")
    weights.write_text(original)
    write_passing_decision(path)
    # an upstream stage's dependency changed without `dvc repro`: the lineage is not what dvc.lock says
    (path / "src.txt").write_text("edited, not reproduced\n")
    refused(r"`dvc status` shows the lineage .*\(train: changed deps\)")
    run("git", "checkout", "src.txt")
    # tracked code that differs from HEAD (params.yaml is no dependency here: only git sees it)
    (path / "params.yaml").write_text("retrain:\n  stage: staging\n")
    refused("commit or stash your changes")
    run("git", "checkout", "params.yaml")
    # the gate refused
    decision = json.loads((path / "reports/gate/flip_id.json").read_text())
    (path / "reports/gate/flip_id.json").write_text(json.dumps({**decision, "promote": False, "reasons": ["AUC low"]}))
    refused("the gate refused flip_id.*AUC low")
    write_passing_decision(path)
    # retrain.commit: false and HEAD's dvc.lock does not record the gated bundle
    refused("retrain.commit is false", commit=False)


@pytest.mark.slow
def test_commit_false_registers_the_commit_the_user_made(repo):
    path, run = repo
    run("git", "add", "dvc.lock", "reports/metrics.json")
    run("git", "commit", "-qm", "the user commits the pipeline's files")
    head = run("git", "rev-parse", "HEAD").strip()
    done = promote(path, "flip_id", "prod", commit=False, log=lambda _: None)
    assert done["commit"] == head and run("git", "rev-parse", "HEAD").strip() == head
    assert_consistent(path, run, ["v0.0.1"])


def _promote_in_subprocess(path: Path, crash_at: str) -> subprocess.CompletedProcess:
    code = ("from pathlib import Path; from flip.deploy.registry import promote; "
            "promote(Path('.'), 'flip_id', 'prod', message='retrain: crash test')")
    return subprocess.run([sys.executable, "-c", code], cwd=path, capture_output=True, text=True,
                          env={**env(), "FLIP_CRASH_AT": crash_at})


@pytest.mark.slow
@pytest.mark.parametrize("point,step,action", [
    ("promote:before-commit", "commit", "rolled back"),
    ("promote:after-commit", "commit", "completed"),
    ("promote:after-register", "register", "completed"),
    ("promote:after-assign", "assign", "completed"),
    ("promote:after-push", "push", "completed"),
])
def test_a_kill_at_each_step_is_completed_or_rolled_back_by_the_next_run(repo, point, step, action):
    path, run = repo
    crashed = _promote_in_subprocess(path, point)
    assert crashed.returncode == -9, crashed.stderr  # SIGKILL: no cleanup ran
    j = json.loads(journal_path(path, "flip_id").read_text())
    assert j["step"] == step and j["bundle_md5"] == lock_hash(path, BUNDLE)
    if point == "promote:before-commit":  # a git killed mid-commit also leaves its index.lock
        lock = path / ".git" / "index.lock"
        lock.write_text("")
        os.utime(lock, (time.time() - 60, time.time() - 60))
    lines: list[str] = []
    found = recover(path, log=lines.append)
    assert [(r["step"], r["action"]) for r in found] == [(step, action)], lines
    if action == "completed":
        assert found[0]["version"] == "v0.0.1"
        assert_consistent(path, run, ["v0.0.1"])
    else:
        assert not tags(run) and not journal_path(path, "flip_id").exists()
        assert any("removed a stale" in line for line in lines)
    # the next run gates again and promotes: the same bundle, one version, one promotion commit
    assert promote(path, "flip_id", "prod", log=lines.append)["version"] == "v0.0.1"
    assert_consistent(path, run, ["v0.0.1"])
    assert len(run("git", "log", "--format=%H").split()) == 2  # init + the promotion


@pytest.mark.slow
def test_a_commit_whose_gate_decision_is_gone_is_never_tagged(repo):
    path, run = repo
    assert _promote_in_subprocess(path, "promote:after-commit").returncode == -9
    committed = run("git", "rev-parse", "HEAD").strip()
    decision = json.loads((path / "reports/gate/flip_id.json").read_text())
    (path / "reports/gate/flip_id.json").write_text(json.dumps({**decision, "promote": False, "reasons": ["later"]}))
    found = recover(path, log=lambda _: None)
    assert [r["action"] for r in found] == ["left untagged"] and found[0]["commit"] == committed
    assert not tags(run) and not journal_path(path, "flip_id").exists()
    assert lock_hash(path, BUNDLE, rev="HEAD") == decision["challenger"]["md5"]  # the commit stays


@pytest.mark.slow
def test_a_live_git_keeps_its_index_lock(repo, tmp_path):
    path, _ = repo
    lock = path / ".git" / "index.lock"
    lock.write_text("")
    os.utime(lock, (time.time() - 600, time.time() - 600))
    fake = tmp_path / "bin" / "git"  # a process named git working in the repository
    fake.parent.mkdir()
    shutil.copy(shutil.which("sleep"), fake)
    proc = subprocess.Popen([str(fake), "30"], cwd=path)
    try:
        time.sleep(0.2)
        with pytest.raises(FlipError, match=rf"git process\(es\) {proc.pid}"):
            clear_stale_index_lock(path, log=lambda _: None, wait_s=1.0)
        assert lock.exists()
    finally:
        proc.kill()
        proc.wait()
    lines: list[str] = []
    assert clear_stale_index_lock(path, log=lines.append, wait_s=1.0) and not lock.exists()
    assert "removed a stale" in lines[0]
    assert clear_stale_index_lock(path, log=lines.append) is False  # no lock: nothing to do


@pytest.mark.slow
def test_promotion_pushes_the_bundle_and_the_tags_where_remotes_exist(repo, tmp_path):
    path, run = repo
    store, origin = tmp_path / "dvc-store", tmp_path / "origin.git"
    run("git", "init", "-q", "--bare", str(origin))
    run("git", "remote", "add", "origin", str(origin))
    run("dvc", "remote", "add", "-d", "store", str(store))
    run("git", "commit", "-qm", "remote", ".dvc/config")
    done = promote(path, "flip_id", "prod", log=lambda _: None)
    assert done["pushed"] is True and done["warning"] == ""
    remote_tags = run("git", "ls-remote", "--tags", str(origin))
    assert "refs/tags/flip_id@v0.0.1" in remote_tags and "refs/tags/flip_id#prod#1" in remote_tags
    md5 = done["bundle_md5"]
    assert (store / "files" / "md5" / md5[:2] / md5[2:]).exists()  # the bundle's .dir manifest is on the remote
    # fetched back from the remote alone, in a fresh clone
    clone = tmp_path / "clone"
    run("git", "clone", "-q", str(origin), str(clone))
    run("dvc", "artifacts", "get", str(clone), "flip_id", "--stage", "prod", "-o", str(tmp_path / "got"))
    assert dir_md5(tmp_path / "got") == md5


@pytest.mark.slow
def test_in_stage_none_only_when_the_artifact_has_no_version_there(repo, monkeypatch):
    path, run = repo
    assert in_stage(path, "flip_id", "prod") is None  # no tag at all
    run("git", "add", "dvc.lock")
    run("git", "commit", "-qm", "lock")
    run(str(Path(sys.executable).parent / "gto"), "register", "flip_id", "HEAD")
    assert in_stage(path, "flip_id", "prod") is None  # a version, none in prod

    import gto.api

    def broken(*args, **kwargs):
        raise RuntimeError("an unexpected GTO failure")

    monkeypatch.setattr(gto.api, "find_versions_in_stage", broken)
    with pytest.raises(FlipError, match="RuntimeError: an unexpected GTO failure"):
        in_stage(path, "flip_id", "prod")


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["malformed tag", "broken ref", "mismatched tag object"])
def test_a_damaged_registry_raises(repo, damage):
    path, run = repo
    run("git", "add", "dvc.lock")
    run("git", "commit", "-qm", "lock")
    gto = str(Path(sys.executable).parent / "gto")
    run(gto, "register", "flip_id", "HEAD")
    run(gto, "assign", "flip_id", "--version", "v0.0.1", "--stage", "prod")
    assert in_stage(path, "flip_id", "prod")["version"] == "v0.0.1"
    refs = path / ".git" / "refs" / "tags"
    if damage == "malformed tag":  # GTO skips it silently: it might have been meant as the assignment
        run("git", "tag", "flip_id#prod#x", "HEAD")
    elif damage == "broken ref":
        (refs / "flip_id#prod#1").write_text("deadbeef" * 5 + "\n")
    else:  # the stage tag's ref holds the version tag's object: GTO would find no prod at all
        (refs / "flip_id#prod#1").write_text((refs / "flip_id@v0.0.1").read_text())
    with pytest.raises(FlipError, match="broken or malformed"):
        in_stage(path, "flip_id", "prod")


def test_crash_point_kills_only_when_named():
    code = "from flip.io import crash_point; crash_point('a'); print('alive')"
    alive = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**env(), "FLIP_CRASH_AT": "b,c"})
    assert alive.returncode == 0 and alive.stdout.strip() == "alive"
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**env(), "FLIP_CRASH_AT": "b,a"})
    assert killed.returncode == -9 and "alive" not in killed.stdout
