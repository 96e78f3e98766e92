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
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flip.environment import apply as quiet_tools
from flip.environment import dvc_executable, executable, tool_env

# dvc.yaml's stages, grouped by the flow that runs them (in this order). ``finetune`` is the
# foreach group (finetune@flip_id, finetune@flip_plm, finetune@flip); tests check that every stage
# of dvc.yaml is in exactly one group, so the retrain flow never skips one.
STAGE_GROUPS: dict[str, list[str]] = {
    "prepare-data": ["download", "preprocess", "validate", "drift"],
    "pretrain": ["pretrain"],
    "finetune": ["scratch", "finetune", "full_scratch", "full_flip_id", "package"],
    "evaluate": ["evaluate", "analyze", "report"],
}


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

# DVC's advice after each stage, and bar fragments: noise in a flow's log
NOISE = ("To track the changes with git", "git add ", "To enable auto staging", "dvc config core.autostage",
         "Use `dvc push`", "Updating lock file")


def _env() -> dict[str, str]:
    # the stages call `flip`: make this environment's scripts findable (a worker's PATH may lack them);
    # no progress bars (a log gets one line per epoch from the stages instead); telemetry off
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return tool_env(PATH=path, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")


def stream(cmd: list[str], cwd: str, logger: Any) -> tuple[int, list[str]]:
    """Run ``cmd``, sending each output line to ``logger`` as it comes; returns (exit code, lines)."""
    lines: list[str] = []
    with subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                          env=_env()) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n").split("\r")[-1].rstrip()
            if not line.strip() or line.lstrip().startswith(NOISE):
                continue
            lines.append(line)
            logger.info(line)
    return proc.returncode, lines


# a stage command's exit status 2 is `flip`'s FlipError (bad input or settings, one `error: `
# paragraph): a retry runs into the same error, so it is not retried. DVC itself exits 255 for any
# failed stage; the command's own status is in its message ("failed to run: <cmd>, exited with N").
BAD_INPUT_EXIT = 2
_EXITED = re.compile(r"failed to run: .*, exited with (-?\d+)\s*$")


class StageInputError(RuntimeError):
    """A stage failed on bad input or settings (its command exited 2): not retried."""


def stage_exit_code(lines: list[str]) -> int | None:
    """The stage command's own exit status as ``dvc repro`` reports it, or None (DVC failed itself)."""
    for line in reversed(lines):
        if m := _EXITED.search(line):
            return int(m.group(1))
    return None


def _retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """``retry_condition_fn`` of ``run_stage``: retry anything but :class:`StageInputError`."""
    return not isinstance(state.data, StageInputError)


@task(retries=2, retry_delay_seconds=RETRY_DELAY, retry_jitter_factor=0.5, cache_policy=NO_CACHE,
      retry_condition_fn=_retry_unless_bad_input)
def run_stage(project: str, stage: str, force: bool = False) -> list[str]:
    """``dvc repro --single-item <stage>``, its output streamed to the log; retried on failure
    (network, preemption), but not on bad input or settings (exit 2: :class:`StageInputError`).
    A failed stage leaves its previous outputs in place (``dvc checkout``); if they cannot be put
    back (a full disk, a missing cache object), the error says "workspace NOT restored"."""
    logger = get_run_logger()
    cmd = [dvc_executable(), "repro", "--single-item", *(["--force"] if force else []), stage]
    logger.info("%s $ %s", project, " ".join(cmd))
    code, lines = stream(cmd, project, logger)
    if code != 0:
        # DVC removes a stage's outputs before running it: put the last good ones back (dvc.lock still
        # records them: a failed stage does not update it), unless the stage never ran before
        restore = None
        if stage_outputs(Path(project), stage):
            restore = subprocess.run([dvc_executable(), "checkout", "--force", stage], cwd=project,
                                     capture_output=True, text=True, env=_env())
        restored = "previous outputs restored" if restore is not None else "no earlier outputs to restore"
        if restore is not None and restore.returncode != 0:
            why = " ".join(x.strip() for x in (restore.stdout + restore.stderr).splitlines() if x.strip())
            restored = f"workspace NOT restored: {why or f'dvc checkout exited with {restore.returncode}'}"
            logger.error("stage %s failed and `dvc checkout --force %s` failed: %s", stage, stage, restored)
        status = stage_exit_code(lines)
        # without DVC's status line (its wording changed?), `flip`'s one `error: ` paragraph tells
        bad_input = status == BAD_INPUT_EXIT if status is not None else any(x.startswith("error: ") for x in lines)
        error = StageInputError if bad_input else RuntimeError
        raise error(f"stage {stage} failed (exit {code}{f', command exit {status}' if status is not None else ''}"
                    f"{', bad input or settings: not retried' if bad_input else ''}; {restored}): "
                    + "\n".join(lines[-15:]))
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


