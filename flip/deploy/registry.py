"""The model registry: DVC artifacts (``artifacts:`` in ``dvc.yaml``) versioned and promoted with GTO.

A version is a git tag ``<artifact>@vX.Y.Z`` on the commit whose ``dvc.lock`` records the bundle; a
promotion is a tag ``<artifact>#<stage>#N``. Both are plain git tags: anyone sees them
(``gto show``, ``git tag``), and rolling back is assigning the stage to an older version
(``gto assign flip_id --version v0.0.2 --stage prod``). The bundle of any version or stage is
fetched from the DVC cache (or remote) with ``dvc artifacts get``.

**Promotion is a transaction** (:func:`promote`). What is registered is exactly what the gate scored:
the gate records the bundle's DVC hash (:func:`dir_md5`, the ``md5`` DVC writes for a directory
output), and nothing is committed or tagged unless the bundle's files still hash to it, ``dvc.lock``
records it for the artifact's path, ``dvc status`` shows the bundle's lineage (its stage and every
stage upstream) unchanged, and no tracked file other than the pipeline's own (``dvc.lock``,
``reports/metrics.json``, ``reports/plots/``) differs from HEAD. The commit holds only those files
(an explicit pathspec: whatever else the user staged stays staged). With ``retrain.commit: false``
nothing is committed and HEAD's ``dvc.lock`` must already record the gated hash (the user commits).

Before each step a write-ahead journal ``reports/gate/<artifact>.promotion.json`` is replaced
atomically: ``{artifact, path, stage, bundle_md5, gate_file, gate_sha256, message, step, commit,
version, push}``. The states a crash (SIGKILL, power cut) can leave, and what :func:`recover` (called
by :func:`promote` first, and by the retrain flow before it gates) does with each:

=====================================  ==============================================================
journal ``step`` / registry             recovery
=====================================  ==============================================================
no journal                              nothing to do (a promotion either never started or finished)
``commit``, HEAD's dvc.lock lacks md5   the commit never happened: rolled back (journal removed, our
                                        files unstaged); the next gate + promotion start afresh
``commit``, HEAD's dvc.lock has md5     committed, not tagged: registered and assigned if the gate
                                        decision on disk is still the journal's (same sha256, passed
                                        for that md5); otherwise the commit stays and is never tagged
``register`` (commit known)             the version tag on that commit is reused, or registered
``assign`` (version known)              the stage is assigned unless it already points at the version
``push``                                ``dvc push`` / ``git push --tags`` run again (remotes only)
=====================================  ==============================================================

Every step is idempotent (a version already on the commit is reused, an assignment already made is
not repeated), so a crash between a step and its journal update is recovered the same way.

**A stale ``.git/index.lock``** (git killed mid-commit) blocks every later commit. The rule
(:func:`clear_stale_index_lock`): the retrain flow holds the project's lock, so no git command of
ours is running; the lock is removed (with a log line) only when, in addition, no live ``git``
process has its working directory in this repository or names it on its command line (``/proc``)
and the lock is at least ``STALE_INDEX_LOCK_S`` seconds old. A user's git that is still running
is waited for (up to ``INDEX_LOCK_WAIT_S``) and then reported, never removed. Without ``/proc``
only a lock older than ten minutes is removed.

Tests kill the process at named points with ``FLIP_CRASH_AT=<point>[,<point>...]`` (:func:`crash_point`):
``promote:before-commit``, ``promote:after-commit``, ``promote:after-register``,
``promote:after-assign``, ``promote:after-push``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from flip.environment import dvc_executable, tool_env
from flip.errors import FlipError
from flip.io import crash_point, file_sha256, read_json, write_json

# the pipeline's own git-tracked files: a promotion commits these and only these
PIPELINE_FILES = ("dvc.lock", "reports/metrics.json", "reports/plots")
STALE_INDEX_LOCK_S = 5.0
INDEX_LOCK_WAIT_S = 30.0

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _run(project: Path, *cmd: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(cmd), cwd=project, capture_output=True, text=True, env=tool_env())
    except OSError as exc:  # no git / dvc on PATH
        raise FlipError(f"cannot run {cmd[0]} in {project}: {exc}. Fix: install it or put it on PATH.") from None


def _git(project: Path, *args: str) -> str:
    done = _run(project, "git", *args)
    if done.returncode != 0:
        raise FlipError(f"git {' '.join(args)} failed in {project}: {done.stderr.strip()}")
    return done.stdout.strip()


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    return _run(project, dvc_executable(), *args)


def artifact_path(project: Path, artifact: str) -> str:
    """The path ``dvc.yaml`` declares for ``artifact``."""
    spec = yaml.safe_load((Path(project) / "dvc.yaml").read_text()).get("artifacts", {})
    if artifact not in spec:
        raise FlipError(f"{artifact!r} is not declared under artifacts: in {project}/dvc.yaml "
                        f"(declared: {', '.join(spec) or 'none'}). Fix: check retrain.artifacts in params.yaml.")
    return spec[artifact]["path"]


def in_stage(project: Path, artifact: str, stage: str) -> dict[str, str] | None:
    """The version assigned to ``stage`` (``{"version", "commit"}``), or None when the artifact has no
    version in that stage yet (no tag of it at all: GTO's ``ArtifactNotFound`` for this name; or tags,
    none of them in ``stage``). Any other failure (no git, a GitPython error, an unreadable tag, a GTO
    API change) raises :class:`FlipError`: the gate must never mistake a broken registry for "no champion"."""
    where = f"the model registry (GTO tags) of {project}"
    try:
        from gto.api import find_versions_in_stage
        from gto.exceptions import ArtifactNotFound
    except Exception as exc:  # GitPython raises ImportError at import when it finds no git executable
        raise FlipError(f"cannot read {where}: importing gto failed ({type(exc).__name__}: {str(exc).strip()[:300]}). "
                        "Fix: install git and put it on PATH.") from None
    check_tags(project, artifact)
    try:
        found = find_versions_in_stage(str(project), artifact, stage)
        if not found:
            return None
        v = found[0] if isinstance(found, list) else found
        version, commit = str(v.version), str(v.commit_hexsha)
    except ArtifactNotFound as exc:
        if str(exc) == ArtifactNotFound(artifact).message:
            return None
        raise FlipError(f"cannot read {where}: {exc}") from None
    except Exception as exc:
        text = " ".join(str(exc).split())[:400]
        raise FlipError(f"cannot read {where} for {artifact} in stage {stage!r}: {type(exc).__name__}: {text}. "
                        "The gate refuses to treat an unreadable registry as 'no champion'. Fix: check `git tag` "
                        "and `gto show` in the project (git installed, tags and .git/refs intact).") from None
    tagged = _run(Path(project), "git", "rev-parse", "-q", "--verify", f"refs/tags/{artifact}@{version}^{{commit}}")
    if not re.fullmatch(r"v\d+\.\d+\.\d+", version) or tagged.stdout.strip() != commit:
        raise FlipError(f"cannot read {where}: {stage!r} of {artifact} points at {version!r} (commit {commit[:12]}), "
                        f"which has no version tag {artifact}@{version} on that commit. Fix: check `git tag` and "
                        f"`gto show {artifact}`; re-register or re-assign the version.")
    return {"version": version, "commit": commit}


def check_tags(project: Path, artifact: str) -> None:
    """Every git tag of ``artifact`` (``<artifact>@...``, ``<artifact>#...``) is a GTO tag that resolves to a
    commit. GTO silently skips a malformed or broken tag, which could hide the champion's assignment."""
    from gto.constants import tag_re

    done = _run(Path(project), "git", "for-each-ref", "--format=%(refname:strip=2) %(objecttype) %(tag) %(*objecttype)",
                f"refs/tags/{artifact}@*", f"refs/tags/{artifact}#*")
    problem = done.returncode != 0 or "broken ref" in done.stderr
    bad = []
    for line in done.stdout.splitlines():
        name, kind, *rest = line.split()
        m = tag_re.match(name)
        peeled = rest[-1:] == ["commit"] and rest[:1] == [name] if kind == "tag" else kind == "commit"
        if not m or m.group("artifact") != artifact or not peeled:
            bad.append(name)
    if problem or bad:
        detail = "; ".join(x for x in [" ".join(done.stderr.split())[:300], ", ".join(bad[:5])] if x)
        raise FlipError(f"cannot read the model registry (GTO tags) of {project}: the tags of {artifact} are broken or "
                        f"malformed ({detail}). The gate refuses to guess the champion. Fix: repair or delete those "
                        "tags (`git tag -d <tag>`, `git fetch --tags`), then check `gto show`.")


def show(project: Path) -> list[dict[str, Any]]:
    """Every artifact's versions and the stages assigned to them (as ``gto show``)."""
    from gto.api import show as gto_show

    return [dict(r) for r in gto_show(str(project), table=True)[0]]


def _lock(project: Path, rev: str | None = None) -> dict[str, Any]:
    if rev is None:
        path = Path(project) / "dvc.lock"
        text = path.read_text() if path.exists() else ""
    else:
        done = _run(Path(project), "git", "show", f"{rev}:dvc.lock")
        text = done.stdout if done.returncode == 0 else ""
    return (yaml.safe_load(text) or {}).get("stages", {}) or {}


def lock_hash(project: Path, path: str, rev: str | None = None) -> str | None:
    """The md5 that ``dvc.lock`` (in the workspace, or at git ``rev``) records for output ``path``."""
    for stage in _lock(project, rev).values():
        for out in stage.get("outs", []):
            if out.get("path") == path:
                return out.get("md5")
    return None


def dir_md5(path: Path) -> str:
    """The hash DVC records for a directory output: the md5 of its ``.dir`` manifest, the JSON list
    ``[{"md5": <file md5>, "relpath": <posix path>}]`` sorted by relpath (``json.dumps(sort_keys=True)``),
    plus ``.dir`` (dvc_data's ``Tree.digest``; DVC 3 hashes file bytes as they are). Computed from the
    files, so a bundle changed after ``dvc repro`` no longer matches ``dvc.lock``."""
    root = Path(path)
    if not root.is_dir():
        raise FlipError(f"{root} is not a bundle directory (missing). Fix: run `dvc repro` to make it.")
    entries = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        for name in files:
            f = Path(dirpath) / name
            digest = hashlib.md5()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
            entries.append({"md5": digest.hexdigest(), "relpath": f.relative_to(root).as_posix()})
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


# ------------------------------------------------------------------------------ checks before a commit
def producing_stage(project: Path, path: str) -> str:
    """The ``dvc.lock`` stage whose outputs include ``path`` (``package@flip_id``)."""
    for name, stage in _lock(project).items():
        if any(o.get("path") == path for o in stage.get("outs", [])):
            return name
    raise FlipError(f"dvc.lock in {project} records no stage that outputs {path}. Fix: run `dvc repro` first.")


def lineage_changes(project: Path, path: str, stale_ok: Iterable[str] = ()) -> dict[str, Any]:
    """``dvc status --with-deps`` of the stage that makes ``path``: the changed stages of the bundle's
    lineage (empty = every stage upstream is as ``dvc.lock`` records). A stage in ``stale_ok`` may
    show changed *deps* only (``retrain.pretrain: reuse`` finetunes from last week's pretraining, whose
    data dependency is older by design); its outputs must still be the recorded ones."""
    stage = producing_stage(project, path)
    done = _dvc(Path(project), "status", "--json", "--with-deps", stage)
    try:
        status = json.loads(done.stdout or "null")
    except json.JSONDecodeError:
        status = None
    if done.returncode != 0 or not isinstance(status, dict):
        raise FlipError(f"`dvc status --with-deps {stage}` failed in {project}: "
                        f"{(done.stderr or done.stdout).strip()[-400:]}")
    allowed = set(stale_ok)
    return {name: changes for name, changes in status.items()
            if not (name in allowed and all(isinstance(c, dict) and set(c) == {"changed deps"} for c in changes))}


def _porcelain(project: Path) -> list[tuple[str, str]]:
    """(XY, path) of ``git status --porcelain -z`` (untracked files included, ignored ones not)."""
    done = _run(project, "git", "status", "--porcelain=v1", "-z", "--untracked-files=all")
    if done.returncode != 0:
        raise FlipError(f"git status failed in {project}: {done.stderr.strip()}")
    items, out, i = done.stdout.split("\0"), [], 0
    while i < len(items):
        entry = items[i]
        i += 1
        if len(entry) < 4:
            continue
        out.append((entry[:2], entry[3:]))
        if entry[0] in "RC":  # a rename's source follows
            i += 1
    return out


def _is_pipeline_file(path: str) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in PIPELINE_FILES) or \
        Path(path).name == ".gitignore"  # DVC appends its outputs to .gitignore files: not code


