"""Prefect flows under prefect_test_harness: a real flow run on synthetic data, and the schedule."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT

pytestmark = [pytest.mark.prefect, pytest.mark.slow]
sys.path.insert(0, str(ROOT / "flows"))
os.environ.setdefault("FLIP_STAGE_RETRY_DELAY", "0")  # retries stay real, without the 20 s waits


def test_flows_cover_every_dvc_stage_once():
    from pipeline import STAGE_GROUPS

    grouped = [s for stages in STAGE_GROUPS.values() for s in stages]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


def test_prepare_data_flow_runs_the_dvc_stages(prefect_server, dvc_repo):
    from pipeline import prepare_data

    state = prepare_data(project=str(Path.cwd()), pull_new_data=True, return_state=True)
    assert state.is_completed(), state
    outputs = state.result()
    assert outputs["preprocess"] == ["data/processed/synthetic"]
    assert json.loads(Path("reports/validation.json").read_text())["success"]
    # the stages are DVC's: a plain `dvc repro` now finds them up to date
    assert "Running stage" not in dvc_repo("dvc", "repro", "validate")


def test_failed_stage_is_retried_then_fails_the_flow(prefect_server, dvc_repo):
    import yaml
    from pipeline import prepare_data

    params = yaml.safe_load(Path("params.yaml").read_text())
    params["data"]["dataset"] = "no-such-dataset"
    Path("params.yaml").write_text(yaml.safe_dump(params))
    state = prepare_data(project=str(Path.cwd()), return_state=True)
    assert state.is_failed()


def test_weekly_schedule_is_registered(prefect_server):
    from prefect.client.orchestration import get_client
    from serve import deployment

    d = deployment()
    assert d.name == "weekly-retrain" and d.parameters["pull_new_data"] is True
    [schedule] = d.schedules
    assert schedule.schedule.cron == "0 3 * * 1" and schedule.schedule.timezone == "UTC"
    deployment_id = d.apply()

    import anyio

    async def read():
        async with get_client() as client:
            return await client.read_deployment(deployment_id)

    stored = anyio.run(read)
    assert stored.name == "weekly-retrain" and stored.schedules[0].schedule.cron == "0 3 * * 1"


def test_failed_download_leaves_the_workspace_as_it_was(prefect_server, dvc_repo, tmp_path):
    """A forced download from a mirror that lost a file fails, and the previous raw files are back."""
    from helpers import write_ml1m
    from pipeline import prepare_data

    mirror = tmp_path / "mirror"
    write_ml1m(mirror)
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["data"].update({"dataset": "movielens-1m", "mirror": str(mirror)})
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc_repo("dvc", "repro", "download")
    raw = Path("data/raw/movielens-1m")
    before = {p.name: p.read_bytes() for p in raw.iterdir()}
    (mirror / "ml-1m" / "users.dat").unlink()
    state = prepare_data(project=str(Path.cwd()), pull_new_data=True, return_state=True)
    assert state.is_failed()
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == before
    assert "changed" not in dvc_repo("dvc", "status", "download")
