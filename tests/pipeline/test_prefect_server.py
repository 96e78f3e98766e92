"""The README's Prefect recipe end to end: a real ``prefect server start``, then ``python flows/serve.py``.

The server's scheduler must create the upcoming runs of ``retrain/weekly-retrain`` from the cron in
params.yaml. (With SQLAlchemy 2.1, which prefect 3.8.8 does not support, the deployment registers but
``_insert_scheduled_flow_runs`` fails with "Can't evaluate bulk DML statement" and no run appears.)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
import yaml

from helpers import ROOT

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

SERVER_STARTUP_S = 120
SCHEDULE_WAIT_S = 90


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _next_runs(cron: str, tz: str, after: datetime, n: int) -> list[datetime]:
    """The next ``n`` times of a ``M H * * DOW`` cron after ``after``, in UTC (computed without Prefect)."""
    minute, hour, dom, month, dow = cron.split()
    assert dom == "*" and month == "*", f"the test only handles 'M H * * DOW' crons, not {cron!r}"
    weekday = (int(dow) - 1) % 7  # cron: 0/7 = Sunday, 1 = Monday; Python: Monday = 0
    local = after.astimezone(ZoneInfo(tz))
    day = local.replace(hour=int(hour), minute=int(minute), second=0, microsecond=0)
    day += timedelta(days=(weekday - day.weekday()) % 7)
    runs: list[datetime] = []
    while len(runs) < n:
        if day > local:
            runs.append(day.astimezone(timezone.utc))
        day += timedelta(days=7)
    return runs


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"<no log: {e}>"


def _stop(proc: subprocess.Popen | None) -> None:
    """SIGINT to the process group (prefect server starts uvicorn in a child), then kill if needed."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def test_served_deployment_gets_its_next_three_scheduled_runs(tmp_path):
    schedule = yaml.safe_load((ROOT / "params.yaml").read_text())["schedule"]
    prefect = Path(sys.executable).parent / "prefect"
    assert prefect.exists(), f"no prefect executable next to {sys.executable}"

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
    )
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.py.log"
    server = serve = None
    logs = []

    def context() -> str:
        return "".join(f"\n--- tail of {p.name} ---\n{_tail(p)}" for p in (server_log, serve_log) if p.exists())

    try:
        logs.append(server_log.open("wb"))
        server = subprocess.Popen(
            [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=logs[-1], stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + SERVER_STARTUP_S
        while True:
            assert server.poll() is None, f"prefect server exited with {server.returncode}{context()}"
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no /api/health after {SERVER_STARTUP_S} s{context()}")
            time.sleep(0.5)

        if min(_next_runs(schedule["cron"], schedule["timezone"], datetime.now(timezone.utc), 1)) \
                - datetime.now(timezone.utc) < timedelta(minutes=3):
            pytest.skip("too close to a scheduled time: the served runner may pick that run up")

        logs.append(serve_log.open("wb"))
        serve = subprocess.Popen(
            [sys.executable, str(ROOT / "flows" / "serve.py")], cwd=ROOT,
            env={**env, "PREFECT_API_URL": api}, stdout=logs[-1], stderr=subprocess.STDOUT,
            start_new_session=True)

        name = f"retrain/{schedule['name']}"
        deployment_id, runs = None, []
        deadline = time.monotonic() + SCHEDULE_WAIT_S
        with httpx.Client(base_url=api, timeout=10) as client:
            while True:
                assert serve.poll() is None, f"flows/serve.py exited with {serve.returncode}{context()}"
                if deployment_id is None:
                    r = client.get(f"/deployments/name/{name}")
                    if r.status_code == 200:
                        deployment_id = r.json()["id"]
                if deployment_id is not None:
                    r = client.post("/flow_runs/filter", json={
                        "deployments": {"id": {"any_": [deployment_id]}},
                        "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
                        "sort": "EXPECTED_START_TIME_ASC"})
                    r.raise_for_status()
                    runs = r.json()
                    if len(runs) >= 3:
                        break
                if time.monotonic() > deadline:
                    pytest.fail(f"after {SCHEDULE_WAIT_S} s: deployment {name} "
                                f"{'not registered' if deployment_id is None else 'registered'}, "
                                f"{len(runs)} scheduled run(s), expected >= 3{context()}")
                time.sleep(1)

        starts = [datetime.fromisoformat(run["expected_start_time"]).astimezone(timezone.utc) for run in runs[:3]]
        expected = _next_runs(schedule["cron"], schedule["timezone"], datetime.now(timezone.utc), 3)
        assert starts == expected, f"scheduled {starts}, expected {expected}{context()}"
        assert all(run["auto_scheduled"] for run in runs[:3])
    finally:
        _stop(serve)
        _stop(server)
        for fh in logs:
            fh.close()