def workspace_changes(project: Path) -> list[str]:
    """Paths that make the workspace differ from HEAD other than the pipeline's own outputs: tracked
    files modified, staged, added or deleted, and untracked files inside a code dependency of a stage
    (e.g. a new module under ``flip/``). A commit of ``dvc.lock`` then would not reproduce the model."""
    lock = _lock(project)
    outs = {o["path"] for s in lock.values() for o in s.get("outs", [])}
    code = {d["path"] for s in lock.values() for d in s.get("deps", [])
            if not any(d["path"] == o or d["path"].startswith(o + "/") for o in outs)}
    found = []
    for xy, path in _porcelain(Path(project)):
        if _is_pipeline_file(path):
            continue
        if xy == "??" and not any(path == c or path.startswith(c.rstrip("/") + "/") for c in code):
            continue
        found.append(f"{path} ({'untracked' if xy == '??' else xy.strip()})")
    return found


# ------------------------------------------------------------------------------ git's index.lock
def _git_path(project: Path, name: str) -> Path:
    p = Path(_git(project, "rev-parse", "--git-path", name))
    return p if p.is_absolute() else Path(project) / p


def _live_git_processes(project: Path) -> list[int] | None:
    """PIDs of running git processes that work in ``project`` (cwd inside it, or its path among their
    arguments); None without ``/proc``. GitPython's ``cat-file`` readers of this process do not count."""
    proc = Path("/proc")
    if not (proc / "self").exists():
        return None
    root, me, found = str(Path(project).resolve()), os.getpid(), []
    for d in proc.iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            comm = (d / "comm").read_text().strip()
            if comm != "git" and not comm.startswith("git-"):
                continue
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cwd = os.readlink(d / "cwd")
            argv = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if ppid == me and "cat-file" in argv:  # GitPython's persistent reader: never holds index.lock
                continue
        except FileNotFoundError:  # it ended meanwhile
            continue
        except (OSError, ValueError, IndexError):  # another user's git: it may be working here
            found.append(int(d.name))
            continue
        if cwd == root or cwd.startswith(root + os.sep) or any(root in a for a in argv):
            found.append(int(d.name))
    return found


