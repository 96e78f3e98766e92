"""Soak: many simulated weeks of the retrain flow, a random fault injected into each, invariants after each.

The project is the four-week test's (weekly CSV click logs, the tiny profile, ``flip_id`` gated and
registered, one seed), with ``dvc.yaml`` cut down to the lineage of the ``flip_id`` bundle (download →
preprocess → drift → pretrain → full_flip_id → package@flip_id): the flow runs the stages that
``dvc.yaml`` defines, and the others (validation, the equal-data comparison, the report) cost time
without touching the registry (validation's own failures are tested in tests/data and the four-week
test). Each week draws one fault (seeded: ``FLIP_SOAK_SEED``; ``FLIP_SOAK_WEEKS``
weeks, every kind at least once):

* ``none``: an ordinary week;
* ``bad_file``: a hostile CSV (a header built to break out of SQL) lands beside the week's log: the
  run fails at once without retrying, nothing is written outside the project, and the operator's
  rerun after removing it trains;
* ``drift``: a week from a new market: the run stops before training (``retrain.drift_policy=stop``);
* ``kill``: ``kill -9`` of the whole run (its process group) at a random stage, or inside the
  promotion at a random step (``FLIP_CRASH_AT``); the next run recovers;
* ``second_run``: a second run starts while the first holds the project lock: it ends ``AlreadyRunning``;
* ``registry``: a tag of the registry is corrupted: the run fails closed (no champion is not assumed,
  nothing is promoted); the tag is repaired and the rerun goes on;
* ``full_disk``: the project lives on a small tmpfs (root only; otherwise this fault is skipped and
  counted as such) that a ballast file fills: the run fails and says whether the workspace was restored;
  the ballast goes and the rerun completes.

After every week: every prod tag points at a commit whose ``dvc.lock`` records a bundle that the gate
scored and passed; no staged changes and no lock files; ``dvc status`` clean after a completed run (or
the failed run's message says why); no two versions on one commit by accident; ``flip predict --model
flip_id@prod`` loads and scores. The counts of faults injected and survived are printed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from helpers import ROOT
from weekly import week_log, weekly_params

pytestmark = [pytest.mark.prefect, pytest.mark.slow]
sys.path.insert(0, str(ROOT / "flows"))
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("FLIP_STAGE_RETRY_DELAY", "0")

FAULTS = ["bad_file", "drift", "kill", "second_run", "registry", "full_disk"]
KEEP = ["download", "preprocess", "drift", "pretrain", "full_flip_id", "package"]
KILL_STAGES = ["preprocess", "drift", "full_flip_id", "package@flip_id"]  # (they run every week with new data)
CRASH_POINTS = ["promote:before-commit", "promote:after-commit", "promote:after-register", "promote:after-assign",
                "promote:after-push", "atomic_dir:before-swap", "atomic_dir:after-swap"]
COMPLETED = {"Promoted", "NotPromoted", "NoNewData"}
BIN = Path(sys.executable).parent
HOSTILE_HEADER = 'user,item,"x"" ; COPY (SELECT 42) TO \'{target}\'; --",clicked,ts'


def flip_id_only(project: Path) -> None:
    """Cut dvc.yaml down to the lineage of the flip_id bundle (see the module docstring)."""
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    spec["stages"] = {k: v for k, v in spec["stages"].items() if k in KEEP}
    spec["stages"]["package"]["foreach"] = {"flip_id": spec["stages"]["package"]["foreach"]["flip_id"]}
    spec["artifacts"] = {"flip_id": spec["artifacts"]["flip_id"]}
    (project / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


class Soak:
    """The project, the weeks written so far, what the gate passed, and the checks between weeks."""

    def __init__(self, repo: Path, run, api_url: str) -> None:
        self.repo, self.run, self.api_url = repo, run, api_url
        self.week = 0
        self.passed: set[str] = set()  # bundle hashes that a gate scored and passed
        self.log: list[dict] = []
        self.killed: list[dict] = []  # where each kill fault struck (a crash point the run never reached: not killed)

    # -------------------------------------------------------------------------------- data
    def write_week(self, *, drifted: bool = False) -> Path:
        self.week += 1
        path = self.repo / "incoming" / f"week-{self.week:02d}.csv"
        week_log(self.week, drifted=drifted).to_csv(path, index=False)
        return path

    # -------------------------------------------------------------------------------- runs
    def retrain(self) -> tuple[str, dict]:
        """One run in this process (the Prefect test server); returns (its status, result): the flow's own
        status (Promoted, NotPromoted, NoNewData, DriftStopped, ...), else the state's name (AlreadyRunning,
        Failed on an exception)."""
        from pipeline import retrain

        state = retrain(project=str(self.repo), pull_new_data=True, return_state=True)
        result = state.result(raise_on_failure=False)
        self.note_gate()
        if isinstance(result, dict):
            return result["status"], result
        return state.name, {"message": state.message}

    def start(self, **env: str) -> subprocess.Popen:
        """A run in its own process group (``python flows/pipeline.py retrain``), against the same server."""
        return subprocess.Popen(
            [sys.executable, str(ROOT / "flows" / "pipeline.py"), "retrain", str(self.repo)],
            cwd=self.repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env={**os.environ, "PREFECT_API_URL": self.api_url, "FLIP_STAGE_RETRY_DELAY": "0", **env})

    def note_gate(self) -> None:
        """Record the bundle hash of a passing gate decision (the decision file a run leaves)."""
        decision = self.repo / "reports" / "gate" / "flip_id.json"
        if decision.exists():
            g = json.loads(decision.read_text())
            if g.get("promote") and g.get("challenger", {}).get("md5"):
                self.passed.add(g["challenger"]["md5"])

    # -------------------------------------------------------------------------------- checks
    def check(self, name: str, result: dict) -> None:
        """The invariants that must hold after every week, whatever happened in it."""
        from flip.deploy.lock import is_held, read_owner
        from flip.deploy.registry import artifact_path, in_stage, lock_hash

        repo = self.repo
        # no stray staged changes, no lock files
        assert subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=repo).returncode == 0, \
            self.run("git", "status", "--short")
        assert not (repo / ".git" / "index.lock").exists()
        assert not is_held(repo) and read_owner(repo) is None, read_owner(repo)
        leftovers = [str(p.relative_to(repo)) for p in repo.rglob("*.old-*")]
        assert not leftovers, leftovers
        # every version on its own commit; every prod assignment on a bundle the gate passed
        tags = [t for t in self.run("git", "tag").split() if t.startswith("flip_id@")]
        commits = [self.run("git", "rev-list", "-n", "1", t).strip() for t in tags]
        assert len(set(commits)) == len(commits), dict(zip(tags, commits))
        for tag, commit in zip(tags, commits):  # every version is a bundle that a gate scored and passed
            assert lock_hash(repo, artifact_path(repo, "flip_id"), rev=commit) in self.passed, (tag, self.passed)
        champion = in_stage(repo, "flip_id", "prod")
        if champion is not None:
            gated = lock_hash(repo, artifact_path(repo, "flip_id"), rev=champion["commit"])
            assert gated in self.passed, (champion, gated, self.passed)
        # dvc status: clean after a completed run, or the failed run says why
        status = json.loads(self.run(str(BIN / "dvc"), "status", "--json") or "{}")
        if yaml.safe_load((repo / "params.yaml").read_text())["retrain"]["pretrain"] == "reuse":
            # retrain.pretrain=reuse leaves the pretraining older than the data on purpose (and says so)
            if all(set(change) == {"changed deps"} for change in status.get("pretrain", [])):
                status.pop("pretrain", None)
        if name in COMPLETED:
            assert status == {}, status
        else:
            assert result.get("message"), (name, result)
        # the served model loads and scores
        if champion is not None:
            out = self.run(str(BIN / "flip"), "predict", "--model", "flip_id@prod", "--input",
                           "incoming/week-01.csv", "--out", str(repo.parent / "scores.parquet"), "--quiet")
            assert "scored" in out


def test_soak_weeks_of_retraining_with_faults(prefect_server, tmp_path):
    from prefect.settings import PREFECT_API_URL

    from helpers import make_tiny_bert
    from pipeline_repo import make_dvc_repo

    seed = int(os.environ.get("FLIP_SOAK_SEED", "0"))
    weeks = max(int(os.environ.get("FLIP_SOAK_WEEKS", "7")), len(FAULTS) + 1)
    rng = random.Random(seed)
    plan = ["none"] + rng.sample(FAULTS, len(FAULTS)) + [rng.choice(["none", *FAULTS]) for _ in
                                                          range(weeks - 1 - len(FAULTS))]

    disk = tmp_path / "disk"
    disk.mkdir()
    on_tmpfs = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400m", "tmpfs", str(disk)],
                              capture_output=True).returncode == 0
    repo = disk / "repo"
    repo.mkdir()
    try:
        bert = make_tiny_bert(tmp_path / "bert")

        def params(p: dict) -> None:
            weekly_params(bert)(p)
            p["retrain"]["pretrain"] = "always"
            p["run"]["seeds"] = [2012]  # one seed: the soak is about the loop, not the model
            p["finetune"]["epochs"] = 3

        run = make_dvc_repo(repo, params)
        flip_id_only(repo)
        (repo / "incoming").mkdir()
        (repo / ".gitignore").write_text((repo / ".gitignore").read_text() + "/incoming/\n")
        run("git", "add", "-A")
        run("git", "commit", "-qm", "flip_id lineage only")
        soak = Soak(repo, run, PREFECT_API_URL.value())
        injected, survived, skipped = Counter(), Counter(), Counter()
        for fault in plan:
            started = time.time()
            if fault == "full_disk" and not on_tmpfs:
                skipped[fault] += 1
                fault = "none"
            name, result = inject(soak, fault, rng)
            soak.check(name, result)
            if fault != "none":
                injected[fault] += 1
                survived[fault] += 1  # (inject and check raise where it was not)
            soak.log.append({"week": soak.week, "fault": fault, "state": name, "seconds": round(time.time() - started)})
            if name == "Promoted":  # from week 2 on, reuse the pretraining (cheaper weeks)
                p = yaml.safe_load((repo / "params.yaml").read_text())
                if p["retrain"]["pretrain"] != "reuse":
                    p["retrain"]["pretrain"] = "reuse"
                    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
                    run("git", "commit", "-qam", "reuse the pretraining")
        print("\nsoak weeks:", json.dumps(soak.log))
        print("soak kills:", json.dumps(soak.killed))
        summary = (f"soak: {sum(injected.values())} faults injected, {sum(survived.values())} survived "
                   f"({dict(injected)}); skipped: {dict(skipped) or 'none'}; seed {seed}, {len(plan)} weeks")
        print(summary)
        if os.environ.get("FLIP_SOAK_REPORT"):  # the figures, for the README and a CI log that captures output
            Path(os.environ["FLIP_SOAK_REPORT"]).write_text(json.dumps(
                {"summary": summary, "weeks": soak.log, "kills": soak.killed, "seed": seed}, indent=1))
        assert set(injected) == set(FAULTS) - set(skipped), (injected, skipped)  # every kind, at least once
        assert all(k["killed"] for k in soak.killed[-1:]), soak.killed
    finally:
        if on_tmpfs:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def inject(soak: Soak, fault: str, rng: random.Random) -> tuple[str, dict]:
    """Run one week with ``fault``; returns the state and result of the week's last run (the one that
    must leave the project consistent)."""
    repo = soak.repo
    if fault == "none":
        soak.write_week()
        name, result = soak.retrain()
        assert name in COMPLETED, (name, result.get("message"))
        return name, result

    if fault == "bad_file":
        soak.write_week()
        target = repo.parent / "pwned.csv"
        hostile = repo / "incoming" / "zz-dropped.csv"
        hostile.write_text(HOSTILE_HEADER.format(target=target) + "\nu1,i1,a,1,1700000000\n")
        t0 = time.time()
        name, result = soak.retrain()
        assert name not in COMPLETED, (name, result)
        assert not target.exists(), "a data file ran SQL that wrote outside the project"
        assert "error:" in result.get("message", "") or "exit 2" in result.get("message", ""), result
        assert time.time() - t0 < 120, "a bad file must not be retried"
        hostile.unlink()  # the operator removes it; the rerun trains
        name, result = soak.retrain()
        assert name in COMPLETED, (name, result.get("message"))
        return name, result

    if fault == "drift":
        path = soak.write_week(drifted=True)
        name, result = soak.retrain()
        assert name == "DriftStopped", (name, result.get("message"))
        path.unlink()  # quarantined by the operator: the project is back on last week's data
        soak.week -= 1
        return name, result

    if fault == "kill":
        where = rng.choice(KILL_STAGES + CRASH_POINTS)
        for attempt in range(2):
            soak.write_week()
            if where in CRASH_POINTS:  # the process kills itself there (SIGKILL): the flow, or a stage's command
                proc = soak.start(FLIP_CRASH_AT=where)
                out, _ = proc.communicate(timeout=900)
                killed = proc.returncode == -signal.SIGKILL or "exited with -9" in out
            else:  # the whole run's process group, as the stage starts
                proc = soak.start()
                out = wait_for(proc, f"Running stage '{where}'", timeout=900)
                killed = proc.poll() is None
                if killed:
                    os.killpg(proc.pid, signal.SIGKILL)
                out += proc.communicate(timeout=60)[0]
            soak.note_gate()
            soak.killed.append({"week": soak.week, "at": where, "killed": killed})
            if killed:
                break
            where = rng.choice(KILL_STAGES)  # the run never reached that point (a refused gate): a stage next week
        name, result = soak.retrain()  # the next run recovers what the killed one left
        assert name in COMPLETED, (where, name, result.get("message"), out[-3000:])
        return name, result

    if fault == "second_run":
        soak.write_week()
        from flip.deploy.lock import read_owner

        first = soak.start()
        deadline = time.time() + 300
        while read_owner(repo) is None and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, first.communicate()[0][-3000:]
        name, result = soak.retrain()
        assert name == "AlreadyRunning", (name, result.get("message"))
        out, _ = first.communicate(timeout=900)
        soak.note_gate()
        assert first.returncode == 0 or "NotPromoted" in out, out[-3000:]
        name, result = soak.retrain()  # nothing new: the first run did the week
        assert name in COMPLETED, (name, result.get("message"))
        return name, result

    if fault == "registry":
        soak.write_week()
        refs = sorted((repo / ".git" / "refs" / "tags").glob("flip_id*"))
        if not refs:  # nothing to corrupt yet: an ordinary week
            return inject(soak, "none", rng)
        ref = rng.choice(refs)
        good = ref.read_text()
        ref.write_text("0" * 39 + "1\n")  # a tag pointing at an object that does not exist
        tags_before = soak.run("git", "tag")
        name, result = soak.retrain()
        assert name not in COMPLETED, (name, result.get("message"))
        ref.write_text(good)
        assert soak.run("git", "tag") == tags_before  # nothing promoted while the registry was unreadable
        name, result = soak.retrain()
        assert name in COMPLETED, (name, result.get("message"))
        return name, result

    if fault == "full_disk":
        soak.write_week()
        ballast = repo.parent / "ballast"
        free = shutil.disk_usage(repo).free
        subprocess.run(["fallocate", "-l", str(max(free - (64 << 10), 0)), str(ballast)], check=True)
        try:
            name, result = soak.retrain()
        finally:
            ballast.unlink()
        assert name not in COMPLETED or name == "NoNewData", (name, result.get("message"))
        name, result = soak.retrain()
        assert name in COMPLETED, (name, result.get("message"))
        return name, result
    raise AssertionError(fault)


def wait_for(proc: subprocess.Popen, text: str, timeout: float) -> str:
    """Read ``proc``'s output until a line holds ``text`` (or it ends); returns what was read."""
    seen, deadline = [], time.time() + timeout
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if text in line or time.time() > deadline:
            break
    return "".join(seen)