def _lock_stages(project: Path) -> dict[str, Any]:
    lock = project / "dvc.lock"
    return yaml.safe_load(lock.read_text()).get("stages", {}) if lock.exists() else {}


@task(cache_policy=NO_CACHE)
def gate_artifact(project: str, artifact: str) -> dict[str, Any]:
    """``flip gate``: the challenger (this run's bundle) against the champion (the registry's model in
    ``retrain.stage``) on the newest window; returns the decision (``reports/gate/<artifact>.json``).
    A gate that cannot decide (an unreadable registry, a missing bundle) raises: the run fails, nothing
    is promoted."""
    logger = get_run_logger()
    out = Path(project) / "reports" / "gate" / f"{artifact}.json"
    out.unlink(missing_ok=True)  # never promote on an older run's decision
    code, lines = stream([executable("flip"), "gate", "--artifact", artifact], project, logger)
    if code != 0:
        raise RuntimeError(f"flip gate --artifact {artifact} failed (exit {code}): " + "\n".join(lines[-10:]))
    return json.loads(out.read_text())


@task(cache_policy=NO_CACHE)
def promote_artifact(project: str, artifact: str, stage: str, commit: bool, message: str,
                     stale_ok: list[str] | None = None) -> dict[str, Any]:
    """Register the gated bundle as the next GTO version of ``artifact`` and assign ``stage`` to it: the
    journaled transaction of :func:`flip.deploy.registry.promote` (refusals raise FlipError), then
    ``dvc push`` / ``git push --tags`` where remotes exist."""
    from flip.deploy.registry import promote

    logger = get_run_logger()
    done = promote(Path(project), artifact, stage, commit=commit, message=message, stale_ok=stale_ok or (),
                   log=logger.info)
    logger.info("promoted %s %s to %s (commit %s, bundle %s)", artifact, done["version"], stage, done["commit"][:8],
                done["bundle_md5"])
    if done["warning"]:
        logger.warning("%s %s is not pushed: %s", artifact, done["version"], done["warning"])
    return done