def clear_stale_index_lock(project: Path, log: Log = _stderr, *, wait_s: float = INDEX_LOCK_WAIT_S) -> bool:
    """Remove ``.git/index.lock`` when a killed git left it (the rule is in the module docstring);
    True when one was removed. A lock that a live git may hold raises FlipError after ``wait_s``."""
    lock = _git_path(Path(project), "index.lock")
    deadline = time.monotonic() + wait_s
    while lock.exists():
        live = _live_git_processes(project)
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            break
        if live == [] and age >= STALE_INDEX_LOCK_S or live is None and age >= 600:
            lock.unlink(missing_ok=True)
            log(f"removed a stale {lock} ({age:.0f} s old, no git process is working in {project}): "
                "a git command was killed before it finished")
            return True
        if time.monotonic() >= deadline:
            who = f"git process(es) {', '.join(map(str, live))} still run in it" if live else \
                "its age cannot be trusted without /proc"
            raise FlipError(f"{lock} exists and {who}: another git command is using the repository. Fix: let it "
                            "finish, or, if no git is running, remove the lock file and run again.")
        time.sleep(0.5)
    return False


# ------------------------------------------------------------------------------ the transaction
def journal_path(project: Path, artifact: str) -> Path:
    """The write-ahead journal of ``artifact``'s promotion (present only while one is unfinished)."""
    return Path(project) / "reports" / "gate" / f"{artifact}.promotion.json"


