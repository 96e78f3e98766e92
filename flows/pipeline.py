"""Prefect flows: the same DVC stages that `dvc repro` runs, with retries, logs and schedules.

Each task runs one stage with ``dvc repro --single-item <stage>`` in the project directory, so DVC
keeps deciding what is up to date (nothing is computed twice and lineage stays in ``dvc.lock``) and
the stage itself is the same ``flip <stage>`` command. Tasks return the stage's output paths (read
from ``dvc.lock``), never tensors or frames.

    python flows/pipeline.py retrain        # run once, locally (ephemeral Prefect server)
    python flows/serve.py                    # serve the scheduled retraining deployment
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

# dvc.yaml's stages, grouped by the flow that runs them (in this order). ``finetune`` is the
# foreach group (finetune@flip_id, finetune@flip_plm, finetune@flip); tests check that every stage
# of dvc.yaml is in exactly one group, so the retrain flow never skips one.
STAGE_GROUPS: dict[str, list[str]] = {
    "prepare-data": ["download", "preprocess", "validate", "drift"],
    "pretrain": ["pretrain"],
    "finetune": ["scratch", "finetune", "full_scratch", "full_flip_id", "package"],
    "evaluate": ["evaluate", "analyze", "report"],
}


def _dvc() -> str:
    """The dvc executable of this environment (a worker's PATH may not include the venv)."""
    here = Path(sys.executable).parent / "dvc"
    return str(here) if here.exists() else (shutil.which("dvc") or "dvc")


def stage_outputs(project: Path, stage: str) -> list[str]:
    """Output paths of ``stage`` (or of every ``stage@item``) as recorded in ``dvc.lock``."""
    lock = project / "dvc.lock"
    if not lock.exists():
        return []
    stages = yaml.safe_load(lock.read_text()).get("stages", {})
    return [o["path"] for name, s in stages.items() if name == stage or name.startswith(f"{stage}@")
            for o in s.get("outs", [])]


def defined_stages(project: Path) -> list[str]:
    return list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])


RETRY_DELAY = float(os.environ.get("FLIP_STAGE_RETRY_DELAY", "20"))


@task(retries=2, retry_delay_seconds=RETRY_DELAY, retry_jitter_factor=0.5, cache_policy=NO_CACHE)
def run_stage(project: str, stage: str, force: bool = False) -> list[str]:
    """``dvc repro --single-item <stage>``; retried on failure (network, preemption)."""
    logger = get_run_logger()
    cmd = [_dvc(), "repro", "--single-item", *(["--force"] if force else []), stage]
    logger.info("%s $ %s", project, " ".join(cmd))
    # the stages call `flip`: make this environment's scripts findable (a worker's PATH may lack them)
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(cmd, cwd=project, capture_output=True, text=True, env=env)
    for line in (done.stdout + done.stderr).splitlines():
        logger.info(line)
    if done.returncode != 0:
        raise RuntimeError(f"stage {stage} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return stage_outputs(Path(project), stage)


def _run(project: str, stages: list[str], force_first: bool = False) -> dict[str, list[str]]:
    present = set(defined_stages(Path(project)))
    outputs: dict[str, list[str]] = {}
    for i, stage in enumerate(s for s in stages if s in present):
        outputs[stage] = run_stage(project, stage, force=force_first and i == 0)
    return outputs


@flow(name="prepare-data", log_prints=True)
def prepare_data(project: str = ".", pull_new_data: bool = True) -> dict[str, list[str]]:
    """download → preprocess → validate. ``pull_new_data`` re-runs download even when DVC thinks it is
    up to date (new rows in a user's log); later stages re-run only if the raw files changed."""
    return _run(project, STAGE_GROUPS["prepare-data"], force_first=pull_new_data)


@flow(name="pretrain", log_prints=True)
def pretrain(project: str = ".") -> dict[str, list[str]]:
    """Modality-alignment pretraining (MLM + MTM + ICL)."""
    return _run(project, STAGE_GROUPS["pretrain"])


@flow(name="finetune", log_prints=True)
def finetune(project: str = ".") -> dict[str, list[str]]:
    """Every finetuning strategy of dvc.yaml at equal data (scratch, flip_id, flip_plm, flip), with the
    learning-rate selection and seeds of params.yaml, and the full-data ID runs."""
    return _run(project, STAGE_GROUPS["finetune"])


@flow(name="evaluate", log_prints=True)
def evaluate(project: str = ".") -> dict[str, list[str]]:
    """Metrics, calibration, cold start, Evidently drift, the alignment analysis and the report."""
    return _run(project, STAGE_GROUPS["evaluate"])


@flow(name="retrain", log_prints=True)
def retrain(project: str = ".", pull_new_data: bool = True) -> dict[str, Any]:
    """The whole pipeline on the newest data: what the weekly schedule runs."""
    project = str(Path(project).resolve())
    outputs = {**prepare_data(project, pull_new_data), **pretrain(project), **finetune(project),
               **evaluate(project)}
    result: dict[str, Any] = {"outputs": outputs}
    for name in ("reports/eval.json", "reports/validation.json"):
        path = Path(project) / name
        if path.exists():
            result[name] = json.loads(path.read_text()).get("summary")
    print(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":  # pragma: no cover
    flows = {"retrain": retrain, "prepare-data": prepare_data, "pretrain": pretrain, "finetune": finetune,
             "evaluate": evaluate}
    name = sys.argv[1] if len(sys.argv) > 1 else "retrain"
    flows[name](project=sys.argv[2] if len(sys.argv) > 2 else ".")