def summary_markdown(result: dict[str, Any]) -> str:
    """The run's summary for the Prefect UI: drift verdict, comparison and decision per artifact."""
    lines = [f"# Retrain: {result['status']}", "", result["message"], ""]
    drift = result.get("drift")
    if drift:
        lines += [f"**Drift of the newest window** ({drift['window_rows']:,} rows vs {drift['reference_rows']:,} "
                  f"training rows, policy `{drift['policy']}`): "
                  + ("; ".join(drift["reasons"]) if drift["drift"] else "none in the attributes or the label") + ".",
                  ""]
    if result.get("gates"):
        lines += ["| artifact | champion | challenger AUC | champion AUC | ΔAUC [95% CI] | p | Δlogloss | decision |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, g in result["gates"].items():
            champ, d = g.get("champion"), g.get("delta")
            promoted = result.get("promoted", {}).get(name)
            decision = f"promoted {promoted['version']}" if promoted else ("promote" if g["promote"] else "refused")
            lines.append("| " + " | ".join([
                name, (champ.get("version") or "given") if champ else "none",
                f"{g['challenger']['auc']:.4f}", f"{champ['auc']:.4f}" if champ and "auc" in champ else "-",
                f"{d['auc']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]" if d else "-",
                f"{d['p_value']:.3f}" if d else "-", f"{d['logloss']:+.4f}" if d else "-", decision]) + " |")
        lines += ["", *[f"- {name}: {'; '.join(g['reasons'])}" for name, g in result["gates"].items()]]
    for name, p in (result.get("promoted") or {}).items():
        if p.get("warning"):
            lines.append(f"- **{name} {p['version']} is not pushed**: {p['warning']}")
    for r in result.get("recovered") or []:
        lines.append(f"- recovered an interrupted promotion of {r['artifact']} (step {r['step']}): {r['action']}"
                     + (f" {r['version']}" if r.get("version") else ""))
    return "\n".join(lines)


@flow(name="retrain", log_prints=True)
def retrain(project: str = ".", pull_new_data: bool = True):
    """What the weekly schedule runs: new data in, drift check, training, then the challenger meets
    the champion on the newest window and is promoted (a GTO version + stage) only if the gate holds.

    * No new data since the champion's version: nothing runs after the data check.
    * Drift of the newest window (``flip drift``): ``retrain.drift_policy`` warn → logged and reported;
      stop → the run ends Failed with the reason, before anything trains.
    * ``retrain.pretrain``: ``always`` re-pretrains on the new data (the costly GPU step);
      ``reuse`` finetunes from the last pretraining (its ID embeddings mapped onto the new vocabulary).
    * A refused challenger leaves the champion in place and ends the run Failed ("NotPromoted"), with
      the reasons in the log, the return value and the run's markdown artefact.
    * One retrain per project at a time: the run first takes the project's lock
      (``.flip/retrain.lock``, :mod:`flip.deploy.lock`) and holds it until it returns, gate and
      promotion included. A second run, however started (the deployment, ``python flows/pipeline.py``),
      ends at once Cancelled "AlreadyRunning", naming the run that holds the lock, and touches nothing.
    """
    from prefect.context import FlowRunContext
    from prefect.states import Cancelled, Failed

    from flip.deploy.lock import LockError, LockHeld, acquire, describe

    logger = get_run_logger()
    ctx = FlowRunContext.get()
    run = ctx.flow_run if ctx and ctx.flow_run else None
    try:  # before anything reads or writes the workspace
        lock = acquire(project, flow_run_id=str(run.id) if run else None, flow_run_name=run.name if run else None)
    except LockHeld as held:
        message = (f"another retrain is running in {Path(project).resolve()}: {describe(held.owner)}; "
                   "this run ends without touching the workspace")
        logger.warning(message)
        return Cancelled(name="AlreadyRunning", message=message)
    except LockError as exc:
        logger.error("error: %s", exc)
        return Failed(message=f"error: {exc}")
    if lock.previous:
        logger.warning("taking over the lock left by %s, which is no longer running", describe(lock.previous))
    with lock:
        return _retrain_locked(project, pull_new_data)


def _retrain_locked(project: str, pull_new_data: bool):
    """The body of ``retrain``, run while this process holds the project's retrain lock."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.states import Completed, Failed

    from flip.config import ConfigError, load_config
    from flip.deploy.registry import artifact_path, in_stage, lock_hash
    from flip.errors import FlipError

    logger = get_run_logger()
    root = Path(project).resolve()
    project = str(root)
    try:
        cfg = load_config(root / "params.yaml")
    except (ConfigError, FlipError) as exc:  # the same one paragraph as `flip <stage>` prints
        logger.error("error: %s", exc)
        return Failed(message=f"error: {exc}")
    rc = cfg.retrain
    before = _lock_stages(root)
    result: dict[str, Any] = {"outputs": {}, "drift": None, "gates": {}, "promoted": {}}

    def finish(status: str, message: str, ok: bool):
        after = _lock_stages(root)
        result.update(status=status, message=message,
                      stages_run=[s for s in after if after[s] != before.get(s)])
        if (root / "reports/metrics.json").exists():  # the headline metrics (small, as `dvc metrics show`)
            result["reports/metrics.json"] = json.loads((root / "reports/metrics.json").read_text())
        if (root / "reports/validation.json").exists():
            result["reports/validation.json"] = json.loads((root / "reports/validation.json").read_text()).get("summary")
        create_markdown_artifact(summary_markdown(result), key="retrain-summary", description=message[:200])
        print(json.dumps({k: v for k, v in result.items() if k != "outputs"}, indent=2, default=str))
        return Completed(message=message, data=result) if ok else Failed(name=status, message=message, data=result)

    # a promotion that an earlier run left half done (killed between its commit, tag and assignment)
    # is finished or rolled back before anything else reads the registry
    from flip.deploy.registry import recover

    try:
        result["recovered"] = recover(root, log=logger.info)
    except FlipError as exc:
        return finish("RegistryError", f"error: an interrupted promotion could not be recovered: {exc}", False)

    result["outputs"].update(prepare_data(project, pull_new_data))
    try:  # a registry that cannot be read fails the run: it never means "no champion"
        champions = {a: in_stage(root, a, rc.stage) for a in rc.artifacts}
    except FlipError as exc:
        return finish("RegistryError", f"error: the registry cannot be read, nothing trained or promoted: {exc}",
                      False)
    data_path = cfg.data.processed_path.as_posix()
    if all(champions.values()) and all(
            lock_hash(root, data_path) == lock_hash(root, data_path, rev=c["commit"]) for c in champions.values()):
        return finish("NoNewData", "no new data since the champion's version: nothing retrained, the champion stays",
                      True)

    drift_file = root / "reports" / "drift" / "drift.json"
    if drift_file.exists():
        result["drift"] = {**json.loads(drift_file.read_text()), "policy": rc.drift_policy}  # the flow's policy
        if result["drift"]["drift"]:
            reason = "; ".join(result["drift"]["reasons"])
            if rc.drift_policy == "stop":
                return finish("DriftStopped", f"stopped before training (retrain.drift_policy=stop): {reason}", False)
            logger.warning("drift of the newest window (retrain.drift_policy=warn, training goes on): %s", reason)

    reuse = rc.pretrain == "reuse" and (root / "models" / "pretrain" / "id_model.safetensors").exists()
    if reuse:
        logger.info("retrain.pretrain=reuse: finetuning from the last pretraining run (models/pretrain)")
    else:
        result["outputs"].update(pretrain(project))
    result["outputs"].update(finetune(project))
    result["outputs"].update(evaluate(project))

    # the gate and the promotion: a gate that cannot decide, or a promotion that refuses, ends the run Failed
    try:
        for artifact in rc.artifacts:
            artifact_path(root, artifact)  # declared in dvc.yaml
    except FlipError as exc:
        return finish("PromotionFailed", f"error: {exc}", False)
    for artifact in rc.artifacts:
        try:
            result["gates"][artifact] = gate_artifact(project, artifact)
        except Exception as exc:  # (the task's exception: flip gate printed the reason)
            return finish("GateFailed", f"the gate of {artifact} could not decide, nothing promoted: {exc}", False)
    refused = [a for a, g in result["gates"].items() if not g["promote"]]
    for artifact, g in result["gates"].items():
        if g["promote"]:
            try:
                result["promoted"][artifact] = promote_artifact(
                    project, artifact, rc.stage, rc.commit,
                    f"retrain: {artifact} (AUC {g['challenger']['auc']:.4f} on the newest window)",
                    ["pretrain"] if reuse else [])
            except FlipError as exc:
                return finish("PromotionRefused", f"{artifact} passed the gate but was not promoted: {exc}", False)
    if refused:
        why = "; ".join(f"{a}: {'; '.join(result['gates'][a]['reasons'])}" for a in refused)
        return finish("NotPromoted", f"the champion stays for {', '.join(refused)}: {why}", False)
    versions = ", ".join(f"{a} {p['version']}" for a, p in result["promoted"].items())
    unpushed = [f"{a} {p['version']}" for a, p in result["promoted"].items() if not p.get("pushed")]
    note = f" ({', '.join(unpushed)} not pushed: see the warnings)" if unpushed else ""
    return finish("Promoted", f"promoted {versions} to {rc.stage}{note}", True)


def main(argv: list[str]) -> int:
    """``python flows/pipeline.py [FLOW] [PROJECT]``: run one flow; 0 if it completed, 1 otherwise.
    The flows other than ``retrain`` (which locks itself) hold the project's retrain lock too."""
    from flip.deploy.lock import LockHeld, acquire

    quiet_tools()  # telemetry off (flip.environment) before Prefect starts its (ephemeral) server
    flows = {"retrain": retrain, "prepare-data": prepare_data, "pretrain": pretrain, "finetune": finetune,
             "evaluate": evaluate}
    name = argv[0] if argv else "retrain"
    project = argv[1] if len(argv) > 1 else "."
    if name == "retrain":
        state = retrain(project=project, return_state=True)
    else:
        try:
            lock = acquire(project)
        except LockHeld as held:
            print(f"{name}: {held}; nothing was run", file=sys.stderr)
            return 1
        with lock:
            state = flows[name](project=project, return_state=True)
    print(f"{name}: {state.name}" + (f": {state.message}" if state.message else ""))
    return 0 if state.is_completed() else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