def gate_decision(gate_file: Path, artifact: str) -> dict[str, Any]:
    """The gate's decision file, checked: it passed, for ``artifact``, and names the bundle's md5."""
    gate_file = Path(gate_file)
    if not gate_file.exists():
        raise FlipError(f"no gate decision {gate_file} for {artifact}: promotion needs one. "
                        f"Fix: run `flip gate --artifact {artifact}` first.")
    d = read_json(gate_file)
    md5 = (d.get("challenger") or {}).get("md5")
    if d.get("artifact") != artifact or not md5:
        raise FlipError(f"{gate_file} is not a gate decision for {artifact} with the bundle's md5 (written by an "
                        f"older flip?). Fix: run `flip gate --artifact {artifact}` again.")
    if d.get("promote") is not True:
        raise FlipError(f"the gate refused {artifact} ({gate_file}): {'; '.join(d.get('reasons', []))}")
    return d


def _pipeline_paths(project: Path) -> list[str]:
    """Those of PIPELINE_FILES that git can commit here (tracked, or present and not ignored)."""
    keep = []
    for p in PIPELINE_FILES:
        tracked = _run(project, "git", "ls-files", "--", p).stdout.strip() != ""
        ignored = _run(project, "git", "check-ignore", "-q", p).returncode == 0
        if tracked or ((project / p).exists() and not ignored):
            keep.append(p)
    return keep


