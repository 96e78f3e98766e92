"""The model registry: DVC artifacts (``artifacts:`` in ``dvc.yaml``) versioned and promoted with GTO.

A version is a git tag ``<artifact>@vX.Y.Z`` on the commit whose ``dvc.lock`` records the bundle; a
promotion is a tag ``<artifact>#<stage>#N``. Both are plain git tags: anyone sees them
(``gto show``, ``git tag``), and rolling back is assigning the stage to an older version
(``gto assign flip_id --version v0.0.2 --stage prod``). The bundle of any version or stage is
fetched from the DVC cache (or remote) with ``dvc artifacts get``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from flip.errors import FlipError


def dvc_executable() -> str:
    """The dvc executable of this environment (a worker's PATH may not include the venv)."""
    here = Path(sys.executable).parent / "dvc"
    return str(here) if here.exists() else (shutil.which("dvc") or "dvc")


def _env() -> dict[str, str]:
    return {**os.environ, "DVC_NO_ANALYTICS": "1"}


def _git(project: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True, env=_env())
    if done.returncode != 0:
        raise FlipError(f"git {' '.join(args)} failed in {project}: {done.stderr.strip()}")
    return done.stdout.strip()


def artifact_path(project: Path, artifact: str) -> str:
    """The path ``dvc.yaml`` declares for ``artifact``."""
    spec = yaml.safe_load((Path(project) / "dvc.yaml").read_text()).get("artifacts", {})
    if artifact not in spec:
        raise FlipError(f"{artifact!r} is not declared under artifacts: in {project}/dvc.yaml "
                        f"(declared: {', '.join(spec) or 'none'}). Fix: check retrain.artifacts in params.yaml.")
    return spec[artifact]["path"]


def in_stage(project: Path, artifact: str, stage: str) -> dict[str, str] | None:
    """The version assigned to ``stage`` (``{"version", "commit"}``), or None."""
    from gto.api import find_versions_in_stage

    try:
        found = find_versions_in_stage(str(project), artifact, stage)
    except Exception:  # no tags of this artifact yet
        return None
    if not found:
        return None
    v = found[0] if isinstance(found, list) else found
    return {"version": v.version, "commit": v.commit_hexsha}


def show(project: Path) -> list[dict[str, Any]]:
    """Every artifact's versions and the stages assigned to them (as ``gto show``)."""
    from gto.api import show as gto_show

    return [dict(r) for r in gto_show(str(project), table=True)[0]]


def lock_hash(project: Path, path: str, rev: str | None = None) -> str | None:
    """The md5 that ``dvc.lock`` (in the workspace, or at git ``rev``) records for output ``path``."""
    text = (Path(project) / "dvc.lock").read_text() if rev is None else _git(project, "show", f"{rev}:dvc.lock")
    for stage in (yaml.safe_load(text) or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            if out.get("path") == path:
                return out.get("md5")
    return None


def fetch(project: Path, artifact: str, out: Path, *, version: str = "", stage: str = "") -> Path:
    """``dvc artifacts get`` the bundle of ``version`` or ``stage`` into ``out``."""
    ref = ["--rev", version] if version else ["--stage", stage]
    cmd = [dvc_executable(), "artifacts", "get", str(Path(project).resolve()), artifact, *ref, "-o", str(out), "--force"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if done.returncode != 0:
        raise FlipError(f"cannot fetch {artifact} {version or stage} from {project}: "
                        f"{(done.stderr or done.stdout).strip()[-500:]}")
    return Path(out)


def promote(project: Path, artifact: str, stage: str, *, commit: bool = True, message: str = "") -> dict[str, str]:
    """Commit ``dvc.lock`` (when it changed), register a new version of ``artifact`` on that commit
    (the next patch version; the version already there if HEAD has one) and assign ``stage`` to it."""
    from gto.api import assign, find_latest_version, register

    project = Path(project)
    if commit:
        _git(project, "add", "dvc.lock", *[p for p in (".gitignore", "dvc.yaml", "params.yaml")
                                           if (project / p).exists()])
        if subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=project).returncode != 0:
            _git(project, "commit", "-q", "-m", message or f"retrain: promote {artifact}")
    head = _git(project, "rev-parse", "HEAD")
    latest = None
    try:
        latest = find_latest_version(str(project), artifact)
    except Exception:
        latest = None
    if latest is not None and latest.commit_hexsha == head:
        version = latest.version
    else:
        version = register(str(project), artifact, "HEAD", message=message or None).version
    assign(str(project), artifact, stage, version=version, message=message or None)
    return {"artifact": artifact, "version": version, "stage": stage, "commit": head}


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
