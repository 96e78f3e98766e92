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
sys.path.insert(0, str(ROOT / "tests" / "align"))
os.environ.setdefault("FLIP_STAGE_RETRY_DELAY", "0")  # retries stay real, without the 20 s waits


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


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


def test_retrain_flow_runs_the_whole_pipeline(prefect_server, tmp_path):
    """What the weekly schedule runs, end to end on synthetic data with a tiny language model: every
    stage runs once, the artefact paths come back, and DVC then has nothing left to do."""
    from pipeline import STAGE_GROUPS, retrain
    from pipeline_repo import make_dvc_repo, tiny_profile
    from tiny_plm import make_tiny_bert

    repo = tmp_path / "repo"
    repo.mkdir()
    run = make_dvc_repo(repo, tiny_profile(make_tiny_bert(tmp_path / "bert")))
    state = retrain(project=str(repo), pull_new_data=True, return_state=True)
    assert state.is_completed(), state
    result = state.result()
    outputs = result["outputs"]
    assert list(outputs) == [s for stages in STAGE_GROUPS.values() for s in stages]
    assert outputs["pretrain"] == ["models/pretrain"]
    assert sorted(outputs["finetune"]) == ["models/finetune/flip", "models/finetune/flip_id",
                                           "models/finetune/flip_plm"]
    for paths in outputs.values():
        for path in paths:
            assert (repo / path).exists(), path
    assert "reports/index.html" in outputs["report"]
    summary = result["reports/eval.json"]
    assert {f"{s}.test.auc" for s in ("scratch", "flip_id", "flip_plm", "flip")} <= set(summary), summary
    assert "Running stage" not in run("dvc", "repro")  # the flow's runs are DVC's runs