def _commit_pipeline_files(project: Path, message: str) -> bool:
    """Commit exactly the pipeline's files (pathspec: other staged changes stay staged); True if committed."""
    paths = _pipeline_paths(project)
    _git(project, "add", "-A", "--", *paths)
    if _run(project, "git", "diff", "--cached", "--quiet", "--", *paths).returncode == 0:
        return False
    _git(project, "commit", "-q", "-m", message, "--", *paths)
    return True


def _version_on(project: Path, artifact: str, commit: str) -> str | None:
    """The version tag of ``artifact`` on ``commit`` (GTO allows one), or None."""
    pattern = re.compile(rf"^{re.escape(artifact)}@(v\d+\.\d+\.\d+)$")
    tags = _git(project, "tag", "--points-at", commit, "--list", f"{artifact}@v*").split()
    found = sorted((m.group(1) for t in tags if (m := pattern.match(t))),
                   key=lambda v: tuple(int(x) for x in v[1:].split(".")))
    return found[-1] if found else None


def push(project: Path, log: Log = _stderr) -> dict[str, Any]:
    """``dvc push`` (where ``dvc remote list`` names a remote) and ``git push --tags`` (where ``git remote``
    names one: origin if present). ``pushed`` is False, with the reason in ``warning``, when the bundle
    or the tags stay on this machine only."""
    project = Path(project)
    warnings = []
    remotes = _dvc(project, "remote", "list")
    if remotes.returncode != 0 or not remotes.stdout.strip():
        warnings.append("no DVC remote (`dvc remote list` is empty): the bundle lives only in this machine's DVC "
                        "cache; add one (`dvc remote add -d models <url>`) and run `dvc push`")
    else:
        done = _dvc(project, "push", "-q")
        if done.returncode != 0:
            warnings.append(f"`dvc push` failed, the bundle is only in this machine's cache: "
                            f"{(done.stderr or done.stdout).strip()[-300:]}")
        else:
            log("dvc push: the DVC outputs of this commit are on the remote")
    git_remotes = _git(project, "remote").split()
    if not git_remotes:
        warnings.append("no git remote: the version and stage tags exist in this clone only (`git push --tags` "
                        "once one is added)")
    else:
        remote = "origin" if "origin" in git_remotes else git_remotes[0]
        done = _run(project, "git", "push", "-q", remote, "--tags")
        if done.returncode != 0:
            warnings.append(f"`git push {remote} --tags` failed: {done.stderr.strip()[-300:]}")
        else:
            log(f"git push {remote} --tags: the version and stage tags are on the remote")
    return {"pushed": not warnings, "warning": "; ".join(warnings)}


