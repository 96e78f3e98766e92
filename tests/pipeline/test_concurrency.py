"""One retrain at a time: the project lock (flip/deploy/lock.py), the deployment's concurrency limit,
and which failed stages are retried.

The runs that must overlap are real processes: ``python flows/pipeline.py retrain`` and runs of the
served deployment on a real ``prefect server start``. The run that holds the lock is kept busy cheaply:
the test project's download stage first runs a gate script that waits for a file the test writes
(``go``: ``ok`` lets the stage go on, ``fail`` makes it exit 2 like a ``flip`` stage on bad input).
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from helpers import ROOT
from pipeline_repo import make_dvc_repo, synthetic

sys.path.insert(0, str(ROOT / "flows"))
os.environ.setdefault("FLIP_STAGE_RETRY_DELAY", "0")

WAIT_S = 120

GATE = """\
import sys, time
from pathlib import Path

control = Path(sys.argv[1])
with open(control / "attempts", "a") as f:
    f.write("started\\n")
deadline = time.monotonic() + 120
while not (control / "go").exists():
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(0.1)
if (control / "go").read_text().strip() == "fail":
    sys.stderr.write("error: the test stopped this stage on purpose (its go file says fail).\\n")
    sys.exit(2)
"""


# ------------------------------------------------------------------ helpers
def _gated_project(tmp_path: Path) -> tuple[Path, Path]:
    """A synthetic project whose download stage waits on ``control/go`` first; (project, control)."""
    project, control = tmp_path / "project", tmp_path / "control"
    project.mkdir()
    control.mkdir()
    (tmp_path / "gate.py").write_text(GATE)
    run = make_dvc_repo(project, synthetic)
    dvc_yaml = yaml.safe_load((project / "dvc.yaml").read_text())
    download = dvc_yaml["stages"]["download"]
    download["cmd"] = f"{sys.executable} {tmp_path / 'gate.py'} {control} && {download['cmd']}"
    (project / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    run("git", "add", "-A")
    run("git", "commit", "-qm", "gated download")
    return project, control


def _attempts(control: Path) -> int:
    path = control / "attempts"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``root`` (.git, .dvc and .flip included): size, mtime and content hash."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
    return out


def _env(api: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=api, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", FLIP_STAGE_RETRY_DELAY="0", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return env


def _cli_retrain(project: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """``python flows/pipeline.py retrain .`` in ``project``, in its own process group, output to ``log``."""
    with log.open("wb") as fh:
        return subprocess.Popen([sys.executable, str(ROOT / "flows" / "pipeline.py"), "retrain", "."], cwd=project,
                                env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(what: str, check, proc: subprocess.Popen | None = None, log: Path | None = None, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"waiting for {what}: the process exited with {proc.returncode}\n{_text(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"waiting for {what}: nothing after {timeout} s\n{_text(log)}")
        time.sleep(0.2)
    return value


def _text(log: Path | None, tail: int | None = 6000) -> str:
    text = log.read_text(errors="replace") if log is not None and log.exists() else ""
    return text[-tail:] if tail else text


def _kill_group(proc: subprocess.Popen | None, sig: int = signal.SIGKILL) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


HOLDER = """\
import sys
from flip.deploy.lock import acquire
lock = acquire(sys.argv[1], flow_run_id="0000-test-holder", flow_run_name="holder")
print("held", flush=True)
sys.stdin.read()   # hold until the test closes stdin (or kills this process)
lock.release()
print("released", flush=True)
"""


def _holder(project: Path) -> subprocess.Popen:
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(project)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": path})
    assert proc.stdout.readline().strip() == "held"
    return proc


# ------------------------------------------------------------------ the lock itself (no Prefect)
def test_lock_records_its_owner_and_refuses_a_second_holder(tmp_path):
    from flip.deploy.lock import LockHeld, acquire, is_held, lock_path, read_owner

    holder = _holder(tmp_path)
    try:
        assert is_held(tmp_path)
        owner = read_owner(tmp_path)
        assert owner["pid"] == holder.pid and owner["flow_run_id"] == "0000-test-holder"
        assert owner["host"] == socket.gethostname() and owner["started"]
        before = lock_path(tmp_path).read_bytes()
        with pytest.raises(LockHeld) as held:
            acquire(tmp_path, flow_run_id="second")
        assert held.value.owner == owner
        assert f"run holder (0000-test-holder) (pid {holder.pid} on {socket.gethostname()}" in str(held.value)
        assert lock_path(tmp_path).read_bytes() == before  # the refused taker wrote nothing
        holder.stdin.close()
        assert holder.stdout.readline().strip() == "released" and holder.wait(timeout=10) == 0
    finally:
        holder.kill()
        holder.wait()
    # a clean release empties the record: the next owner has nothing to take over
    assert read_owner(tmp_path) is None and not is_held(tmp_path)
    with acquire(tmp_path, flow_run_id="third") as lock:
        assert lock.previous is None and read_owner(tmp_path)["flow_run_id"] == "third"
        assert lock.path == tmp_path.resolve() / ".flip" / "retrain.lock"
    assert read_owner(tmp_path) is None


def test_lock_of_a_killed_holder_is_taken_over(tmp_path):
    from flip.deploy.lock import acquire, describe, is_held, read_owner

    holder = _holder(tmp_path)
    owner = read_owner(tmp_path)
    holder.kill()  # SIGKILL: no cleanup ran, the record stays, the kernel dropped the flock
    holder.wait()
    assert not is_held(tmp_path) and read_owner(tmp_path) == owner
    with acquire(tmp_path, flow_run_id="next") as lock:
        assert lock.previous == owner
        assert describe(lock.previous).startswith(f"run holder (0000-test-holder) (pid {holder.pid} ")
        assert read_owner(tmp_path)["pid"] == os.getpid()


# ------------------------------------------------------------------ which failed stages are retried
@pytest.mark.prefect
@pytest.mark.slow
def test_bad_input_stage_is_not_retried_and_a_failing_command_is(prefect_server, dvc_repo):
    """A ``flip`` stage that exits 2 (an unknown dataset) fails on its first attempt, well before the
    retry delay; a stage command failing with another status is retried twice."""
    import anyio
    from prefect import flow
    from prefect.client.orchestration import get_client
    from pipeline import StageInputError, run_stage

    project = Path.cwd()
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["data"]["dataset"] = "no-such-dataset"
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc_yaml = yaml.safe_load(Path("dvc.yaml").read_text())
    dvc_yaml["stages"]["flaky"] = {"cmd": f"{sys.executable} -c \"import sys; sys.exit(1)\""}
    Path("dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))

    @flow
    def one_stage(stage: str, delay: float) -> dict:
        state = run_stage.with_options(retry_delay_seconds=delay, retry_jitter_factor=0)(
            str(project), stage, return_state=True)
        return {"failed": state.is_failed(), "error": state.result(raise_on_failure=False),
                "task_run_id": state.state_details.task_run_id}

    async def run_count(task_run_id) -> int:
        async with get_client() as client:
            return (await client.read_task_run(task_run_id)).run_count

    t0 = time.monotonic()
    bad = one_stage("download", 120.0)
    took = time.monotonic() - t0
    assert bad["failed"] and anyio.run(run_count, bad["task_run_id"]) == 1, bad
    assert took < 60, f"a bad-input stage took {took:.0f} s: it waited for a retry"
    err = bad["error"]
    assert isinstance(err, StageInputError), err
    assert "command exit 2" in str(err) and "not retried" in str(err) and "no-such-dataset" in str(err)

    flaky = one_stage("flaky", 0.0)
    assert flaky["failed"] and anyio.run(run_count, flaky["task_run_id"]) == 3, flaky
    err = flaky["error"]
    assert type(err) is RuntimeError and "command exit 1" in str(err) and "not retried" not in str(err)


def test_stage_exit_code_is_read_from_dvcs_message():
    from pipeline import stage_exit_code

    lines = ["Running stage 'download':", "> flip download --out data/raw/x, y", "error: file a.csv: bad.",
             "ERROR: failed to reproduce 'download': failed to run: flip download --out data/raw/x, y, exited with 2"]
    assert stage_exit_code(lines) == 2
    assert stage_exit_code(lines[:3]) is None
    assert stage_exit_code(["ERROR: failed to reproduce 'x': failed to run: sh -c 'kill -9 $$', exited with -9"]) == -9


@pytest.mark.prefect
@pytest.mark.slow
def test_failed_checkout_says_the_workspace_is_not_restored(prefect_server, dvc_repo):
    """The cache object of the last good download is gone: after the stage fails, ``dvc checkout``
    cannot put the raw files back, and the error (and the log) say so instead of claiming a restore."""
    import shutil

    from prefect import flow
    from pipeline import run_stage

    project = Path.cwd()
    dvc_repo("dvc", "repro", "download")
    shutil.rmtree(".dvc/cache/files")
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["data"]["synthetic"]["fields"] = -1  # a setting flip download refuses (exit 2)
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    @flow
    def one_stage() -> dict:
        state = run_stage(str(project), "download", return_state=True)
        return {"failed": state.is_failed(), "error": state.result(raise_on_failure=False)}

    done = one_stage()
    assert done["failed"], done
    assert "workspace NOT restored: " in str(done["error"]) and "Checkout failed" in str(done["error"]), done
    assert not Path("data/raw/synthetic").exists() or not any(Path("data/raw/synthetic").iterdir())


# ------------------------------------------------------------------ the flow's lock
@pytest.mark.prefect
@pytest.mark.slow
def test_retrain_while_the_lock_is_held_ends_already_running_and_touches_nothing(prefect_server, dvc_repo):
    from pipeline import retrain

    project = Path.cwd()
    holder = _holder(project)
    try:
        before = _snapshot(project)
        state = retrain(project=str(project), return_state=True)
        assert state.is_cancelled() and state.name == "AlreadyRunning", state
        assert "0000-test-holder" in state.message and f"pid {holder.pid}" in state.message
        assert _snapshot(project) == before
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.prefect
@pytest.mark.slow
def test_overlapping_cli_runs_one_trains_and_a_killed_run_is_taken_over(prefect_server, tmp_path):
    """Run A holds the lock (its download waits); run B, started meanwhile, ends AlreadyRunning naming A
    and touches no file; A is killed -9; run C takes the lock over and says whose it was."""
    from prefect.settings import PREFECT_API_URL

    from flip.deploy.lock import is_held, read_owner

    project, control = _gated_project(tmp_path)
    env = _env(PREFECT_API_URL.value(), tmp_path / "prefect-home")
    logs = {name: tmp_path / f"{name}.log" for name in "ABC"}
    a = b = c = None
    try:
        a = _cli_retrain(project, env, logs["A"])
        _wait("run A to hold the lock and start its download", lambda: _attempts(control) == 1 and is_held(project),
              a, logs["A"])
        owner = read_owner(project)
        assert owner["pid"] == a.pid and owner["flow_run_id"], owner

        before = _snapshot(project)
        b = _cli_retrain(project, env, logs["B"])
        assert b.wait(timeout=WAIT_S) == 1, _text(logs["B"])
        out_b = _text(logs["B"], tail=None)
        assert "retrain: AlreadyRunning: another retrain is running" in out_b, out_b
        assert owner["flow_run_id"] in out_b and f"pid {a.pid}" in out_b
        assert "Running stage" not in out_b and _attempts(control) == 1
        assert _snapshot(project) == before, "the refused run changed files"
        assert a.poll() is None  # A still runs

        _kill_group(a)  # kill -9 of run A (and the stage it runs)
        assert not is_held(project) and read_owner(project) == owner

        (control / "go").write_text("fail")  # C's download stage ends at once on "bad input"
        c = _cli_retrain(project, env, logs["C"])
        assert c.wait(timeout=WAIT_S) == 1, _text(logs["C"])
        out_c = _text(logs["C"], tail=None)
        took_over = [line for line in out_c.splitlines() if "taking over the lock left by" in line]
        assert took_over, out_c
        assert owner["flow_run_id"] in took_over[0] and f"pid {a.pid} " in took_over[0]
        assert "which is no longer running" in took_over[0]
        assert _attempts(control) == 2  # C ran the stage, once (exit 2 is not retried)
        assert "StageInputError" in out_c and "AlreadyRunning" not in out_c
        assert not is_held(project) and read_owner(project) is None  # C released it cleanly
    finally:
        for proc in (a, b, c):
            _kill_group(proc)


# ------------------------------------------------------------------ the deployment's concurrency limit
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVE = """\
import sys
from pathlib import Path