def _complete(project: Path, j: dict[str, Any], log: Log) -> dict[str, Any]:
    """Run the journal's remaining steps (register, assign, push), each recorded before it runs."""
    from gto.api import assign, register

    jpath = journal_path(project, j["artifact"])
    artifact, stage, md5 = j["artifact"], j["stage"], j["bundle_md5"]
    if j["step"] == "commit":
        head = _git(project, "rev-parse", "HEAD")
        if lock_hash(project, j["path"], rev=head) != md5:
            raise FlipError(f"HEAD ({head[:8]}) does not record the gated bundle {md5} for {j['path']} in its dvc.lock; "
                            "nothing was registered. Fix: commit dvc.lock and run the promotion again.")
        j.update(step="register", commit=head)
        write_json(jpath, j)
    if j["step"] == "register":
        version = _version_on(project, artifact, j["commit"])
        if version is None:
            version = register(str(project), artifact, j["commit"], message=j["message"] or None).version
            log(f"registered {artifact} {version} on {j['commit'][:8]} (bundle {md5})")
        crash_point("promote:after-register")
        j.update(step="assign", version=str(version))
        write_json(jpath, j)
    if j["step"] == "assign":
        current = in_stage(project, artifact, stage)
        if current is None or current["version"] != j["version"]:
            assign(str(project), artifact, stage, version=j["version"], message=j["message"] or None)
            log(f"assigned {stage} to {artifact} {j['version']}")
        crash_point("promote:after-assign")
        j.update(step="push")
        write_json(jpath, j)
    j["push"] = push(project, log)
    crash_point("promote:after-push")
    jpath.unlink(missing_ok=True)
    if j["push"]["warning"]:
        log(f"warning: {artifact} {j['version']}: {j['push']['warning']}")
    return {"artifact": artifact, "version": j["version"], "stage": stage, "commit": j["commit"],
            "bundle_md5": md5, **j["push"]}


def recover(project: Path, artifact: str | None = None, log: Log = _stderr) -> list[dict[str, Any]]:
    """Finish or roll back the promotions a crash interrupted (the journal's states, module docstring);
    returns one entry per journal found: ``{"artifact", "step", "action", ...}`` where ``action`` is
    ``completed`` (with the promotion's result), ``rolled back`` or ``left untagged``."""
    project = Path(project)
    names = [artifact] if artifact else sorted(p.name[:-len(".promotion.json")] for p in
                                                (project / "reports" / "gate").glob("*.promotion.json"))
    done = []
    for name in names:
        jpath = journal_path(project, name)
        if not jpath.exists():
            continue
        clear_stale_index_lock(project, log)
        j = read_json(jpath)
        step = j.get("step")
        if step == "commit":
            head = _run(project, "git", "rev-parse", "HEAD").stdout.strip()
            if not head or lock_hash(project, j["path"], rev=head) != j["bundle_md5"]:
                _run(project, "git", "reset", "-q", "--", *_pipeline_paths(project))  # unstage what we staged
                jpath.unlink()
                log(f"recovered {name}: the promotion of {j['bundle_md5']} stopped before its commit; rolled back "
                    "(nothing was committed or tagged)")
                done.append({"artifact": name, "step": step, "action": "rolled back"})
                continue
            gate_file = Path(j["gate_file"])
            gate_file = gate_file if gate_file.is_absolute() else project / gate_file
            try:
                ok = file_sha256(gate_file) == j["gate_sha256"] and \
                    gate_decision(gate_file, name)["challenger"]["md5"] == j["bundle_md5"]
            except (FlipError, OSError, ValueError):
                ok = False
            if not ok:
                jpath.unlink()
                log(f"recovered {name}: HEAD ({head[:8]}) records {j['bundle_md5']} but the passing gate decision "
                    f"{gate_file} is gone or changed; the commit stays and is not tagged (gate it again)")
                done.append({"artifact": name, "step": step, "action": "left untagged", "commit": head})
                continue
        log(f"recovering the interrupted promotion of {name} (step {step})")
        done.append({"artifact": name, "step": step, "action": "completed", **_complete(project, j, log)})
    return done


def promote(project: Path, artifact: str, stage: str, *, gate_file: Path | None = None, commit: bool = True,
            message: str = "", stale_ok: Iterable[str] = (), log: Log = _stderr) -> dict[str, Any]:
    """Register the bundle the gate passed (``gate_file``, default ``reports/gate/<artifact>.json``) as the
    next version of ``artifact`` and assign ``stage`` to it, as a journaled transaction (module docstring).

    Refuses (FlipError, nothing committed or tagged) unless the bundle's files hash to the gated md5,
    ``dvc.lock`` records it, the lineage is unchanged (``stale_ok``: see :func:`lineage_changes`) and
    no code differs from HEAD. ``commit``: commit the pipeline's files (the bundle's ``dvc.lock`` entry);
    False: commit nothing, HEAD's ``dvc.lock`` must record the gated md5 already.
    Returns ``{artifact, version, stage, commit, bundle_md5, pushed, warning}``."""
    project = Path(project)
    recover(project, artifact, log)
    path = artifact_path(project, artifact)
    gate_file = Path(gate_file) if gate_file else project / "reports" / "gate" / f"{artifact}.json"
    md5 = gate_decision(gate_file, artifact)["challenger"]["md5"]
    on_disk = dir_md5(project / path)
    if on_disk != md5:
        raise FlipError(f"the bundle {path} changed after the gate scored it (gated {md5}, now {on_disk}): "
                        f"not promoted. Fix: run `flip gate --artifact {artifact}` on it again.")
    locked = lock_hash(project, path)
    if locked != md5:
        raise FlipError(f"dvc.lock records {locked} for {path} but the gate scored {md5}: the bundle is not the "
                        f"output DVC recorded. Fix: `dvc repro {path}` (or the retrain flow), then gate again.")
    changed = lineage_changes(project, path, stale_ok)
    if changed:
        what = "; ".join(f"{s}: {', '.join(k for c in v for k in (c if isinstance(c, dict) else {str(c): 0}))}"
                         for s, v in changed.items())
        raise FlipError(f"`dvc status` shows the lineage of {path} changed ({what}): the bundle is not what its "
                        f"recorded stages make. Fix: `dvc repro {producing_stage(project, path)}`, then gate again.")
    dirty = workspace_changes(project)
    if dirty:
        raise FlipError(f"the workspace differs from HEAD in {', '.join(dirty[:8])}{' ...' if len(dirty) > 8 else ''}: "
                        "a tagged commit would not reproduce the model. Fix: commit or stash your changes, then run "
                        "the retrain flow (or the promotion) again.")
    clear_stale_index_lock(project, log)
    if not commit and lock_hash(project, path, rev="HEAD") != md5:
        raise FlipError(f"retrain.commit is false and HEAD's dvc.lock does not record the gated bundle {md5} for "
                        f"{path}: the version would tag a model the gate never scored. Fix: commit dvc.lock "
                        "(`git commit dvc.lock -m ...`) and promote again, or set retrain.commit: true.")
    gate_rel = gate_file.resolve()
    j = {"artifact": artifact, "path": path, "stage": stage, "bundle_md5": md5,
         "gate_file": str(gate_rel.relative_to(project.resolve()) if gate_rel.is_relative_to(project.resolve())
                          else gate_rel),
         "gate_sha256": file_sha256(gate_file), "message": message or f"retrain: promote {artifact}",
         "step": "commit", "commit": None, "version": None, "push": None}
    write_json(journal_path(project, artifact), j)
    crash_point("promote:before-commit")
    if commit:
        _commit_pipeline_files(project, j["message"])
    crash_point("promote:after-commit")
    return _complete(project, j, log)


def fetch(project: Path, artifact: str, out: Path, *, version: str = "", stage: str = "") -> Path:
    """``dvc artifacts get`` the bundle of ``version`` or ``stage`` into ``out``."""
    ref = ["--rev", version] if version else ["--stage", stage]
    cmd = [dvc_executable(), "artifacts", "get", str(Path(project).resolve()), artifact, *ref, "-o", str(out), "--force"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=tool_env())
    if done.returncode != 0:
        raise FlipError(f"cannot fetch {artifact} {version or stage} from {project}: "
                        f"{(done.stderr or done.stdout).strip()[-500:]}")
    return Path(out)


def resolve(project: Path, spec: str, workdir: Path) -> Path:
    """A model given as a bundle directory, ``<artifact>@<version>`` (``flip_id@v0.0.3``) or
    ``<artifact>@<stage>`` (``flip_id@prod``); registry models are fetched into ``workdir``."""
    if Path(spec).exists():
        return Path(spec)
    if "@" not in spec:
        raise FlipError(f"--model {spec}: no such directory, and not ARTIFACT@VERSION or ARTIFACT@STAGE. Fix: pass "
                        "models/serve/flip_id, flip_id@prod or flip_id@v0.0.1 (`gto show` lists them).")
    artifact, ref = spec.split("@", 1)
    is_version = ref[:1] == "v" and ref[1:2].isdigit()
    return fetch(project, artifact, Path(workdir) / artifact, version=ref if is_version else "",
                 stage="" if is_version else ref)