sys.path[:0] = ["flows", "."]
from prefect import serve as prefect_serve
from serve import deployment

project = Path(sys.argv[1])
prefect_serve(deployment(params=project / "params.yaml", project=project), pause_on_shutdown=False)
"""


@pytest.mark.prefect
@pytest.mark.slow
def test_deployment_runs_one_at_a_time_and_a_cli_run_meets_the_lock(tmp_path):
    """On a real ``prefect server start``: the served deployment carries concurrency limit 1 (CANCEL_NEW).
    Of two runs started together one runs and the server cancels the other; a third started while the
    first runs is cancelled too, neither ever starts; ``python flows/pipeline.py retrain`` in the same
    project ends AlreadyRunning naming the first; and while a process outside the deployment holds the
    lock, the deployment's next run ends AlreadyRunning."""
    project, control = _gated_project(tmp_path)
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _env(api, tmp_path / "prefect-home")
    env.update(PREFECT_SERVER_UI_ENABLED="false", PREFECT_RUNNER_POLL_FREQUENCY="1")
    server_log, serve_log, cli_log = tmp_path / "server.log", tmp_path / "serve.log", tmp_path / "cli.log"
    server = served = None
    try:
        with server_log.open("wb") as fh:  # no services: no scheduler making runs of the weekly cron
            server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host",
                                       "127.0.0.1", "--port", str(port), "--no-services"],
                                      env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)

        def healthy() -> bool:
            try:
                return httpx.get(f"{api}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait("the Prefect server", healthy, server, server_log)
        with serve_log.open("wb") as fh:
            served = subprocess.Popen([sys.executable, "-c", SERVE, str(project)], cwd=ROOT, env=env, stdout=fh,
                                      stderr=subprocess.STDOUT, start_new_session=True)

        with httpx.Client(base_url=api, timeout=10) as client:
            def deployment_id():
                r = client.get("/deployments/name/retrain/weekly-retrain")
                return r.json()["id"] if r.status_code == 200 else None

            dep = _wait("the served deployment", deployment_id, served, serve_log)
            d = client.get(f"/deployments/{dep}").json()
            assert d["global_concurrency_limit"]["limit"] == 1, d
            assert d["concurrency_options"]["collision_strategy"] == "CANCEL_NEW", d

            def state(run_id: str) -> dict:
                return client.get(f"/flow_runs/{run_id}").json()["state"]

            def new_run() -> str:
                r = client.post(f"/deployments/{dep}/create_flow_run", json={})
                r.raise_for_status()
                return r.json()["id"]

            def ended(run_id: str):
                return (st := state(run_id))["type"] in ("CANCELLED", "COMPLETED", "FAILED", "CRASHED") and st

            # two runs started together (two `prefect deployment run` at once): the server admits one
            pair = [new_run(), new_run()]
            _wait("one run in its download stage, the other ended", lambda: _attempts(control) == 1
                  and sorted(state(r)["type"] for r in pair) == ["CANCELLED", "RUNNING"], served, serve_log)
            [first] = [r for r in pair if state(r)["type"] == "RUNNING"]
            cancelled = [r for r in pair if r != first]
            # and a third, started while the first runs
            cancelled.append(new_run())
            _wait("the third run to end", lambda: ended(cancelled[-1]), served, serve_log)
            for run_id in cancelled:
                st = state(run_id)
                assert st["type"] == "CANCELLED" and "concurrency limit" in st["message"], st
            assert state(first)["type"] == "RUNNING" and _attempts(control) == 1

            cli = _cli_retrain(project, env, cli_log)
            assert cli.wait(timeout=WAIT_S) == 1, _text(cli_log)
            out = _text(cli_log, tail=None)
            assert "retrain: AlreadyRunning" in out and first in out, out
            assert state(first)["type"] == "RUNNING" and _attempts(control) == 1

            (control / "go").write_text("fail")  # end the first run quickly (its stage exits 2)
            s1 = _wait("the first run to end", lambda: ended(first), served, serve_log)
            assert s1["type"] == "FAILED", s1
            assert _attempts(control) == 1, "a run other than the first ran the download stage"
            for run_id in cancelled:  # never started: the runner did not even launch them
                history = client.get("/flow_run_states/", params={"flow_run_id": run_id}).json()
                assert "RUNNING" not in [h["type"] for h in history], history
                assert f"Aborted submission of flow run '{run_id}'" in _text(serve_log, tail=None)

            # the other way round: a run started outside the deployment holds the lock, and the
            # deployment's next run (its slot is free again) ends AlreadyRunning at once
            holder = _holder(project)
            try:
                fourth = new_run()
                s4 = _wait("the fourth run to end", lambda: ended(fourth), served, serve_log)
            finally:
                holder.kill()
                holder.wait()
            assert s4["type"] == "CANCELLED" and s4["name"] == "AlreadyRunning", s4
            assert "0000-test-holder" in s4["message"] and _attempts(control) == 1
    finally:
        _kill_group(served, signal.SIGINT)
        _kill_group(server, signal.SIGINT)
